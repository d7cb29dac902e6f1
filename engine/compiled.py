"""Decode steps through ``torch.compile``, at a fixed set of batch sizes.

A decode step over a paged cache has the same shapes whenever its batch size is the same: one token
per row, a block table as wide as the longest sequence allows, and the cache's pool. So each
captured batch size (a bucket) is compiled once, and a batch is padded up to the next bucket; its
padding rows read and write only the reserved block 0. Every per-step input is copied into static
buffers of its bucket, so the compiled step always reads the same addresses. On CUDA, mode
"reduce-overhead" records each bucket's step as a CUDA graph and replays it with one launch, with
no host synchronisation until the sampled ids are read back. On CPU, inductor's generated code
runs the step without the eager dispatcher.

Attention reads the pool in place through flex attention; it never gathers a copy of each row's
blocks. A block mask per bucket and sliding window lists each row's blocks (``kv_indices``: its
block table; ``kv_num_blocks``: how many it uses), so the kernel visits only those. Its mask_mod
maps a pool slot back to the row's position through ``logical`` [rows, num_blocks] (the logical
index of each of the row's physical blocks) to apply causality and the window.
"""

from __future__ import annotations

import collections
import ctypes
import types

import torch
from torch.nn.attention.flex_attention import BlockMask

from engine.model import CausalLM, Linear, Step, let_compiler_read_threads

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MODES = ("auto", "compiled", "eager")


def resolve_decode_mode(requested: str, device: torch.device) -> str:
    """``auto`` compiles on CUDA, where the Python overhead of a decode step is most of its time,
    and stays eager on CPU, where a decode step gains 1.1-1.6x but compiling takes some 15-70 s
    per batch-size bucket on a small host (BENCHMARKS.md): a choice for a long-running server."""
    if requested not in MODES:
        raise ValueError(f"decode mode must be one of {', '.join(MODES)}, got {requested!r}")
    if requested == "auto":
        return "compiled" if device.type == "cuda" else "eager"
    return requested


_HEAP_COVERS = 0  # the largest allocation the raised thresholds serve from the heap in this process
_INT_MAX = 2**31 - 1  # mallopt takes a C int


def keep_scratch_in_the_heap(nbytes: int) -> bool:
    """Have glibc's malloc serve allocations of up to ``nbytes`` from its heap and keep what is
    freed, rather than mmap each one and munmap it when freed.

    Each call of flex attention's CPU kernel allocates two scratch buffers as large as one layer's
    keys in the whole pool (the template's key and value reorder buffers, allocated whether it
    packs into them or not) and frees them on return. Past the mmap threshold, which glibc raises
    on its own to 32 MiB at most, that is an mmap and a munmap per layer and step; a munmap also
    flushes every core's TLB. A serving pool of 8192 blocks (128 MiB buffers in the demo) made a
    compiled step of the demo a fifth slower than a pool of 128 (BENCHMARKS.md). The buffers are
    never touched unless the kernel packs (not for these decode shapes), so what the heap keeps is
    address space, not resident memory. Returns whether the thresholds cover ``nbytes`` (glibc
    only, and buffers below 1 GiB: the thresholds are C ints)."""
    global _HEAP_COVERS
    if nbytes <= _HEAP_COVERS:
        return True
    threshold = 2 * nbytes  # above each buffer, with room for the allocator's headers
    if threshold > _INT_MAX:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: its allocator decides
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if not (mallopt(M_MMAP_THRESHOLD, threshold) and mallopt(M_TRIM_THRESHOLD, min(2 * threshold, _INT_MAX))):
        return False
    _HEAP_COVERS = nbytes
    return True


