"""All-reduce schedules as data: which rank sends which part of the buffer to whom, step by step.

A ``Schedule`` gives every rank of a group an ordered list of steps. A step is a set of operations
that may run at once: send a region of the buffer to a peer, or receive a region from a peer and
either add it into the local region (``reduce``) or overwrite it (``copy``). Within a step every
receive lands in a scratch buffer first and is applied, in the order listed, once the whole step
has completed; so a step never reads what it writes, and the order of additions is fixed by the
schedule, not by timing. Every reduced value is computed on exactly one rank and copied to the
others, so every rank ends with the same bits.

A region is a path of near-equal splits: ``((2, 4),)`` is the third of four parts of the buffer,
``((2, 4), (0, 3))`` the first third of that part. Parts of n elements split into p are as equal as
possible, the first n % p parts one element longer, so any size works, 0 and 1 included.

Nothing here touches processes or tensors: ``topologies.simulate`` runs schedules in one process,
``comm.allreduce`` runs them with torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Region = tuple[tuple[int, int], ...]
WHOLE: Region = ()
RESOLVED_KEPT = 1024  # resolved (rank, size) pairs a schedule remembers, the oldest dropped first
# a step resolved for one buffer: (kind, peer, start, stop) per operation, empty ranges left out
Resolved = tuple[tuple[str, int, int, int], ...]


@dataclass(frozen=True)
class Op:
    kind: str  # "send" | "reduce" | "copy"
    peer: int
    region: Region = WHOLE


@dataclass
class Schedule:
    name: str
    n: int
    steps: list[list[list[Op]]] = field(default_factory=list)  # [rank][step] -> ops
    _resolved: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.steps:
            self.steps = [[] for _ in range(self.n)]

    def resolved(self, rank: int, numel: int) -> tuple[Resolved, ...]:
        """``rank``'s steps for a buffer of ``numel`` elements, regions turned into [start, stop)
        offsets, remembered per (rank, numel): an executor asks on every call, with a handful of
        sizes. Operations on empty ranges and steps left with none are dropped."""
        key = (rank, numel)
        if key not in self._resolved:
            if len(self._resolved) >= RESOLVED_KEPT:  # a server sees as many sizes as batch shapes
                self._resolved.pop(next(iter(self._resolved)))
            steps = []
            for step in self.steps[rank]:
                ops = tuple((op.kind, op.peer, *span(op.region, numel)) for op in step)
                ops = tuple(op for op in ops if op[2] < op[3])
                if ops:
                    steps.append(ops)
            self._resolved[key] = tuple(steps)
        return self._resolved[key]

    def add(self, rank: int, *ops: Op) -> None:
        """Append one step of ``ops`` to ``rank``'s list."""
        if ops:
            self.steps[rank].append(list(ops))
            self._resolved.clear()

    def extend(self, other: Schedule, ranks: list[int] | None = None) -> Schedule:
        """Append ``other`` (a schedule over ``len(ranks)`` ranks, numbered 0..) after this one,
        its rank i played by our rank ``ranks[i]``."""
        ranks = list(range(self.n)) if ranks is None else ranks
        for local, steps in enumerate(other.steps):
            for step in steps:
                self.add(ranks[local], *(Op(op.kind, ranks[op.peer], op.region) for op in step))
        return self

    def within(self, region: Region) -> Schedule:
        """The same schedule applied to ``region`` of the buffer instead of the whole."""
        out = Schedule(self.name, self.n)
        for rank, steps in enumerate(self.steps):
            for step in steps:
                out.add(rank, *(Op(op.kind, op.peer, region + op.region) for op in step))
        return out

    def messages(self) -> int:
        return sum(op.kind == "send" for steps in self.steps for step in steps for op in step)


def span(region: Region, n: int) -> tuple[int, int]:
    """[start, stop) of ``region`` in a buffer of ``n`` elements."""
    start, stop = 0, n
    for index, parts in region:
        size = stop - start
        base, extra = divmod(size, parts)
        lo = start + index * base + min(index, extra)
        start, stop = lo, lo + base + (1 if index < extra else 0)
    return start, stop


