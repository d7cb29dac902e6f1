"""Batched token sampling: temperature (0 = greedy), top-k, top-p and per-request seeds.

Randomness is counter-based: the noise for vocabulary entry v of a sequence's n-th generated token
is a hash of (seed, n, v), computed on the device for the whole batch at once. A sequence's samples
therefore depend only on its own seed and logits, not on which other sequences share the batch,
which rank samples, or whether the request was moved to another replica halfway through.
Sampling draws argmax(logits / T + Gumbel noise) over the tokens that top-k and top-p keep, which
is an exact draw from the filtered softmax distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply) on int64 tensors holding values < 2**32.

    Products may wrap around int64; their low 32 bits are still exact, and that is all we keep.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """u[b, v] in (0, 1), a pure function of (seeds[b], counters[b], v). seeds, counters: int64 [B]."""
    lo, hi = seeds & MASK32, (seeds >> 32) & MASK32
    key = _mix32(lo ^ _mix32((hi + 0x9E3779B9) & MASK32))
    key = _mix32(key ^ _mix32((counters + 0x85EBCA6B) & MASK32))
    ids = _mix32((torch.arange(vocab, device=seeds.device) * 0x27D4EB2D + 0x165667B1) & MASK32)
    bits = _mix32(key[:, None] ^ ids[None, :])
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as device tensors, plus host-side flags that let the common
    cases (all greedy, no top-k, no top-p) skip work without reading anything back."""

    temperature: torch.Tensor  # [B] float32, 0 = greedy
    top_k: torch.Tensor  # [B] int64, 0 = off
    top_p: torch.Tensor  # [B] float32, 1 = off
    seeds: torch.Tensor  # [B] int64
    counters: torch.Tensor  # [B] int64: tokens generated so far
    any_random: bool
    any_top_k: bool
    any_top_p: bool

    @classmethod
    def build(cls, temperature, top_k, top_p, seeds, counters, device) -> SamplingBatch:
        return cls(
            temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.long, device=device),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
            seeds=torch.tensor(seeds, dtype=torch.long, device=device),
            counters=torch.tensor(counters, dtype=torch.long, device=device),
            any_random=any(t > 0 for t in temperature),
            any_top_k=any(t > 0 and k > 0 for t, k in zip(temperature, top_k)),
            any_top_p=any(t > 0 and p < 1 for t, p in zip(temperature, top_p)),
        )


def sample(logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """Choose one token id per row of ``logits`` [B, V] (float32); returns int64 [B]."""
    greedy = logits.argmax(dim=-1)
    if not params.any_random:
        return greedy
    vocab = logits.shape[-1]
    x = logits / params.temperature.clamp(min=1e-6)[:, None]
    if params.any_top_k or params.any_top_p:
        x_sorted, order = x.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=x.device)
        if params.any_top_k:
            k = torch.where(params.top_k > 0, params.top_k, vocab)
            x_sorted = x_sorted.masked_fill(rank >= k[:, None], float("-inf"))
        if params.any_top_p:
            probs = x_sorted.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            x_sorted = x_sorted.masked_fill(mass_before >= params.top_p[:, None], float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, order, x_sorted)
    u = uniform_noise(params.seeds, params.counters, vocab)
    sampled = (x - torch.log(-torch.log(u))).argmax(dim=-1)
    return torch.where(params.temperature > 0, sampled, greedy)
