"""Executors run step plans on a model replica: in this process, or over tp x pp ranks.

The generation loop (``engine.generate``) decides what runs; an executor runs it and returns the
sampled ids. A ``Plan`` is one forward pass of one micro-batch: token ids, the position each row
starts at, the cache rows, which position's logits to sample, and the sampling parameters.

Across ranks, the replica's head (pipeline stage 0, tp rank 0) sends each plan to every other rank
of the replica as typed int64/float32 tensors, point to point, so a rank that is busy with another
micro-batch picks it up when it gets there. Stage s hands its hidden states to stage s + 1 (tp rank
to tp rank); the last stage gathers the vocabulary-parallel logits on its tp rank 0, which samples
and sends the ids back to the head. With pp stages and pp micro-batches in flight, every stage
works on a different micro-batch at the same time.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from engine.kv_cache import ContiguousKVCache, make_step
from engine.model import CausalLM
from engine.sampling import SamplingBatch, sample

ALLOC, STEP, SHUTDOWN = 1, 2, 3
TAG_PLAN, TAG_HIDDEN, TAG_IDS = 11, 12, 13
_HEADER = 7


@dataclass
class Plan:
    kind: int = STEP
    mb: int = 0
    tokens: list[list[int]] = field(default_factory=list)  # [B][S], right-padded with 0
    starts: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    logit_index: list[int] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)
    top_p: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    counters: list[int] = field(default_factory=list)
    record_logits: bool = False
    cache_rows: int = 0  # ALLOC
    cache_len: int = 0  # ALLOC

    def sampling(self, device) -> SamplingBatch:
        return SamplingBatch.build(
            self.temperature, self.top_k, self.top_p, self.seeds, self.counters, device
        )

    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        B = len(self.tokens)
        S = len(self.tokens[0]) if B else 0
        head = [self.kind, self.mb, B, S, int(self.record_logits), self.cache_rows, self.cache_len]
        ints = head + [t for row in self.tokens for t in row]
        ints += self.starts + self.rows + self.logit_index + self.top_k + self.seeds + self.counters
        return torch.tensor(ints, dtype=torch.int64), torch.tensor(
            self.temperature + self.top_p, dtype=torch.float32
        )

    @classmethod
    def decode(cls, ints: torch.Tensor, floats: torch.Tensor) -> Plan:
        v = ints.tolist()
        kind, mb, B, S, record, cache_rows, cache_len = v[:_HEADER]
        at = _HEADER + B * S
        tokens = [v[_HEADER + b * S : _HEADER + (b + 1) * S] for b in range(B)]
        cols = [v[at + i * B : at + (i + 1) * B] for i in range(6)]
        f = floats.tolist()
        return cls(
            kind,
            mb,
            tokens,
            *cols[:3],
            f[:B],
            cols[3],
            f[B:],
            cols[4],
            cols[5],
            bool(record),
            cache_rows,
            cache_len,
        )


class LocalExecutor:
    """The whole model in this process."""

    def __init__(self, model: CausalLM, device: torch.device):
        self.model, self.device = model, device
        self.windows = set(model.config.sliding_windows)
        self.dtype = next(model.parameters()).dtype
        self.cache = None
        self.results: dict[int, tuple[list[int], torch.Tensor | None]] = {}

    def begin(self, rows: int, length: int) -> None:
        cfg = self.model.config
        self.cache = ContiguousKVCache(
            self.model.layer_ids, rows, length, self.model.kv_heads, cfg.head_dim, self.dtype, self.device
        )

    def submit(self, plan: Plan) -> None:
        logits = self.model.gather_logits(forward(self.model, plan, self.cache, self.windows, self.device))
        ids = sample(logits, plan.sampling(self.device)).tolist()
        self.results[plan.mb] = (ids, logits if plan.record_logits else None)

    def result(self, mb: int) -> tuple[list[int], torch.Tensor | None]:
        return self.results.pop(mb)

    def shutdown(self) -> None:
        self.cache = None


def forward(model: CausalLM, plan: Plan, cache, windows, device, x: torch.Tensor | None = None):
    tokens = torch.tensor(plan.tokens, dtype=torch.long, device=device)
    index = torch.tensor(plan.logit_index, dtype=torch.long, device=device)
    step = make_step(tokens, plan.starts, plan.rows, windows, index)
    return model(tokens if x is None else x, step, cache)


@dataclass(frozen=True)
class ReplicaRanks:
    """Where this process sits in its replica, and the global ranks it talks to."""

    rank: int
    head: int  # stage 0, tp rank 0: runs the generation loop
    members: tuple[int, ...]  # every rank of the replica
    prev: int | None  # same tp rank, previous stage
    next: int | None  # same tp rank, next stage
    sampler: int  # last stage, tp rank 0
    is_sampler: bool


def comm_device(device: torch.device) -> torch.device:
    """Where tensors for point-to-point messages live: the GPU under NCCL, else the CPU."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


class Outbox:
    """Sends in flight; their tensors stay referenced until each send completes."""

    def __init__(self):
        self.items: collections.deque = collections.deque()

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        self.items.append((dist.isend(tensor, dst, tag=tag), tensor))
        while self.items and self.items[0][0].is_completed():
            self.items.popleft()

    def flush(self) -> None:
        for work, _ in self.items:
            work.wait()
        self.items.clear()


