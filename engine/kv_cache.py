"""Key/value caches and the per-step metadata that addresses them.

A cache exposes one method to the model, ``attend(layer_id, q, k, v, step, window) -> y``: it
stores the new keys and values [B, KV, S, D] at ``step.positions`` of each row and returns the
attention of the queries [B, H, S, D] over each row's cache. By default that is ``update``, which
returns what attention reads, [B, KV, kv_len, D], and scaled_dot_product_attention over it.

``ContiguousKVCache`` preallocates one row of ``max_len`` positions per sequence (batch
generation, and the reference). ``PagedKVCache`` keeps a pool of fixed-size blocks that a
``BlockAllocator`` hands out, so that a sequence holds memory for the tokens it has, not for the
longest it could have; a row's block table says which blocks hold its positions, in order. In
compiled decoding (``engine.compiled``) it attends with flex attention over the pool in place,
visiting only each row's blocks, instead of gathering them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from engine.model import Step, attention_mask


class _LayerTensors:
    """Keys and values of every layer, zero-filled: attention reads whole rows or blocks, and
    masked garbage must still be finite."""

    def __init__(self, layer_ids: list[int], shape: tuple[int, ...], dtype: torch.dtype, device):
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))

    def attend(self, layer_id: int, q, k, v, step: Step, window: int | None) -> torch.Tensor:
        k, v = self.update(layer_id, k, v, step)
        mask = step.masks[window]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


class ContiguousKVCache(_LayerTensors):
    def __init__(
        self,
        layer_ids: list[int],
        rows: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        super().__init__(layer_ids, (rows, num_kv_heads, max_len, head_dim), dtype, device)
        self.rows, self.max_len = rows, max_len

    def update(self, layer_id: int, k: torch.Tensor, v: torch.Tensor, step: Step):
        kc, vc = self.k[layer_id], self.v[layer_id]
        if step.rows_slice is not None and step.start is not None:
            span = slice(step.start, step.start + k.shape[2])
            kc[step.rows_slice, :, span] = k
            vc[step.rows_slice, :, span] = v
        else:
            rows = step.rows[:, None]
            # advanced indices around a slice put the indexed dims first: [B, S, KV, D]
            kc[rows, :, step.positions] = k.transpose(1, 2)
            vc[rows, :, step.positions] = v.transpose(1, 2)
        if step.rows_slice is not None:
            return kc[step.rows_slice, :, : step.kv_len], vc[step.rows_slice, :, : step.kv_len]
        return kc[step.rows, :, : step.kv_len], vc[step.rows, :, : step.kv_len]


class BlockAllocator:
    """Hands out cache block ids from a free list. Block 0 is never handed out: a paged step
    writes the keys of padding tokens there."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"a paged cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """``n`` blocks, or None (and nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        taken = self._free[len(self._free) - n :][::-1]
        del self._free[len(self._free) - n :]
        return taken

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedKVCache(_LayerTensors):
    """k[layer]: [num_blocks, block_size, KV, D]: slot s of the pool is block s // block_size,
    offset s % block_size."""

    def __init__(
        self,
        layer_ids: list[int],
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        super().__init__(layer_ids, (num_blocks, block_size, num_kv_heads, head_dim), dtype, device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.allocator = BlockAllocator(num_blocks)

    @staticmethod
    def blocks_for_budget(
        budget_bytes: int,
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> int:
        """How many blocks a memory budget holds (keys and values of every layer)."""
        per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize
        return budget_bytes // per_block

    def write(self, layer_id: int, k: torch.Tensor, v: torch.Tensor, step: Step) -> None:
        """Store keys and values [B, KV, S, D] at ``step.slots``."""
        kc, vc = self.k[layer_id], self.v[layer_id]
        B, KV, S, D = k.shape
        slots = step.slots.reshape(-1)
        kc.view(-1, KV, D).index_copy_(0, slots, k.transpose(1, 2).reshape(-1, KV, D))
        vc.view(-1, KV, D).index_copy_(0, slots, v.transpose(1, 2).reshape(-1, KV, D))

    def pool(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's whole pool as one sequence per kv head, [1, KV, num_blocks * block_size, D]:
        a view, no copy (slot s is block s // block_size, offset s % block_size)."""
        kc, vc = self.k[layer_id], self.v[layer_id]
        KV, D = kc.shape[2:]
        return tuple(t.view(-1, KV, D).transpose(0, 1).unsqueeze(0) for t in (kc, vc))

    def attend(self, layer_id: int, q, k, v, step: Step, window: int | None) -> torch.Tensor:
        if step.block_masks is None:
            return super().attend(layer_id, q, k, v, step, window)
        # compiled decoding: flex attention visits only the blocks each row's mask lists, in the pool
        self.write(layer_id, k, v, step)
        keys, values = self.pool(layer_id)
        return flex_attention(q, keys, values, block_mask=step.block_masks[window], enable_gqa=True)

    def update(self, layer_id: int, k: torch.Tensor, v: torch.Tensor, step: Step):
        kc, vc = self.k[layer_id], self.v[layer_id]
        self.write(layer_id, k, v, step)
        # [B, blocks, block_size, KV, D] -> [B, KV, blocks * block_size, D], cut to kv_len
        keys = kc[step.block_tables].flatten(1, 2).transpose(1, 2)[:, :, : step.kv_len]
        values = vc[step.block_tables].flatten(1, 2).transpose(1, 2)[:, :, : step.kv_len]
        return keys, values


