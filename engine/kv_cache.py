"""Key/value caches and the per-step metadata that addresses them.

A cache exposes one method to the model, ``update(layer_id, k, v, step) -> (k, v)``: it stores the
new keys and values [B, KV, S, D] at ``step.positions`` of the rows ``step.rows`` and returns what
attention reads, [B, KV, kv_len, D]. ``ContiguousKVCache`` preallocates one row of ``max_len``
positions per sequence; it serves batch generation and is the reference for other layouts.
"""

from __future__ import annotations

import torch

from engine.model import Step, attention_mask


class ContiguousKVCache:
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
        shape = (rows, num_kv_heads, max_len, head_dim)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}
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

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))


def make_step(
    tokens: torch.Tensor,
    starts: list[int],
    rows: list[int],
    windows: set[int | None],
    logit_index: torch.Tensor | None = None,
) -> Step:
    """Build the step metadata for ``tokens`` [B, S] whose row b starts at position ``starts[b]``
    and is stored in cache row ``rows[b]``.

    Everything is derived from host-side lists, so building a step never waits on the device.
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
    return Step(
        tokens=tokens,
        positions=positions,
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        rows_slice=slice(rows[0], rows[0] + B) if contiguous else None,
        start=starts[0] if min(starts) == max(starts) else None,
        kv_len=kv_len,
        logit_index=logit_index,
        masks=masks,
    )
