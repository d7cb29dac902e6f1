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

``fit`` finds alpha and beta from measured times (benchmarks/collectives.py writes them to
topologies/fitted.json), one pair per protocol regime of the backend: small messages, and the
large ones in one or two regimes where the measurements show a change of protocol. ``auto`` picks
the algorithm with the lowest predicted time, the way NCCL's tuner picks an algorithm and a
protocol per size from per-protocol latencies and bandwidths; where the predictions are closer
than the fit's errors, it keeps the simpler algorithm (``choose``).
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from topologies.schedule import TOPOLOGIES, chunks_for

TOPOLOGY_FILE = Path(__file__).resolve().parent.parent / "topologies" / "fitted.json"
# in order of preference: the backend's own, then the hand-written ones in TOPOLOGIES' order (by
# the number of steps on their critical path)
CANDIDATES = ("native", *TOPOLOGIES)
# what ``comm.allreduce.all_reduce`` (and ``--allreduce``) takes: a candidate, or auto's choice
ALGORITHMS = (*CANDIDATES, "auto")
NATIVE_MARGIN = 0.15  # auto leaves native only for a predicted gain larger than this
# a hand-written algorithm later in CANDIDATES is taken over an earlier one only for a predicted
# gain larger than this: the fit's errors are several percent, so a closer call is a coin toss
TIE_MARGIN = 0.05


@dataclass(frozen=True)
class Link:
    """What a message costs on one link: alpha + S * beta for S bytes.

    Backends change protocol with the message size, and each protocol has a latency and a
    bandwidth of its own: NCCL's LL, LL128 and Simple; gloo over TCP, where a message that fits
    the socket buffers is written without waiting for the receiver, and a small message costs
    none of a large one's set-up. ``regimes`` holds ``(below, alpha, beta)`` for the messages
    under ``below`` bytes, smallest first; larger messages pay ``alpha`` and ``beta``."""

    alpha: float  # seconds per message
    beta: float  # seconds per byte
    # whether the pieces of a chunked tree overlap on this machine (they need a core per rank)
    pipelined: bool = True
    regimes: tuple[tuple[int, float, float], ...] = ()

    def at(self, nbytes: int) -> tuple[float, float]:
        """(alpha, beta) of a message of ``nbytes``."""
        for below, alpha, beta in self.regimes:
            if nbytes < below:
                return alpha, beta
        return self.alpha, self.beta


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
    alpha, beta = link.at(nbytes)
    return a * alpha + b * nbytes * beta


SMALL_BYTES = 1 << 10  # messages this small measure the latency alone
FIT_FROM_BYTES = 64 << 10  # alpha and beta of the large messages are fitted from this size up

# a sample of one algorithm's measurements: (a, b, seconds, S) with (a, b) its coefficients
Sample = tuple[float, float, float, int]


def relative_errors(link: Link, samples: list[Sample]) -> list[float]:
    """|predicted - measured| / measured of the samples from 64 KiB up."""
    errors = []
    for a, b, t, size in samples:
        if size >= FIT_FROM_BYTES:
            alpha, beta = link.at(size)
            errors.append(abs(a * alpha + b * size * beta - t) / t)
    return errors


