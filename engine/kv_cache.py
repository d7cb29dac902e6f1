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

The allocator is also the prefix cache: a block full of computed tokens is known by a hash chained
over its token ids and its parent's hash (``block_hash``), reference-counted while sequences use
it, and kept findable after its last user lets it go until the space is needed (least recently
released first). A new sequence starts on the longest chain of cached blocks of its tokens.
"""

from __future__ import annotations

import array
import collections
import hashlib
from dataclasses import dataclass

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


def block_hash(parent: int | None, tokens) -> int:
    """The identity of a full block: a 64-bit hash chained over its parent's hash and its token
    ids, the same in every process (an int64, as the gateway's KV events carry it)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(b"root" if parent is None else parent.to_bytes(8, "little", signed=True))
    h.update(array.array("q", tokens).tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def extend_block_hashes(hashes: list[int], tokens, block_size: int, n: int) -> list[int]:
    """Extend ``hashes``, the chained hashes of the first full blocks of ``tokens``, to ``n`` blocks
    (in place); returns it."""
    for i in range(len(hashes), n):
        hashes.append(block_hash(hashes[-1] if i else None, tokens[i * block_size : (i + 1) * block_size]))
    return hashes


@dataclass(frozen=True)
class KVEvent:
    """A change to the set of cached blocks: "stored" (``hashes`` with ``parent`` and each block's
    ``tokens``), "removed" (``hashes``) or "cleared"."""

    kind: str
    hashes: tuple[int, ...] = ()
    parent: int | None = None
    tokens: tuple[tuple[int, ...], ...] = ()


class BlockAllocator:
    """The KV cache manager: hands out cache block ids and, with ``prefix_caching``, keeps the
    blocks that hold a full block of computed tokens findable by their ``block_hash``.

    Each block has a reference count (the sequences using it). A block whose count drops to 0
    goes back to the free blocks; if it is cached it stays findable there, and such blocks are
    evicted least recently released first, only when no never-cached free block is left. A
    sequence releases its blocks tail first, so the end of a prefix is evicted before its start.
    Block 0 is never handed out: a paged step writes the keys of padding tokens there.

    ``events``, when not None, collects a ``KVEvent`` for every block stored, evicted or cleared
    (whoever reads it empties it)."""

    def __init__(self, num_blocks: int, prefix_caching: bool = False):
        if num_blocks < 2:
            raise ValueError(f"a paged cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks, self.prefix_caching = num_blocks, prefix_caching
        self._fresh = list(range(num_blocks - 1, 0, -1))  # free, holding nothing cached
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # free, cached
        self._refs = [0] * num_blocks
        self._block_of: dict[int, int] = {}  # hash -> block
        self._hash_of: dict[int, int] = {}  # block -> hash
        self._stored: dict[int, tuple[int | None, tuple[int, ...]]] = {}  # hash -> (parent, tokens)
        self.events: list[KVEvent] | None = None

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out (cached ones among them)."""
        return len(self._fresh) + len(self._evictable)

    @property
    def num_cached_free(self) -> int:
        """Free blocks that still hold a cached prefix."""
        return len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks findable by hash, in use or not."""
        return len(self._block_of)

    def match(self, hashes: list[int]) -> list[int]:
        """The blocks of the longest run of ``hashes`` (a chain, first block first) that is cached;
        nothing is taken (``take`` does that)."""
        blocks = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def take(self, blocks: list[int]) -> None:
        """Add a user to each of ``blocks`` (cached blocks found by ``match``)."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1

    def allocate(self, n: int) -> list[int] | None:
        """``n`` blocks for one user each, or None (and nothing taken) when fewer are free. Cached
        free blocks are evicted only when the never-cached ones run out."""
        if n > self.num_free:
            return None
        cut = max(0, len(self._fresh) - n)
        taken = self._fresh[cut:][::-1]
        del self._fresh[cut:]
        evicted = []
        while len(taken) < n:
            block, _ = self._evictable.popitem(last=False)
            evicted.append(self._hash_of.pop(block))
            del self._block_of[evicted[-1]], self._stored[evicted[-1]]
            taken.append(block)
        if evicted and self.events is not None:
            self.events.append(KVEvent("removed", tuple(evicted)))
        for block in taken:
            self._refs[block] = 1
        return taken

    def release(self, blocks: list[int]) -> None:
        """Drop one user of each of ``blocks`` (a sequence's blocks, in order)."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._fresh.append(block)

    def cache(
        self, blocks: list[int], hashes: list[int], parent: int | None, tokens: list[list[int]]
    ) -> None:
        """Make ``blocks``, whose keys and values are now computed, findable by ``hashes`` (the
        chain after ``parent``). A hash already cached in another block keeps that block."""
        if not self.prefix_caching:
            return
        runs: list[tuple[int | None, list[int], list[tuple[int, ...]]]] = []  # contiguous stored runs
        for i, (block, h, toks) in enumerate(zip(blocks, hashes, tokens)):
            if h in self._block_of or block in self._hash_of:
                continue
            before = hashes[i - 1] if i else parent
            self._block_of[h], self._hash_of[block] = block, h
            self._stored[h] = (before, tuple(toks))
            if not runs or runs[-1][1][-1] != before:
                runs.append((before, [], []))
            runs[-1][1].append(h)
            runs[-1][2].append(tuple(toks))
        if self.events is not None:
            for before, run, run_tokens in runs:
                self.events.append(KVEvent("stored", tuple(run), before, tuple(run_tokens)))

    def cached_blocks(self) -> list[tuple[int, int | None, tuple[int, ...]]]:
        """Every cached block as (hash, parent hash, token ids), each after its parent where the
        parent is cached too (a snapshot for a subscriber to the events)."""
        out, done = [], set()
        for h in self._stored:
            chain = []  # h and its cached ancestors not yet listed, child first
            while h in self._stored and h not in done:
                chain.append(h)
                done.add(h)
                h = self._stored[h][0]
            out += [(c, *self._stored[c]) for c in reversed(chain)]
        return out

    def reset(self) -> int:
        """Forget every cached block; blocks in use keep their contents for their users and are
        no longer findable. Returns how many blocks were cached."""
        dropped = len(self._block_of)
        for block in self._evictable:
            self._fresh.append(block)
        self._evictable.clear()
        self._block_of.clear()
        self._hash_of.clear()
        self._stored.clear()
        if self.events is not None:
            self.events.append(KVEvent("cleared"))
        return dropped


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
    if lengths is not None and min(lengths) < S:
        # a row's padding stays at its last real position: a short chunk late in a long sequence
        # padded to a wide chunk's width would otherwise reach past the model's context
        last = start + torch.tensor(lengths, dtype=torch.long, device=device) - 1
        positions = torch.minimum(positions, last[:, None])
        kv_len = max(s + n for s, n in zip(starts, lengths))
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
