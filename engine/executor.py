"""Executors run step plans on a model replica: in this process, or over tp x pp ranks.

The generation loop (``engine.generate``) decides what runs; an executor runs it and returns the
sampled ids. A ``Plan`` is one forward pass of one micro-batch: token ids, the position each row
starts at, the cache rows, which position's logits to sample, and the sampling parameters.

Across ranks, the replica's head (pipeline stage 0, tp rank 0) sends each plan to every other rank
of the replica as typed int64/float32 tensors, point to point, so a rank that is busy with another
micro-batch picks it up when it gets there. Stage s hands its hidden states to stage s + 1 (tp rank
to tp rank); the last stage gathers the vocabulary-parallel logits on its tp rank 0, which samples
and sends the ids back to the head. With pp stages and pp micro-batches in flight, every stage
works on a different micro-batch at the same time. A plan with constrained rows carries their
token bitmasks as a third (int32) tensor, so that whichever rank samples applies them.
"""

from __future__ import annotations

import collections
import concurrent.futures
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from engine.compiled import CompiledDecode
from engine.kv_cache import ContiguousKVCache, PagedKVCache, make_step
from engine.model import CausalLM
from engine.sampling import Penalties, Sampled, SamplingBatch, sample_full

ALLOC, STEP, SHUTDOWN, ALLOC_PAGED, KEEPALIVE = 1, 2, 3, 4, 5
TAG_PLAN, TAG_HIDDEN, TAG_IDS = 11, 12, 13

# per-row columns of a plan, in wire order
_INT_ROWS = ("starts", "rows", "logit_index", "lengths", "top_k", "seeds", "counters", "prompt_lens")
_FLOAT_ROWS = ("temperature", "top_p", "presence", "frequency", "repetition")
_DEFAULTS = {"top_k": 0, "seeds": 0, "counters": 0, "prompt_lens": 0, "temperature": 0.0, "top_p": 1.0,
             "presence": 0.0, "frequency": 0.0, "repetition": 1.0}  # fmt: skip
_HEADER = ("kind", "mb", "B", "S", "W", "record_logits", "cache_rows", "cache_len", "logprobs", "M", "MW")