def bucket_for(rows: int) -> int:
    """The smallest captured batch size that holds ``rows``; past the list, multiples of 64."""
    for size in BUCKETS:
        if size >= rows:
            return size
    return -(-rows // 64) * 64


def _mask_mod(logical: torch.Tensor, positions: torch.Tensor, block_size: int, window: int | None):
    def mask_mod(b, h, q_idx, kv_idx):
        position = logical[b, kv_idx // block_size] * block_size + kv_idx % block_size
        query = positions[b, q_idx]
        visible = position <= query
        if window is not None:
            visible = visible & (query - position < window)
        return visible

    return mask_mod


class _Bucket:
    """The static inputs of one batch size, and its block masks over them."""

    def __init__(self, rows: int, width: int, num_blocks: int, block_size: int, windows, device):
        def zeros(*shape, dtype=torch.int64):
            return torch.zeros(shape, dtype=dtype, device=device)

        self.rows, self.width = rows, width
        self.tokens, self.positions, self.slots = zeros(rows, 1), zeros(rows, 1), zeros(rows, 1)
        # a block mask spans the whole pool (flex attention's kernels want its KV extent to cover
        # the keys'): each row's table in the first ``width`` columns, zeros after
        self.tables = zeros(rows, 1, 1, num_blocks, dtype=torch.int32)
        self.used = zeros(rows, 1, 1, dtype=torch.int32)
        self.logical = zeros(rows, num_blocks, dtype=torch.int32)
        self.offsets = torch.arange(width, dtype=torch.int32, device=device).expand(rows, width)
        self.masks = {
            window: BlockMask.from_kv_blocks(
                self.used,
                self.tables,
                BLOCK_SIZE=(block_size, block_size),
                mask_mod=_mask_mod(self.logical, self.positions, block_size, window),
                seq_lengths=(1, num_blocks * block_size),
            )
            for window in windows
        }
        pin = device.type == "cuda"
        if pin:  # the CUDA graphs read these at fixed addresses
            for t in (self.tokens, self.positions, self.slots, self.tables, self.used, self.logical):
                torch._dynamo.mark_static_address(t)
        # pinned host copies, so that the inputs of a step go to the device without a sync
        self.host = {
            name: torch.zeros(getattr(self, name).shape, dtype=getattr(self, name).dtype, pin_memory=pin)
            for name in ("tokens", "positions", "slots", "used")
        }
        self.host["tables"] = torch.zeros(rows, width, dtype=torch.int32, pin_memory=pin)
        self.table_view = self.tables[:, 0, 0, :width]

    def load(self, tokens: list[int], starts: list[int], tables: list[list[int]], block_size: int) -> None:
        """This step's rows into the buffers; rows past ``len(tokens)`` are padding (block 0)."""
        host = self.host
        for t in host.values():
            t.zero_()
        host["used"].fill_(1)  # padding rows: block 0
        B = len(tokens)
        host["tokens"][:B, 0] = torch.tensor(tokens)
        start = torch.tensor(starts)
        host["positions"][:B, 0] = start
        width = self.width
        blocks = [table[:width] for table in tables]
        table = torch.tensor([b + [0] * (width - len(b)) for b in blocks], dtype=torch.int32)
        host["tables"][:B] = table
        used = start // block_size + 1
        host["used"][:B, 0, 0] = used.to(torch.int32)
        host["slots"][:B, 0] = table.gather(1, (start // block_size)[:, None]).long()[:, 0] * block_size
        host["slots"][:B, 0] += start % block_size
        for name, t in host.items():
            (self.table_view if name == "tables" else getattr(self, name)).copy_(t, non_blocking=True)

    def index_blocks(self) -> None:
        """Each row's physical blocks -> their index in the row, what the masks map slots with.
        The zeros that pad the tables all land on block 0, which no sequence's mask visits; a
        padding row visits it as its block 0, so that it sees slot 0 and its values stay finite.
        (Done before the compiled step: flex attention's CPU kernel takes no buffer the same
        graph writes.)"""
        self.logical.scatter_(1, self.table_view.long(), self.offsets)
        self.logical[:, 0] = 0


class CompiledDecode:
    """Decode steps of ``model`` over the paged ``cache``, compiled per bucket of batch sizes."""

    def __init__(
        self, model: CausalLM, cache, max_len: int, device: torch.device, module_guards: bool = False
    ):
        """``module_guards``: on the CPU, have dynamo check its guards on the model's modules before
        every step, as it does by default (benchmarks/step_overhead.py measures what they cost)."""
        if model.tp.size > 1 or model.model.embed_tokens is None or model.lm_head is None:
            raise ValueError("compiled decoding runs a whole model in one process (tp = pp = 1)")
        self.model, self.cache, self.device = model, cache, device
        let_compiler_read_threads()  # the CPU products split over the threads in compiled steps too
        if device.type == "cpu":
            keys = cache.k[model.layer_ids[0]]  # the size of flex attention's scratch buffers
            keep_scratch_in_the_heap(keys.numel() * keys.element_size())
            # compiled steps multiply by rows (Linear's docstring)
            for m in model.modules():
                if isinstance(m, Linear):
                    m.store_by_rows()
        self.block_size = cache.block_size
        # the most blocks any row can use: its context, or the whole pool (but the reserved block 0)
        self.width = min(-(-max_len // cache.block_size), cache.num_blocks - 1)
        self.windows = sorted(set(model.config.sliding_windows), key=lambda w: (w is not None, w or 0))
        self.buckets: dict[int, _Bucket] = {}
        self.steps: collections.Counter[int] = collections.Counter()  # steps run, per bucket
        cuda = device.type == "cuda"
        if cuda:  # the pool is written in place by every step: fixed addresses, not graph inputs
            for t in (*cache.k.values(), *cache.v.values()):
                torch._dynamo.mark_static_address(t)
        # one graph per bucket; dynamo's default limit on recompiles would cut off the larger ones
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(BUCKETS))
        # dynamo keeps the graphs it compiles per code object: this decoder's step has one of its
        # own, so that no other decoder (over another model: module guards are off on the CPU)
        # finds this one's graphs
        own = types.FunctionType(CompiledDecode._step.__code__.replace(), CompiledDecode._step.__globals__)
        step = types.MethodType(own, self)
        if cuda:
            self.step = torch.compile(step, fullgraph=True, dynamic=False, mode="reduce-overhead")
        else:
            # the CPU flex-attention kernel takes no fused epilogue (the cast before an int8
            # product); a C++ wrapper around the kernels instead of a Python one takes about 7%
            # off a step (BENCHMARKS.md). Dynamo checks no guard on the model's modules before
            # each step: their weights and attributes do not change once this decoder holds
            # them, and checking them took 0.55 ms a step against 0.16 ms for the guards left on 150M
            # parameters (their graph inputs cost 0.1 ms more to gather: BENCHMARKS.md)
            options = {"epilogue_fusion": False, "cpp_wrapper": True}
            if not module_guards:
                options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
            self.step = torch.compile(step, fullgraph=True, dynamic=False, options=options)

    def _step(self, tokens, positions, slots, masks) -> torch.Tensor:
        step = Step(
            tokens=tokens,
            positions=positions,
            rows=None,  # a paged step addresses the cache by slots and block masks
            rows_slice=None,
            start=None,
            kv_len=self.width * self.block_size,
            logit_index=None,
            masks={},
            slots=slots,
            block_masks=masks,
        )
        return self.model(tokens, step, self.cache)[:, 0]

    def bucket(self, rows: int) -> _Bucket:
        size = bucket_for(rows)
        if size not in self.buckets:
            n = self.cache.num_blocks
            self.buckets[size] = _Bucket(size, self.width, n, self.block_size, self.windows, self.device)
        return self.buckets[size]

    def __call__(self, tokens: list[int], starts: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Logits [B, vocab / tp] of one decode step: row b feeds ``tokens[b]`` at position
        ``starts[b]``, its blocks ``tables[b]``."""
        b = self.bucket(len(tokens))
        self.steps[b.rows] += 1
        b.load(tokens, starts, tables, self.block_size)
        b.index_blocks()
        logits = self.step(b.tokens, b.positions, b.slots, b.masks)
        # a CUDA graph's output lives in its memory pool and the next replay overwrites it
        return logits[: len(tokens)].clone()

    def warm_up(self, max_rows: int) -> list[int]:
        """Compile every bucket up to ``max_rows`` now rather than on the first batch of its size;
        the steps write only block 0, which holds no sequence."""
        sizes = sorted({bucket_for(r) for r in (*[s for s in BUCKETS if s <= max_rows], max_rows)})
        for size in sizes:
            self([0] * size, [0] * size, [[0]] * size)
        self.steps.clear()
        return sizes