def star(n: int, root: int = 0) -> Schedule:
    """Every rank sends its buffer to the root, which adds them in rank order and sends the sum
    back. 2(n - 1) messages of the whole buffer, all through the root."""
    s = Schedule("star", n)
    others = [r for r in range(n) if r != root]
    for r in others:
        s.add(r, Op("send", root))
    s.add(root, *(Op("reduce", r) for r in others))
    s.add(root, *(Op("send", r) for r in others))
    for r in others:
        s.add(r, Op("copy", root))
    return s


def tree(n: int, arity: int = 2, chunks: int = 1) -> Schedule:
    """Reduce up a k-ary tree rooted at rank 0 (children of i: k*i+1 .. k*i+k), then broadcast
    down it. With ``chunks`` > 1 the buffer goes in that many pieces, and a rank passes piece j on
    in the same step as it takes in piece j + 1, so that the levels of the tree work on different
    pieces at the same time (pipelining)."""
    s = Schedule("tree" if chunks == 1 else f"tree/{chunks}", n)
    if n == 1:
        return s
    children = {i: [c for c in range(arity * i + 1, arity * i + arity + 1) if c < n] for i in range(n)}
    parent = {c: i for i, cs in children.items() for c in cs}
    parts = [((j, chunks),) if chunks > 1 else WHOLE for j in range(chunks)]
    for r in range(n):
        up = [parent[r]] if r in parent else []
        for j in range(chunks + 1):  # reduce: piece j - 1 goes up while piece j comes in
            sends = [Op("send", p, parts[j - 1]) for p in up] if j > 0 else []
            recvs = [Op("reduce", c, parts[j]) for c in children[r]] if j < chunks else []
            s.add(r, *sends, *recvs)
        for j in range(chunks + 1):  # broadcast: piece j - 1 goes down while piece j comes in
            sends = [Op("send", c, parts[j - 1]) for c in children[r]] if j > 0 else []
            recvs = [Op("copy", p, parts[j]) for p in up] if j < chunks else []
            s.add(r, *sends, *recvs)
    return s


def ring(n: int, pieces: int = 1) -> Schedule:
    """Reduce-scatter then all-gather around the ring r -> r + 1, the buffer in n parts: each rank
    sends 2(n - 1) messages of 1/n of the buffer, the bandwidth-optimal all-reduce. With ``pieces``
    > 1 each message goes in that many pieces, so that adding one piece overlaps the next's
    transfer."""
    s = Schedule("ring" if pieces == 1 else f"ring/{pieces}", n)
    if n == 1:
        return s

    def both(send_to, send_part, kind, recv_from, recv_part):
        ops = []
        for k in range(pieces):
            sub = ((k, pieces),) if pieces > 1 else ()
            ops += [
                Op("send", send_to, ((send_part % n, n), *sub)),
                Op(kind, recv_from, ((recv_part % n, n), *sub)),
            ]
        return ops

    for r in range(n):
        right, left = (r + 1) % n, (r - 1) % n
        for k in range(n - 1):  # after this, rank r holds the sum of part r + 1
            s.add(r, *both(right, r - k, "reduce", left, r - k - 1))
        for k in range(n - 1):
            s.add(r, *both(right, r + 1 - k, "copy", left, r - k))
    return s


def hierarchical(n: int, per_node: int, variant: str = "reduce") -> Schedule:
    """Two levels: ranks grouped by node (``per_node`` consecutive ranks; the last node may have
    fewer), so that only the node leaders (or one rank per part) cross between nodes.

    ``reduce``: intra-node reduce to the leader (first rank of the node), a ring all-reduce among
    the leaders, intra-node broadcast. ``scatter``: intra-node reduce-scatter (each rank of a node
    owns one of per_node parts), a ring all-reduce of each part among the ranks owning it across
    nodes, intra-node all-gather: every rank crosses nodes, with 1/per_node of the data.
    """
    if per_node < 1:
        raise ValueError(f"per_node must be >= 1, got {per_node}")
    nodes = [list(range(i, min(i + per_node, n))) for i in range(0, n, per_node)]
    s = Schedule(f"hier-{variant}", n)
    if variant == "reduce":
        for node in nodes:
            s.extend(star(len(node)), node)
        s.extend(ring(len(nodes)), [node[0] for node in nodes])
        for node in nodes:
            s.extend(_broadcast_from_first(len(node)), node)
    elif variant == "scatter":
        g = per_node
        for node in nodes:
            s.extend(_reduce_scatter(len(node), g), node)
        for j in range(g):  # ranks owning part j, one per node that has a rank j
            owners = [node[j] for node in nodes if j < len(node)]
            # a short last node has no rank j for j >= its size: its first rank owns those parts
            owners += [node[0] for node in nodes if j >= len(node)]
            s.extend(ring(len(owners)).within(((j, g),)), owners)
        for node in nodes:
            s.extend(_all_gather(len(node), g), node)
    else:
        raise ValueError(f"unknown hierarchical variant {variant!r}")
    return s


