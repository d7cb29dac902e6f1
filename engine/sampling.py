"""Batched token sampling: temperature (0 = greedy), top-k, top-p and per-request seeds.

Randomness is counter-based: the noise for vocabulary entry v of a sequence's n-th generated token
is a hash of (seed, n, v), computed on the device for the whole batch at once. A sequence's samples
therefore depend only on its own seed and logits, not on which other sequences share the batch,
which rank samples, or whether the request was moved to another replica halfway through.
Sampling draws argmax(logits / T + Gumbel noise) over the tokens that top-k and top-p keep, which
is an exact draw from the filtered softmax distribution.

Before any of that, a row may have penalties applied to its logits, as vLLM and the OpenAI API
define them: ``repetition_penalty`` r divides positive logits (multiplies negative ones) of every
token seen in the prompt or the output so far; ``frequency_penalty`` f and ``presence_penalty`` p
subtract ``f * count + p * (count > 0)`` where count is how often the token appears in the output.
Log-probabilities are those of the raw model output (before penalties and temperature), like
vLLM's default: the sampled token's, plus the top k of the distribution.

A constrained row comes with a token bitmask (``engine.structured``): after the penalties, every
token it leaves out is set to -inf, so greedy choice, top-k, top-p and the random draw all pick
among the tokens its grammar allows.
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


def apply_token_masks(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` [B, V] with every token that row ``rows[i]``'s bitmask ``bitmask[i]`` leaves out
    set to -inf (a new tensor)."""
    V = logits.shape[-1]
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, :V]
    keep = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
    keep[rows] = allowed.to(logits.device)
    return logits.masked_fill(~keep, float("-inf"))


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
    penalties: Penalties | None = None
    logprobs: int = -1  # top log-probabilities to return per row; -1: none
    # constrained rows: (row indices int64 [R], int32 bitmask [R, ceil(V / 32)]), on the device
    masks: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(
        cls,
        temperature,
        top_k,
        top_p,
        seeds,
        counters,
        device,
        penalties=None,
        logprobs: int = -1,
        mask_rows: list[int] | None = None,
        bitmask: torch.Tensor | None = None,
    ) -> SamplingBatch:
        masks = None
        if mask_rows:
            rows = torch.tensor(mask_rows, dtype=torch.long, device=device)
            masks = (rows, bitmask.to(device, non_blocking=True))
        return cls(
            temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.long, device=device),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
            seeds=torch.tensor(seeds, dtype=torch.long, device=device),
            counters=torch.tensor(counters, dtype=torch.long, device=device),
            any_random=any(t > 0 for t in temperature),
            any_top_k=any(t > 0 and k > 0 for t, k in zip(temperature, top_k)),
            any_top_p=any(t > 0 and p < 1 for t, p in zip(temperature, top_p)),
            penalties=penalties,
            logprobs=logprobs,
            masks=masks,
        )


@dataclass
class Penalties:
    """Repetition, frequency and presence penalties of a batch, with the token history they need:
    row b's history is ``prompt + output``, the first ``prompt_lens[b]`` of it the prompt. Rows
    without penalties have neutral values and may have an empty history."""

    presence: list[float]
    frequency: list[float]
    repetition: list[float]
    prompt_lens: list[int]
    histories: list[list[int]]

    @staticmethod
    def neutral(presence: float, frequency: float, repetition: float) -> bool:
        return presence == 0 and frequency == 0 and repetition == 1

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [B, V] with the penalties applied (a new tensor)."""
        B, V = logits.shape
        device = logits.device
        rows = [b for b, h in enumerate(self.histories) for _ in h]
        ids = [t for h in self.histories for t in h]
        is_out = [i >= n for h, n in zip(self.histories, self.prompt_lens) for i in range(len(h))]
        counts = torch.zeros(B, V, dtype=torch.float32, device=device)
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        if ids:
            row_t = torch.tensor(rows, dtype=torch.long, device=device)
            id_t = torch.tensor(ids, dtype=torch.long, device=device).clamp_(0, V - 1)
            out_t = torch.tensor(is_out, dtype=torch.bool, device=device)
            counts.index_put_((row_t, id_t), out_t.float(), accumulate=True)
            seen[row_t, id_t] = True
        rep = torch.tensor(self.repetition, dtype=torch.float32, device=device)[:, None]
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        x = torch.where(seen, penalised, logits)
        frequency = torch.tensor(self.frequency, dtype=torch.float32, device=device)[:, None]
        presence = torch.tensor(self.presence, dtype=torch.float32, device=device)[:, None]
        return x - frequency * counts - presence * (counts > 0).float()


@dataclass
class Sampled:
    """What a sampling pass returns: the ids, and when asked for, log-probabilities: column 0 of
    ``logprobs`` is the sampled token's, columns 1..k the top k's, whose ids are ``top_ids``."""

    ids: list[int]
    logprobs: torch.Tensor | None = None  # [B, 1 + k] float32
    top_ids: torch.Tensor | None = None  # [B, k] int64
    logits: torch.Tensor | None = None  # [B, V], when recorded

    def row_logprobs(self, b: int, k: int) -> tuple[float, list[tuple[int, float]]]:
        """Row b's sampled-token log-probability and its top ``k`` (id, log-probability) pairs."""
        lp = self.logprobs[b].tolist()
        return lp[0], list(zip(self.top_ids[b, :k].tolist(), lp[1 : k + 1]))


def sample_full(
    logits: torch.Tensor, params: SamplingBatch
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``sample``, plus (when ``params.logprobs`` >= 0) the raw log-probabilities of the sampled
    tokens and of each row's top ``params.logprobs`` tokens: (ids, logprobs [B, 1 + k], top_ids)."""
    ids = sample(logits, params)
    if params.logprobs < 0:
        return ids, None, None
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, ids[:, None])
    if params.logprobs == 0:
        return ids, chosen, torch.empty(len(ids), 0, dtype=torch.long, device=logits.device)
    top_lp, top_ids = logp.topk(params.logprobs, dim=-1)
    return ids, torch.cat((chosen, top_lp), dim=1), top_ids


def sample(logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """Choose one token id per row of ``logits`` [B, V] (float32); returns int64 [B]."""
    if params.penalties is not None:
        logits = params.penalties.apply(logits)
    if params.masks is not None:
        logits = apply_token_masks(logits, *params.masks)
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