@dataclass
class Plan:
    """One forward pass of one micro-batch, and how to sample from it. Per-row columns left empty
    take their neutral value on the wire (cache rows 0..B-1, every token real, no penalties)."""

    kind: int = STEP
    mb: int = 0
    tokens: list[list[int]] = field(default_factory=list)  # [B][S], right-padded with 0
    starts: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # contiguous cache rows
    logit_index: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # real tokens per row (paged)
    block_tables: list[list[int]] = field(default_factory=list)  # paged cache blocks per row
    temperature: list[float] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)
    top_p: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    counters: list[int] = field(default_factory=list)
    presence: list[float] = field(default_factory=list)
    frequency: list[float] = field(default_factory=list)
    repetition: list[float] = field(default_factory=list)
    prompt_lens: list[int] = field(default_factory=list)
    histories: list[list[int]] = field(default_factory=list)  # prompt + output of penalised rows
    logprobs: int = -1  # top log-probabilities per row; -1: none
    # constrained rows and their token bitmasks (int32 [len(mask_rows), ceil(V / 32)]); on the head
    # a future of them, computed while the forward pass runs (engine.structured)
    mask_rows: list[int] = field(default_factory=list)
    masks: torch.Tensor | concurrent.futures.Future | None = None
    record_logits: bool = False
    cache_rows: int = 0  # ALLOC: rows; ALLOC_PAGED: blocks
    cache_len: int = 0  # ALLOC: positions per row; ALLOC_PAGED: block size

    def token_masks(self) -> torch.Tensor | None:
        """The constrained rows' bitmasks, once computed."""
        if isinstance(self.masks, concurrent.futures.Future):
            self.masks = self.masks.result()
        return self.masks

    def sampling(self, device) -> SamplingBatch:
        penalties = None
        if any(self.histories) or not all(
            Penalties.neutral(*r) for r in zip(self.presence, self.frequency, self.repetition)
        ):
            B = len(self.tokens)
            penalties = Penalties(
                list(self.presence or [0.0] * B),
                list(self.frequency or [0.0] * B),
                list(self.repetition or [1.0] * B),
                list(self.prompt_lens or [0] * B),
                [list(h) for h in (self.histories or [[]] * B)],
            )
        return SamplingBatch.build(
            self.temperature,
            self.top_k,
            self.top_p,
            self.seeds,
            self.counters,
            device,
            penalties,
            self.logprobs,
            self.mask_rows,
            self.token_masks(),
        )

    def _column(self, name: str, B: int, S: int) -> list:
        values = getattr(self, name)
        if values:
            if len(values) != B:
                raise ValueError(f"plan column {name!r} has {len(values)} rows, expected {B}")
            return list(values)
        default = {"rows": None, "lengths": S}.get(name, _DEFAULTS.get(name))
        return list(range(B)) if default is None else [default] * B

    def encode(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B = len(self.tokens)
        S = len(self.tokens[0]) if B else 0
        W = max((len(t) for t in self.block_tables), default=0)
        histories = self.histories or [[]] * B
        masks = self.token_masks() if self.mask_rows else torch.empty(0, 0, dtype=torch.int32)
        head = {"kind": self.kind, "mb": self.mb, "B": B, "S": S, "W": W,
                "record_logits": int(self.record_logits), "logprobs": self.logprobs,
                "cache_rows": self.cache_rows, "cache_len": self.cache_len,
                "M": len(self.mask_rows), "MW": masks.shape[1]}  # fmt: skip
        ints = [head[k] for k in _HEADER] + [t for row in self.tokens for t in row]
        ints += [b for t in self.block_tables for b in t + [0] * (W - len(t))]
        for name in _INT_ROWS:
            ints += self._column(name, B, S)
        ints += [len(h) for h in histories] if B else []
        ints += [t for h in histories for t in h]
        ints += list(self.mask_rows)
        floats = [x for name in _FLOAT_ROWS for x in self._column(name, B, S)]
        ints_t, floats_t = torch.tensor(ints, dtype=torch.int64), torch.tensor(floats, dtype=torch.float32)
        return ints_t, floats_t, masks.reshape(-1).contiguous()

    @classmethod
    def decode(cls, ints: torch.Tensor, floats: torch.Tensor, masks: torch.Tensor | None = None) -> Plan:
        v = ints.tolist()
        h = dict(zip(_HEADER, v[: len(_HEADER)]))
        B, S, W = h["B"], h["S"], h["W"]
        at = len(_HEADER)

        def take(n: int) -> list[int]:
            nonlocal at
            at += n
            return v[at - n : at]

        tokens = [take(S) for _ in range(B)]
        tables = [take(W) for _ in range(B)] if W else []
        cols = {name: take(B) for name in _INT_ROWS}
        lens = take(B)
        histories = [take(n) for n in lens]
        mask_rows = take(h["M"])
        f = floats.tolist()
        fcols = {name: f[i * B : (i + 1) * B] for i, name in enumerate(_FLOAT_ROWS)}
        return cls(
            kind=h["kind"],
            mb=h["mb"],
            tokens=tokens,
            block_tables=tables,
            histories=histories if any(histories) else [],
            logprobs=h["logprobs"],
            mask_rows=mask_rows,
            masks=masks.view(h["M"], h["MW"]) if h["M"] else None,
            record_logits=bool(h["record_logits"]),
            cache_rows=h["cache_rows"],
            cache_len=h["cache_len"],
            **cols,
            **fcols,
        )


class LocalExecutor:
    """The whole model in this process. ``decode_mode`` "compiled" runs the decode steps of a
    paged cache through ``engine.compiled`` (CUDA graphs on a GPU); "eager" runs every step as is.

    Batch generation asks for a cache of rows (``begin``): contiguous when eager; when compiled, a
    paged pool in which row r owns a fixed run of blocks, so that its decode steps are the
    compiled ones too. A new pool means new graphs, so the pool only grows, by powers of two, and
    a run of ``generate`` calls of similar sizes compiles once."""

    distributed = False
    keepalive_s = None  # nobody waits on this executor's plans
    ROW_BLOCK_SIZE = 16
    MIN_ROW_BLOCKS = 64  # the smallest pool (1024 positions), so that small calls share one

    def __init__(self, model: CausalLM, device: torch.device, decode_mode: str = "eager"):
        self.model, self.device = model, device
        self.windows = set(model.config.sliding_windows)
        self.dtype = next(model.parameters()).dtype
        self.cache = None
        self.decode_mode = decode_mode
        self.compiled: CompiledDecode | None = None
        self.row_tables: list[list[int]] | None = None  # the blocks of each row, in compiled rows mode
        self.results: dict[int, Sampled] = {}

    def begin(self, rows: int, length: int) -> None:
        """A cache for ``rows`` sequences of up to ``length`` positions."""
        cfg = self.model.config
        if self.decode_mode != "compiled":
            self.cache = ContiguousKVCache(
                self.model.layer_ids, rows, length, self.model.kv_heads, cfg.head_dim, self.dtype, self.device
            )
            return
        size = self.ROW_BLOCK_SIZE
        per_row = -(-length // size)
        needed = 1 + rows * per_row  # block 0 is reserved
        if self.compiled is None or self.cache.block_size != size or self.cache.num_blocks < needed:
            self.begin_paged(max(self.MIN_ROW_BLOCKS, 1 << (needed - 1).bit_length()), size)
        self.row_tables = [list(range(1 + r * per_row, 1 + (r + 1) * per_row)) for r in range(rows)]

    def begin_paged(self, num_blocks: int, block_size: int) -> None:
        """A paged cache of ``num_blocks`` blocks (the caller allocates them)."""
        cfg = self.model.config
        self.row_tables = None
        self.cache = PagedKVCache(
            self.model.layer_ids,
            num_blocks,
            block_size,
            self.model.kv_heads,
            cfg.head_dim,
            self.dtype,
            self.device,
        )
        if self.decode_mode == "compiled":
            self.compiled = CompiledDecode(self.model, self.cache, self.model.rotary.max_len, self.device)

    def warm_up(self, max_rows: int) -> list[int]:
        """Compile the decode steps of every batch size up to ``max_rows`` now (compiled mode)."""
        return self.compiled.warm_up(max_rows) if self.compiled is not None else []

    def keepalive(self) -> None:
        pass

    def run(self, plan: Plan) -> None:
        """Apply a control plan (ALLOC, ALLOC_PAGED, KEEPALIVE) here."""
        if plan.kind == ALLOC:
            self.begin(plan.cache_rows, plan.cache_len)
        elif plan.kind == ALLOC_PAGED:
            self.begin_paged(plan.cache_rows, plan.cache_len)

    def submit(self, plan: Plan) -> None:
        if self.row_tables is not None:  # a plan over cache rows, on the rows' blocks
            plan.block_tables = [self.row_tables[r] for r in plan.rows or range(len(plan.tokens))]
        if self.compiled is not None and is_decode(plan):
            logits = self.compiled([t[0] for t in plan.tokens], plan.starts, plan.block_tables)
        else:
            logits = forward(self.model, plan, self.cache, self.windows, self.device)
        self.results[plan.mb] = sample_plan(self.model.gather_logits(logits), plan, self.device)

    def result(self, mb: int) -> Sampled:
        return self.results.pop(mb)

    def shutdown(self) -> None:
        self.cache = self.compiled = self.row_tables = None


def is_decode(plan: Plan) -> bool:
    """A step of one token per row over a paged cache, logits of that token."""
    return (
        bool(plan.block_tables)
        and all(len(t) == 1 for t in plan.tokens)
        and all(n == 1 for n in plan.lengths or [1])
        and not any(plan.logit_index)
    )


def sample_plan(logits: torch.Tensor, plan: Plan, device) -> Sampled:
    ids, logprobs, top_ids = sample_full(logits, plan.sampling(device))
    return Sampled(ids.tolist(), logprobs, top_ids, logits if plan.record_logits else None)


def forward(model: CausalLM, plan: Plan, cache, windows, device, x: torch.Tensor | None = None):
    tokens = torch.tensor(plan.tokens, dtype=torch.long, device=device)
    index = torch.tensor(plan.logit_index, dtype=torch.long, device=device)
    B = len(plan.tokens)
    rows = plan.rows or list(range(B))
    if plan.block_tables:
        step = make_step(
            tokens,
            plan.starts,
            rows,
            windows,
            index,
            plan.block_tables,
            cache.block_size,
            plan.lengths or None,
        )
    else:
        step = make_step(tokens, plan.starts, rows, windows, index)
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
    """The head's side of a replica spread over ranks; the others run ``follow``.

    The other ranks wait for plans under the process group's timeout, so a head with nothing to
    run sends a keepalive plan at least every ``keepalive_s`` (a quarter of ``timeout_s``)."""

    distributed = True

    def __init__(
        self,
        model: CausalLM,
        ranks: ReplicaRanks,
        device: torch.device,
        check: bool = False,
        timeout_s: float = 60.0,
    ):
        self.model, self.ranks, self.device, self.check = model, ranks, device, check
        self.keepalive_s = timeout_s / 4
        self.local = LocalExecutor(model, device)
        self.outbox = Outbox()
        self.results: dict[int, Sampled] = {}

    def _broadcast(self, plan: Plan) -> None:
        dev = comm_device(self.device)
        ints, floats, masks = (t.to(dev) for t in plan.encode())
        header = torch.tensor([ints.numel(), floats.numel(), masks.numel()], dtype=torch.int64, device=dev)
        for dst in self.ranks.members:
            if dst != self.ranks.rank:
                for t in (header, ints, floats) + ((masks,) if masks.numel() else ()):
                    self.outbox.send(t, dst, TAG_PLAN)

    def begin(self, rows: int, length: int) -> None:
        self._broadcast(Plan(kind=ALLOC, cache_rows=rows, cache_len=length))
        self.local.begin(rows, length)

    def begin_paged(self, num_blocks: int, block_size: int) -> None:
        self._broadcast(Plan(kind=ALLOC_PAGED, cache_rows=num_blocks, cache_len=block_size))
        self.local.begin_paged(num_blocks, block_size)

    def submit(self, plan: Plan) -> None:
        self._broadcast(plan)
        cache, windows = self.local.cache, self.local.windows
        out = run_stage(self.model, plan, cache, windows, self.ranks, self.device, self.outbox, self.check)
        if out is not None:
            self.results[plan.mb] = out

    def result(self, mb: int) -> Sampled:
        if mb in self.results:
            return self.results.pop(mb)
        # the last stage answers micro-batches in the order they were submitted
        return recv_sampled(self.ranks.sampler, self.model.config.vocab_size, self.device)

    def keepalive(self) -> None:
        self._broadcast(Plan(kind=KEEPALIVE))

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
    ids, logprobs, top_ids = sample_full(logits, plan.sampling(device))
    if check:
        _check_identical(model, logits, ids)
    if not ranks.is_sampler:
        return None
    kept = logits if plan.record_logits else None
    if ranks.sampler == ranks.head:
        return Sampled(ids.tolist(), logprobs, top_ids, kept)
    # without waiting: the head may still be busy with its own stage of another micro-batch
    dev = comm_device(device)
    k = -1 if logprobs is None else top_ids.shape[1]
    outbox.send(torch.tensor([ids.numel(), int(kept is not None), k], device=dev), ranks.head, TAG_IDS)
    outbox.send(ids.to(dev).contiguous(), ranks.head, TAG_IDS)
    if kept is not None:
        outbox.send(kept.to(dev).contiguous(), ranks.head, TAG_IDS)
    if logprobs is not None:
        outbox.send(logprobs.to(dev).contiguous(), ranks.head, TAG_IDS)
        if k > 0:
            outbox.send(top_ids.to(dev).contiguous(), ranks.head, TAG_IDS)
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


def recv_sampled(src: int, vocab: int, device) -> Sampled:
    dev = comm_device(device)

    def recv(*shape, dtype=torch.int64):
        t = torch.empty(*shape, dtype=dtype, device=dev)
        dist.recv(t, src, tag=TAG_IDS)
        return t

    n, with_logits, k = recv(3).tolist()
    ids = recv(n)
    logits = recv(n, vocab, dtype=torch.float32) if with_logits else None
    logprobs = top_ids = None
    if k >= 0:
        logprobs = recv(n, k + 1, dtype=torch.float32)
        top_ids = recv(n, k) if k > 0 else torch.empty(n, 0, dtype=torch.int64, device=dev)
    return Sampled(ids.tolist(), logprobs, top_ids, logits)


def recv_plan(src: int, device) -> Plan:
    dev = comm_device(device)
    header = torch.empty(3, dtype=torch.int64, device=dev)
    dist.recv(header, src, tag=TAG_PLAN)
    n_ints, n_floats, n_masks = header.tolist()
    ints = torch.empty(n_ints, dtype=torch.int64, device=dev)
    floats = torch.empty(n_floats, dtype=torch.float32, device=dev)
    masks = torch.empty(n_masks, dtype=torch.int32, device=dev)
    dist.recv(ints, src, tag=TAG_PLAN)
    dist.recv(floats, src, tag=TAG_PLAN)
    if n_masks:
        dist.recv(masks, src, tag=TAG_PLAN)
    return Plan.decode(ints.cpu(), floats.cpu(), masks.cpu())


def follow(model: CausalLM, ranks: ReplicaRanks, device: torch.device, check: bool = False) -> None:
    """A non-head rank's loop: run each plan the head sends until it says to shut down."""
    local = LocalExecutor(model, device)
    outbox = Outbox()
    while True:
        plan = recv_plan(ranks.head, device)
        if plan.kind == SHUTDOWN:
            break
        if plan.kind in (ALLOC, ALLOC_PAGED, KEEPALIVE):
            local.run(plan)
            continue
        run_stage(model, plan, local.cache, local.windows, ranks, device, outbox, check)
    outbox.flush()