def _broadcast_from_first(n: int) -> Schedule:
    s = Schedule("bcast", n)
    s.add(0, *(Op("send", r) for r in range(1, n)))
    for r in range(1, n):
        s.add(r, Op("copy", 0))
    return s


def _owner(j: int, n: int) -> int:
    """Which of n ranks owns part j of g parts (n <= g): rank j, or rank 0 for parts past n."""
    return j if j < n else 0


def _reduce_scatter(n: int, g: int) -> Schedule:
    """Buffer in g parts; part j is summed on its owner, everyone else sending theirs directly."""
    s = Schedule("reduce-scatter", n)
    for r in range(n):
        sends = [Op("send", _owner(j, n), ((j, g),)) for j in range(g) if _owner(j, n) != r]
        recvs = [
            Op("reduce", p, ((j, g),)) for j in range(g) if _owner(j, n) == r for p in range(n) if p != r
        ]
        s.add(r, *sends, *recvs)
    return s


def _all_gather(n: int, g: int) -> Schedule:
    s = Schedule("all-gather", n)
    for r in range(n):
        sends = [Op("send", p, ((j, g),)) for j in range(g) if _owner(j, n) == r for p in range(n) if p != r]
        recvs = [Op("copy", _owner(j, n), ((j, g),)) for j in range(g) if _owner(j, n) != r]
        s.add(r, *sends, *recvs)
    return s


# every schedule ``build`` knows, by the number of steps on its critical path (star 2, tree 2 x
# depth, ring 2(n - 1), the two-level ones more); "hier-reduce" is another name for "hier"
TOPOLOGIES = ("star", "tree", "ring", "hier", "hier-scatter")
TREE_CHUNK_BYTES = 1 << 20
MAX_TREE_CHUNKS = 8
# a ring message goes in pieces of this size: pieces overlap transfer and addition where every
# rank has a core of its own; where ranks share cores (4 on 2 here) they do not, and 1 MiB pieces
# ran the ring at 0.81-0.82x of gloo's own at 16-32 MiB against 0.89-0.92x for 4 MiB ones
RING_PIECE_BYTES = 4 << 20
MAX_RING_PIECES = 8


def tree_chunks(nbytes: int) -> int:
    """Pieces a tree all-reduce pipelines a message of ``nbytes`` in."""
    return max(1, min(MAX_TREE_CHUNKS, nbytes // TREE_CHUNK_BYTES))


def ring_pieces(nbytes: int, n: int) -> int:
    """Pieces each ring message of a ``nbytes`` all-reduce over n ranks goes in."""
    return max(1, min(MAX_RING_PIECES, nbytes // (n * RING_PIECE_BYTES)))


def chunks_for(algorithm: str, nbytes: int, n: int) -> int:
    """The pieces the named algorithm splits an ``nbytes`` all-reduce over n ranks into: the
    ``chunks`` to ``build`` its schedule with, for the executor and the cost model alike."""
    if algorithm == "tree":
        return tree_chunks(nbytes)
    return ring_pieces(nbytes, n) if algorithm == "ring" else 1


def build(name: str, n: int, per_node: int | None = None, chunks: int = 1) -> Schedule:
    """The schedule called ``name`` for n ranks (``per_node`` for hierarchical)."""
    if n < 1:
        raise ValueError(f"a group has at least one rank, got {n}")
    if name == "star":
        return star(n)
    if name == "tree":
        return tree(n, 2, chunks)
    if name == "ring":
        return ring(n, chunks)
    if name in ("hier", "hier-reduce", "hier-scatter"):
        variant = "scatter" if name == "hier-scatter" else "reduce"
        return hierarchical(n, per_node or max(1, n // 2), variant)
    raise ValueError(f"unknown topology {name!r} (known: {', '.join(TOPOLOGIES)})")
