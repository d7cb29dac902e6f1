"""The alpha-beta cost model of the all-reduce topologies, its fit, and ``auto``'s choice.

A message of S bytes over one link costs alpha + S * beta (latency, then seconds per byte). Each
topology's all-reduce of S bytes over n ranks is a number of such latencies and bytes on its
critical path, ``t = a * alpha + b * S * beta``; ``coefficients`` gives (a, b):

- star: 2(n - 1) messages of S, serialised at the root: a = b = 2(n - 1)
- tree (binary, depth d = ceil(log2 n)), in k pipelined pieces: a = 2d + k, b = (2d + k) / k
- ring: a = 2(n - 1), b = 2(n - 1) / n
- hier (g ranks per node, m nodes): a star inside each node and a ring across the leaders:
  a = 2(g - 1) + 2(m - 1), b = 2(g - 1) + 2(m - 1) / m
- hier-scatter: reduce-scatter and all-gather inside the node on S / g, a ring across nodes on
  S / g: a = 2(g - 1) + 2(m - 1), b = 2(g - 1) / g + 2(m - 1) / (m g)
- native: the backend's own algorithm, measured rather than derived: a = b = 1 on its own
  (alpha, beta).

``fit`` finds alpha and beta from measured times by least squares; ``auto`` picks the topology
with the lowest predicted time, the way NCCL's tuner picks an algorithm per size.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

TOPOLOGY_FILE = Path(__file__).resolve().parent.parent / "topologies" / "fitted.json"
CANDIDATES = ("native", "star", "tree", "ring", "hier", "hier-scatter")


@dataclass(frozen=True)
class Link:
    alpha: float  # seconds per message
    beta: float  # seconds per byte


def coefficients(topology: str, n: int, per_node: int = 1, chunks: int = 1) -> tuple[float, float]:
    if n <= 1:
        return 0.0, 0.0
    if topology == "native":
        return 1.0, 1.0
    if topology == "star":
        return 2.0 * (n - 1), 2.0 * (n - 1)
    if topology == "tree":
        d = math.ceil(math.log2(n))
        return 2 * d + chunks, (2 * d + chunks) / chunks
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
    a, b = coefficients(topology, n, per_node, chunks)
    return a * link.alpha + b * nbytes * link.beta


def fit(samples: list[tuple[float, float, float]]) -> Link:
    """Least-squares (alpha, beta) >= 0 from samples (a, b * S, seconds), relative error weighted
    so that small messages count as much as large ones."""
    # minimise sum((a*alpha + bs*beta - t) / t)^2: normal equations of the weighted problem
    saa = sab = sbb = sat = sbt = 0.0
    for a, bs, t in samples:
        w = 1.0 / (t * t)
        saa, sab, sbb = saa + w * a * a, sab + w * a * bs, sbb + w * bs * bs
        sat, sbt = sat + w * a * t, sbt + w * bs * t
    det = saa * sbb - sab * sab
    if det <= 0:
        raise ValueError("need samples of at least two different shapes to fit alpha and beta")
    alpha = (sat * sbb - sab * sbt) / det
    beta = (saa * sbt - sab * sat) / det
    if alpha < 0:  # bandwidth-only fit
        alpha, beta = 0.0, sbt / sbb
    if beta < 0:  # latency-only fit
        alpha, beta = sat / saa, 0.0
    return Link(alpha, beta)


@dataclass(frozen=True)
class Fitted:
    """Fitted links of one machine: the hand-written topologies share one, native has its own."""

    topologies: Link
    native: Link
    source: str = "built-in"


# From benchmarks/collectives.py on the project's 2-core CPU machine (gloo, 4 ranks), used when
# topologies/fitted.json is absent; see BENCHMARKS.md.
DEFAULT = Fitted(topologies=Link(alpha=1.0e-3, beta=2.0e-10), native=Link(alpha=6.0e-3, beta=3.0e-10))


def load(path: Path = TOPOLOGY_FILE) -> Fitted:
    if not path.is_file():
        return DEFAULT
    raw = json.loads(path.read_text())
    return Fitted(Link(**raw["topologies"]), Link(**raw["native"]), str(path))


_FITTED: Fitted | None = None


def choose(nbytes: int, n: int, per_node: int, fitted: Fitted | None = None) -> str:
    """The topology with the lowest predicted all-reduce time for ``nbytes`` over ``n`` ranks."""
    global _FITTED
    if fitted is None:
        _FITTED = _FITTED or load()
        fitted = _FITTED
    from comm.allreduce import tree_chunks

    def cost(name: str) -> float:
        link = fitted.native if name == "native" else fitted.topologies
        chunks = tree_chunks(nbytes) if name == "tree" else 1
        return predict(name, n, nbytes, link, per_node, chunks)

    return min(CANDIDATES, key=cost)