def _golden(f, lo: float, hi: float, steps: int = 60) -> float:
    """The minimiser of a convex function of one variable on [lo, hi]."""
    r = (5**0.5 - 1) / 2
    x1, x2 = hi - r * (hi - lo), lo + r * (hi - lo)
    f1, f2 = f(x1), f(x2)
    for _ in range(steps):
        if f1 <= f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - r * (hi - lo)
            f1 = f(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + r * (hi - lo)
            f2 = f(x2)
    return (lo + hi) / 2


def _minimax(columns: list[list[float]], targets: list[float], measured: list[float]) -> list[float]:
    """x >= 0 (one or two unknowns) minimising max_i |sum_j columns[j][i] x_j - targets_i| /
    measured_i: the worst relative error, which is what the model is held to. The objective is
    convex, so nested golden-section searches find it."""

    def worst(x: list[float]) -> float:
        return max(
            abs(sum(c[i] * xj for c, xj in zip(columns, x)) - y) / t
            for i, (y, t) in enumerate(zip(targets, measured))
        )

    # past these bounds every prediction is at least twice its measurement
    bounds = [2 * max((t / ci for ci, t in zip(c, measured) if ci > 0), default=0.0) for c in columns]
    if len(columns) == 1:
        return [_golden(lambda x: worst([x]), 0.0, bounds[0])]
    inner = lambda x0: _golden(lambda x1: worst([x0, x1]), 0.0, bounds[1])  # noqa: E731
    x0 = _golden(lambda x0: worst([x0, inner(x0)]), 0.0, bounds[0])
    return [x0, inner(x0)]


# a second regime among the large messages is looked for only where one line misses some size
# by more than this (less is the noise of a run on shared cores), and kept only where it halves
# the worst error
KNEE_FROM = 0.10


def _line(samples: list[Sample]) -> tuple[float, float, float]:
    """alpha and beta minimising the worst relative error over ``samples``, and that error."""
    columns = [[a for a, *_ in samples], [b * size for _, b, _, size in samples]]
    measured = [t for _, _, t, _ in samples]
    alpha, beta = _minimax(columns, measured, measured)
    worst = max(abs(a * alpha + b * size * beta - t) / t for a, b, t, size in samples)
    return alpha, beta, worst


def fit(samples: list[Sample]) -> Link:
    """A link fitted to samples of one algorithm. Messages of at most 1 KiB, where the bytes cost
    next to nothing, give the latency of the messages under 64 KiB (their median). From 64 KiB up,
    alpha and beta minimise the worst relative error, the figure the model is held to; where one
    line misses by more than ``KNEE_FROM``, the large messages may split at one size into two
    regimes (two sizes at least on each side), each with its own line."""
    small = [t / a for a, _, t, size in samples if size <= SMALL_BYTES and a > 0]
    if not small:
        raise ValueError(f"fitting alpha needs messages of at most {SMALL_BYTES} bytes")
    big = [(a, b, t, size) for a, b, t, size in samples if size >= FIT_FROM_BYTES and b > 0]
    sizes = sorted({size for *_, size in big})
    if len(sizes) < 2:
        raise ValueError(f"fitting beta needs messages of two sizes of at least {FIT_FROM_BYTES} bytes")
    alpha, beta, worst = _line(big)
    regimes: tuple[tuple[int, float, float], ...] = ()
    if worst > KNEE_FROM:
        splits = []
        for knee in sizes[2:-1]:
            lower, upper = _line([s for s in big if s[3] < knee]), _line([s for s in big if s[3] >= knee])
            splits.append((max(lower[2], upper[2]), knee, lower, upper))
        if splits and min(splits)[0] < worst / 2:
            _, knee, lower, (alpha, beta, _) = min(splits)
            regimes = ((knee, lower[0], lower[1]),)
    below_beta = regimes[0][2] if regimes else beta
    return Link(alpha, beta, regimes=((FIT_FROM_BYTES, statistics.median(small), below_beta), *regimes))


@dataclass(frozen=True)
class Fitted:
    """A machine's measured links: one (alpha, beta) per algorithm, fitted to that algorithm's
    own times with its coefficients. (On an oversubscribed host, where ranks share cores, what a
    message costs depends on how many others are in flight, so one link does not fit them all.)"""

    links: dict[str, Link]
    source: str = ""


def load(path: Path = TOPOLOGY_FILE) -> Fitted | None:
    """The fit benchmarks/collectives.py wrote to ``path``; None where there is none."""
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        links = {}
        for name, link in raw["links"].items():
            regimes = tuple((int(below), float(a), float(b)) for below, a, b in link.get("regimes", ()))
            links[name] = Link(float(link["alpha"]), float(link["beta"]), bool(link["pipelined"]), regimes)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"{path}: not a fit of the all-reduce cost model ({type(e).__name__}: {e}); "
            "rerun benchmarks/collectives.py to write one"
        ) from e
    return Fitted(links, str(path))


_FITTED: Fitted | None = None
_LOADED = False


def choose(nbytes: int, n: int, per_node: int, fitted: Fitted | None = None) -> str:
    """The algorithm with the lowest predicted all-reduce time for ``nbytes`` over ``n`` ranks,
    from ``fitted`` or topologies/fitted.json, unless an algorithm earlier in ``CANDIDATES`` is
    predicted within the margins (``NATIVE_MARGIN``, ``TIE_MARGIN``); ``native`` when there is no
    fit to go by."""
    global _FITTED, _LOADED
    if fitted is None:
        if not _LOADED:
            _FITTED, _LOADED = load(), True
        fitted = _FITTED
    if fitted is None:
        return "native"

    def cost(name: str) -> float:
        return predict(name, n, nbytes, fitted.links[name], per_node, chunks_for(name, nbytes, n))

    best = None
    for name in CANDIDATES[1:]:
        if name in fitted.links and (best is None or cost(name) < (1 - TIE_MARGIN) * cost(best)):
            best = name
    # a hand-written algorithm must promise a clear gain: within the fit's error the backend's
    # own is the safer choice
    if best is None or ("native" in fitted.links and cost(best) > (1 - NATIVE_MARGIN) * cost("native")):
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
        alpha, beta = intra.at(nbytes // g)
        inside = 2.0 * (g - 1) * (alpha + nbytes / g * beta) if g > 1 else 0.0
        return inside + predict("ring", m, nbytes // g, inter)
    raise ValueError(f"no two-level model for {topology!r}")
