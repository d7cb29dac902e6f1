"""The paged KV cache against the contiguous one: same logits through the model, prefill and
decode, for rows of different lengths whose blocks are scattered through the pool."""

import random

import pytest
import torch
from hf_models import write_hf_checkpoint

from engine.generate import Generator
from engine.kv_cache import BlockAllocator, ContiguousKVCache, PagedKVCache, make_step


def test_allocator_hands_out_each_block_once_and_never_block_0():
    alloc = BlockAllocator(9)
    a = alloc.allocate(3)
    b = alloc.allocate(5)
    assert alloc.allocate(1) is None and alloc.num_free == 0
    assert sorted(a + b) == list(range(1, 9))
    alloc.release(a)
    assert alloc.num_free == 3 and sorted(alloc.allocate(3)) == sorted(a)
    assert alloc.allocate(4) is None and alloc.num_free == 0


def test_blocks_for_budget():
    per_block = 2 * 4 * 16 * 2 * 8 * 4  # k and v, 4 layers, 16 tokens, 2 heads of 8, float32
    assert PagedKVCache.blocks_for_budget(10 * per_block + 5, 4, 16, 2, 8, torch.float32) == 10


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    path = tmp_path_factory.mktemp("paged")
    write_hf_checkpoint("mistral", path, seed=3, sliding_window=9)
    return Generator.from_pretrained(path, with_tokenizer=False)


@pytest.mark.parametrize("block_size", [1, 4, 16])
@torch.inference_mode()
def test_paged_logits_equal_contiguous_logits(gen, block_size):
    cfg, model = gen.config, gen.model
    rng = random.Random(block_size)
    lengths = [5, 13, 1, 8]
    steps = 12
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(n)] for n in lengths]
    B, width = len(prompts), max(lengths)
    blocks_per_row = -(-(width + steps) // block_size)
    pool = 1 + B * blocks_per_row + 3
    paged = PagedKVCache(model.layer_ids, pool, block_size, model.kv_heads, cfg.head_dim, torch.float32)
    # scatter the rows' blocks through the pool
    order = list(range(1, paged.num_blocks))
    rng.shuffle(order)
    tables = [order[i * blocks_per_row : (i + 1) * blocks_per_row] for i in range(B)]
    flat = ContiguousKVCache(model.layer_ids, B, width + steps, model.kv_heads, cfg.head_dim, torch.float32)

    tokens = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    last = torch.tensor([n - 1 for n in lengths])
    ref = model(tokens, make_step(tokens, [0] * B, list(range(B)), gen.windows, last), flat)
    got = model(
        tokens,
        make_step(tokens, [0] * B, list(range(B)), gen.windows, last, tables, block_size, lengths),
        paged,
    )
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)
    pos = list(lengths)
    for _ in range(steps):
        nxt = ref.argmax(-1)[:, None]
        zero = torch.zeros(B, dtype=torch.long)
        ref = model(nxt, make_step(nxt, pos, list(range(B)), gen.windows, zero), flat)
        got = model(nxt, make_step(nxt, pos, list(range(B)), gen.windows, zero, tables, block_size), paged)
        assert torch.allclose(got, ref, atol=1e-5, rtol=0)
        pos = [p + 1 for p in pos]