def make_step(
    tokens: torch.Tensor,
    starts: list[int],
    rows: list[int],
    windows: set[int | None],
    logit_index: torch.Tensor | None = None,
    block_tables: list[list[int]] | None = None,
    block_size: int = 0,
    lengths: list[int] | None = None,
) -> Step:
    """Build the step metadata for ``tokens`` [B, S] whose row b starts at position ``starts[b]``
    and is stored in cache row ``rows[b]``.

    Everything is derived from host-side lists, so building a step never waits on the device.
    For a paged cache, ``block_tables`` lists each row's blocks and ``lengths`` its real token
    count (the rest of the row is padding, written to block 0).
    Masks are built once per step, one per distinct sliding window, and left out (None) where
    every query sees every cached position up to kv_len, which lets attention skip them.
    """
    device = tokens.device
    B, S = tokens.shape
    start = torch.tensor(starts, dtype=torch.long, device=device)
    positions = start[:, None] + torch.arange(S, device=device)
    kv_len = max(starts) + S
    contiguous = rows == list(range(rows[0], rows[0] + B))
    all_last = S == 1 and min(starts) == max(starts)
    masks: dict[int | None, torch.Tensor | None] = {}
    for window in windows:
        if all_last and (window is None or window >= kv_len):
            masks[window] = None
        else:
            masks[window] = attention_mask(positions, kv_len, window)
    tables = slots = None
    if block_tables is not None:
        # each row's blocks, padded (with block 0) to cover every position attention reads
        width = -(-kv_len // block_size)
        padded = [t[:width] + [0] * (width - len(t[:width])) for t in block_tables]
        tables = torch.tensor(padded, dtype=torch.long, device=device)
        real = torch.arange(S, device=device) < torch.tensor(lengths or [S] * B, device=device)[:, None]
        slots = tables.gather(1, positions // block_size) * block_size + positions % block_size
        slots = torch.where(real, slots, positions % block_size)  # padding goes to block 0
    return Step(
        tokens=tokens,
        positions=positions,
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        rows_slice=slice(rows[0], rows[0] + B) if contiguous else None,
        start=starts[0] if min(starts) == max(starts) else None,
        kv_len=kv_len,
        logit_index=logit_index,
        masks=masks,
        block_tables=tables,
        slots=slots,
    )