class DistributedExecutor:
    """The head's side of a replica spread over ranks; the others run ``follow``."""

    def __init__(self, model: CausalLM, ranks: ReplicaRanks, device: torch.device, check: bool = False):
        self.model, self.ranks, self.device, self.check = model, ranks, device, check
        self.local = LocalExecutor(model, device)
        self.outbox = Outbox()
        self.results: dict[int, tuple[list[int], torch.Tensor | None]] = {}

    def _broadcast(self, plan: Plan) -> None:
        dev = comm_device(self.device)
        ints, floats = (t.to(dev) for t in plan.encode())
        header = torch.tensor([ints.numel(), floats.numel()], dtype=torch.int64, device=dev)
        for dst in self.ranks.members:
            if dst != self.ranks.rank:
                for t in (header, ints, floats):
                    self.outbox.send(t, dst, TAG_PLAN)

    def begin(self, rows: int, length: int) -> None:
        self._broadcast(Plan(kind=ALLOC, cache_rows=rows, cache_len=length))
        self.local.begin(rows, length)

    def submit(self, plan: Plan) -> None:
        self._broadcast(plan)
        cache, windows = self.local.cache, self.local.windows
        out = run_stage(self.model, plan, cache, windows, self.ranks, self.device, self.outbox, self.check)
        if out is not None:
            self.results[plan.mb] = out

    def result(self, mb: int) -> tuple[list[int], torch.Tensor | None]:
        if mb in self.results:
            return self.results.pop(mb)
        # the last stage answers micro-batches in the order they were submitted
        return recv_ids(self.ranks.sampler, self.model.config.vocab_size, self.device)

    def shutdown(self) -> None:
        self._broadcast(Plan(kind=SHUTDOWN))
        self.outbox.flush()


def run_stage(model: CausalLM, plan: Plan, cache, windows, ranks: ReplicaRanks, device, outbox, check):
    """Run this rank's part of one plan. Returns (ids, logits or None) where the sampling rank is
    the head itself; elsewhere hands the result on and returns None."""
    x = None
    if ranks.prev is not None:
        B, S = len(plan.tokens), len(plan.tokens[0])
        dtype = next(model.parameters()).dtype
        x = torch.empty(B, S, model.config.hidden_size, dtype=dtype, device=device)
        dist.recv(x, ranks.prev, tag=TAG_HIDDEN)
    out = forward(model, plan, cache, windows, device, x)
    if ranks.next is not None:
        outbox.send(out.contiguous(), ranks.next, TAG_HIDDEN)
        return None
    logits = model.gather_logits(out, everywhere=check)
    if logits is None:  # a tp rank other than the sampler
        return None
    ids = sample(logits, plan.sampling(device))
    if check:
        _check_identical(model, logits, ids)
    if not ranks.is_sampler:
        return None
    kept = logits if plan.record_logits else None
    if ranks.sampler == ranks.head:
        return ids.tolist(), kept
    # without waiting: the head may still be busy with its own stage of another micro-batch
    dev = comm_device(device)
    outbox.send(torch.tensor([ids.numel(), int(kept is not None)], device=dev), ranks.head, TAG_IDS)
    outbox.send(ids.to(dev).contiguous(), ranks.head, TAG_IDS)
    if kept is not None:
        outbox.send(kept.to(dev).contiguous(), ranks.head, TAG_IDS)
    return None


def _check_identical(model: CausalLM, logits: torch.Tensor, ids: torch.Tensor) -> None:
    """Every tp rank of the last stage holds the same logits and chose the same ids, bit for bit."""
    from comm.collectives import all_gather_last_dim

    tp = model.tp
    if tp.size == 1:
        return
    both = torch.cat((logits.reshape(-1), ids.to(logits.dtype)))[None]
    everyone = all_gather_last_dim(both, tp).view(tp.size, -1)
    if not all(torch.equal(everyone[0], everyone[r]) for r in range(1, tp.size)):
        raise RuntimeError(f"tensor-parallel ranks {list(tp.ranks)} disagree on logits or sampled ids")


def recv_ids(src: int, vocab: int, device) -> tuple[list[int], torch.Tensor | None]:
    dev = comm_device(device)
    header = torch.empty(2, dtype=torch.int64, device=dev)
    dist.recv(header, src, tag=TAG_IDS)
    n, with_logits = header.tolist()
    ids = torch.empty(n, dtype=torch.int64, device=dev)
    dist.recv(ids, src, tag=TAG_IDS)
    logits = None
    if with_logits:
        logits = torch.empty(n, vocab, dtype=torch.float32, device=dev)
        dist.recv(logits, src, tag=TAG_IDS)
    return ids.tolist(), logits


def recv_plan(src: int, device) -> Plan:
    dev = comm_device(device)
    header = torch.empty(2, dtype=torch.int64, device=dev)
    dist.recv(header, src, tag=TAG_PLAN)
    n_ints, n_floats = header.tolist()
    ints = torch.empty(n_ints, dtype=torch.int64, device=dev)
    floats = torch.empty(n_floats, dtype=torch.float32, device=dev)
    dist.recv(ints, src, tag=TAG_PLAN)
    dist.recv(floats, src, tag=TAG_PLAN)
    return Plan.decode(ints.cpu(), floats.cpu())


def follow(model: CausalLM, ranks: ReplicaRanks, device: torch.device, check: bool = False) -> None:
    """A non-head rank's loop: run each plan the head sends until it says to shut down."""
    local = LocalExecutor(model, device)
    outbox = Outbox()
    while True:
        plan = recv_plan(ranks.head, device)
        if plan.kind == SHUTDOWN:
            break
        if plan.kind == ALLOC:
            local.begin(plan.cache_rows, plan.cache_len)
            continue
        run_stage(model, plan, local.cache, local.windows, ranks, device, outbox, check)
    outbox.flush()
