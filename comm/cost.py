"""The alpha-beta cost model of the all-reduce topologies, its fit, and ``auto``'s choice.

A message of S bytes over one link costs alpha + S * beta (latency, then seconds per byte). Each
topology's all-reduce of S bytes over n ranks is a number of such latencies and bytes on its
critical path, ``t = a * alpha + b * S * beta``; ``coefficients`` gives (a, b):

- star: 2(n - 1) messages of S, serialised at the root: a = b = 2(n - 1)
- tree (binary, depth d = ceil(log2 n)), in k pipelined pieces: a = 2d + k, b = (2d + k) / k;
  where the pieces cannot overlap (fewer cores than ranks) b = 2d, and the fit says which holds
- ring: a = 2(n - 1), b = 2(n - 1) / n
- hier (g ranks per node, m nodes): a star inside each node and a ring across the leaders:
  a = 2(g - 1) + 2(m - 1), b = 2(g - 1) + 2(m - 1) / m
- hier-scatter: reduce-scatter and all-gather inside the node on S / g, a ring across nodes on
  S / g: a = 2(g - 1) + 2(m - 1), b = 2(g - 1) / g + 2(m - 1) / (m g)
- native: the backend's own algorithm, measured rather than derived: a = b = 1 on its own
  (alpha, beta).

``fit`` finds alpha and beta from measured times (benchmarks/collectives.py
writes them to topologies/fitted.json); ``auto`` picks the algorithm with the lowest predicted
time, the way NCCL's tuner picks an algorithm per size.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

TOPOLOGY_FILE = Path(__file__).resolve().parent.parent / "topologies" / "fitted.json"
CANDIDATES = ("native", "star", "tree", "ring", "hier", "hier-scatter")
NATIVE_MARGIN = 0.15  # auto leaves native only for a predicted gain larger than this


@dataclass(frozen=True)
class Link:
    alpha: float  # seconds per message
    beta: float  # seconds per byte
    # whether the pieces of a chunked tree overlap on this machine (they need a core per rank)
    pipelined: bool = True


def coefficients(
    topology: str, n: int, per_node: int = 1, chunks: int = 1, pipelined: bool = True
) -> tuple[float, float]:
    if n <= 1:
        return 0.0, 0.0
    if topology == "native":
        return 1.0, 1.0
    if topology == "star":
        return 2.0 * (n - 1), 2.0 * (n - 1)
    if topology == "tree":
        d = math.ceil(math.log2(n))
        return 2 * d + chunks, (2 * d + chunks) / chunks if pipelined else 2.0 * d
    if topology == "ring":
        return 2.0 * (n - 1), 2.0 * (n - 1) / n
    g = max(1, min(per_node, n))
    m = math.ceil(n / g)
    if topology == "hier":
        return 2.0 * (g - 1) + 2.0 * (m - 1), 2.0 * (g - 1) + 2.0 * (m - 1) / m
    if topology == "hier-scatter":
        return 2.0 * (g - 1) + 2.0 * (m - 1), 2.0 * (g - 1) / g + 2.0 * (m - 1) / (m * g)
    raise ValueError(f"no cost model for topology {topology!r}")


def predict(topology: str, n: int, nbytes: int, link: Link, per_node: int = 1, chunks: int = 1) -> float:
    a, b = coefficients(topology, n, per_node, chunks, link.pipelined)
    return a * link.alpha + b * nbytes * link.beta


SMALL_BYTES = 1 << 10  # messages this small measure the latency alone
LARGE_BYTES = 1 << 20  # messages this large measure the bandwidth


SMALL_BYTES = 1 << 10  # messages this small measure the latency alone
FIT_FROM_BYTES = 64 << 10  # beta is fitted to the messages from this size up


def relative_errors(link: Link, samples: list[tuple[float, float, float, int]]) -> list[float]:
    """|predicted - measured| / measured of the samples from 64 KiB up."""
    return [
        abs(a * link.alpha + bs * link.beta - t) / t for a, bs, t, size in samples if size >= FIT_FROM_BYTES
    ]


def fit(samples: list[tuple[float, float, float, int]]) -> Link:
    """(alpha, beta) from samples (a, b * S, seconds, S) of one algorithm: alpha is the median
    per-message latency of the small messages, where the bytes cost next to nothing; beta then
    minimises the squared relative error of the messages from 64 KiB up."""
    small = [t / a for a, _, t, size in samples if size <= SMALL_BYTES and a > 0]
    if not small:
        raise ValueError(f"fitting alpha needs messages of at most {SMALL_BYTES} bytes")
    alpha = statistics.median(small)
    big = [(a, bs, t) for a, bs, t, size in samples if size >= FIT_FROM_BYTES and bs > 0]
    if not big:
        raise ValueError(f"fitting beta needs messages of at least {FIT_FROM_BYTES} bytes")
    # d/dbeta sum(((a alpha + bs beta - t) / t)^2) = 0
    num = sum(bs * (t - a * alpha) / (t * t) for a, bs, t in big)
    den = sum(bs * bs / (t * t) for a, bs, t in big)
    return Link(alpha, max(0.0, num / den))


@dataclass(frozen=True)
class Fitted:
    """A machine's measured links: one (alpha, beta) per algorithm, fitted to that algorithm's
    own times with its coefficients. (On an oversubscribed host, where ranks share cores, what a
    message costs depends on how many others are in flight, so one link does not fit them all.)"""

    links: dict[str, Link]
    source: str = ""


def load(path: Path = TOPOLOGY_FILE) -> Fitted | None:
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return Fitted({name: Link(**link) for name, link in raw["links"].items()}, str(path))


_FITTED: Fitted | None = None
_LOADED = False


def choose(nbytes: int, n: int, per_node: int, fitted: Fitted | None = None) -> str:
    """The algorithm with the lowest predicted all-reduce time for ``nbytes`` over ``n`` ranks,
    from ``fitted`` or topologies/fitted.json; ``native`` when there is no fit to go by."""
    global _FITTED, _LOADED
    if fitted is None:
        if not _LOADED:
            _FITTED, _LOADED = load(), True
        fitted = _FITTED
    if fitted is None:
        return "native"
    from comm.allreduce import ring_pieces, tree_chunks

    def cost(name: str) -> float:
        chunks = {"tree": tree_chunks(nbytes), "ring": ring_pieces(nbytes, n)}.get(name, 1)
        return predict(name, n, nbytes, fitted.links[name], per_node, chunks)

    best = min((name for name in CANDIDATES if name in fitted.links), key=cost)
    # a hand-written algorithm must promise a clear gain: within the fit's error the backend's
    # own is the safer choice
    if "native" in fitted.links and cost(best) > (1 - NATIVE_MARGIN) * cost("native"):
        return "native"
    return best


def use(fitted: Fitted | None) -> None:
    """Make ``auto`` go by ``fitted`` in this process (every rank of a group must agree)."""
    global _FITTED, _LOADED
    _FITTED, _LOADED = fitted, True
    auto_choice.cache_clear()


@functools.lru_cache(maxsize=1024)
def auto_choice(nbytes: int, n: int, per_node: int) -> str:
    """``choose`` by the process's fit, remembered per message shape (it is asked every call)."""
    return choose(nbytes, n, per_node)


def predict_two_level(
    topology: str, n: int, per_node: int, nbytes: int, intra: Link, inter: Link, chunks: int = 1
) -> float:
    """All-reduce time on n ranks in nodes of ``per_node``, links ``intra`` inside a node and
    ``inter`` between nodes. A flat algorithm spanning nodes runs at the pace of its slowest link;
    the hierarchical ones use each link for its own level."""
    g = max(1, min(per_node, n))
    m = math.ceil(n / g)
    flat = inter if m > 1 else intra
    if topology in ("star", "tree", "ring"):
        return predict(topology, n, nbytes, flat, per_node, chunks)
    if topology == "hier":
        inside = predict("star", g, nbytes, intra)
        return inside + predict("ring", m, nbytes, inter)
    if topology == "hier-scatter":
        inside = 2.0 * (g - 1) * (intra.alpha + nbytes / g * intra.beta) if g > 1 else 0.0
        return inside + predict("ring", m, nbytes // g, inter)
    raise ValueError(f"no two-level model for {topology!r}")
