"""Sampling: greedy, seeds, top-k, top-p and temperature, on the sampler and through generation."""

import pytest
import torch

from engine.generate import Generator
from engine.request import SamplingParams
from engine.sampling import SamplingBatch, sample, uniform_noise


def _batch(n, temperature=1.0, top_k=0, top_p=1.0, seeds=None, counters=None):
    return SamplingBatch.build(
        [temperature] * n,
        [top_k] * n,
        [top_p] * n,
        seeds if seeds is not None else list(range(n)),
        counters if counters is not None else [0] * n,
        "cpu",
    )


def test_noise_is_uniform_and_a_function_of_seed_counter_and_id():
    seeds = torch.tensor([0, 1, 2**62 + 5])
    u = uniform_noise(seeds, torch.tensor([0, 0, 7]), 50_000)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(u.var().item() - 1 / 12) < 0.005
    again = uniform_noise(seeds[[2, 0]], torch.tensor([7, 0]), 50_000)
    assert torch.equal(again, u[[2, 0]])
    assert not torch.equal(u[0], u[1])
    assert not torch.equal(u[0], uniform_noise(seeds[:1], torch.tensor([1]), 50_000)[0])


def test_sampled_frequencies_follow_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 20_000
    ids = sample(logits.expand(n, -1).contiguous(), _batch(n, temperature=1.0))
    freq = torch.bincount(ids, minlength=5).float() / n
    expected = logits.softmax(-1)
    assert (freq - expected).abs().max().item() < 0.015


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5])
    n = 10_000
    top = {}
    for t in (0.25, 1.0, 4.0):
        ids = sample(logits.expand(n, -1).contiguous(), _batch(n, temperature=t))
        top[t] = (ids == 0).float().mean().item()
        assert abs(top[t] - (logits / t).softmax(-1)[0].item()) < 0.02
    assert top[0.25] > top[1.0] > top[4.0]


def test_top_k_limits_the_support_and_top_k_1_is_greedy():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))
    ids = sample(logits, _batch(64, temperature=5.0, top_k=3))
    allowed = logits.topk(3, dim=-1).indices
    assert (ids[:, None] == allowed).any(-1).all()
    assert torch.equal(sample(logits, _batch(64, temperature=5.0, top_k=1)), logits.argmax(-1))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    n = 8000
    ids = sample(logits.expand(n, -1).contiguous(), _batch(n, top_p=0.75))
    freq = torch.bincount(ids, minlength=4).float() / n
    assert freq[2:].sum() == 0  # 0.5 + 0.3 already reach 0.75
    assert abs(freq[0].item() - 0.5 / 0.8) < 0.02
    tiny_p = sample(logits.expand(16, -1).contiguous(), _batch(16, temperature=3.0, top_p=1e-6))
    assert (tiny_p == 0).all()


def test_zero_temperature_is_greedy_whatever_the_other_settings():
    logits = torch.randn(8, 50)
    params = SamplingBatch.build([0.0, 1.0] * 4, [5] * 8, [0.5] * 8, list(range(8)), [0] * 8, "cpu")
    ids = sample(logits, params)
    assert torch.equal(ids[0::2], logits[0::2].argmax(-1))


@pytest.fixture(scope="module")
def gen(tiny_demo):
    return Generator.from_pretrained(tiny_demo)


def test_same_seed_same_output_different_seed_different_output(gen):
    prompt = gen.tokenizer.encode("The cluster serves")
    p = SamplingParams(max_tokens=24, temperature=1.0, seed=1234, ignore_eos=True)
    a = gen.generate([prompt], p)[0]
    b = gen.generate([prompt], p)[0]
    c = gen.generate([prompt], SamplingParams(max_tokens=24, temperature=1.0, seed=99, ignore_eos=True))[0]
    assert a.token_ids == b.token_ids and a.text == b.text and a.seed == 1234
    assert a.token_ids != c.token_ids


def test_a_seeded_sequence_does_not_depend_on_its_batch(gen):
    prompt = gen.tokenizer.encode("One two three")
    p = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    alone = gen.generate([prompt], p)[0].token_ids
    others = [gen.tokenizer.encode(t) for t in ("A longer prompt with more words in it", "x")]
    mixed = gen.generate(
        [others[0], prompt, others[1]],
        [
            SamplingParams(max_tokens=5, temperature=1.0, seed=1),
            p,
            SamplingParams(max_tokens=30, temperature=0),
        ],
    )
    assert mixed[1].token_ids == alone


def test_top_k_1_generation_equals_greedy(gen):
    prompt = gen.tokenizer.encode("Greedy and top-k one agree")
    greedy = gen.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    topk1 = gen.generate(
        [prompt], SamplingParams(max_tokens=24, temperature=1.5, top_k=1, seed=3, ignore_eos=True)
    )[0]
    assert greedy.token_ids == topk1.token_ids


def test_unseeded_requests_draw_fresh_seeds(gen):
    prompt = gen.tokenizer.encode("Fresh")
    outs = gen.generate([prompt] * 2, SamplingParams(max_tokens=4, temperature=1.0))
    assert outs[0].seed != outs[1].seed
    assert all(0 <= o.seed < 2**63 for o in outs)
