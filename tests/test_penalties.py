"""Penalties and log-probabilities: against transformers' logits processors and generate, against
the OpenAI formula, across the plan wire format, and through the continuous-batching engine."""

import pytest
import torch
from hf_models import write_hf_checkpoint

from engine.executor import ALLOC_PAGED, Plan
from engine.generate import Generator
from engine.request import SamplingParams
from engine.sampling import Penalties, SamplingBatch, sample, sample_full
from engine.scheduler import Engine, drain

V = 101


def _histories(rng, B, prompt_len=7, out_len=9):
    prompts = [torch.randint(0, V, (prompt_len,), generator=rng).tolist() for _ in range(B)]
    outs = [torch.randint(0, V, (out_len,), generator=rng).tolist() for _ in range(B)]
    return prompts, outs


def test_repetition_penalty_equals_transformers_processor():
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = torch.Generator().manual_seed(0)
    prompts, outs = _histories(rng, 4)
    logits = torch.randn(4, V, generator=rng) * 3
    for r in (0.7, 1.3, 2.0):
        pen = Penalties(
            [0.0] * 4, [0.0] * 4, [r] * 4, [len(p) for p in prompts], [p + o for p, o in zip(prompts, outs)]
        )
        ids = torch.tensor([p + o for p, o in zip(prompts, outs)])
        ref = RepetitionPenaltyLogitsProcessor(r)(ids, logits.clone())
        assert torch.allclose(pen.apply(logits), ref, atol=1e-6)


def test_presence_and_frequency_follow_the_openai_formula():
    rng = torch.Generator().manual_seed(1)
    prompts, outs = _histories(rng, 3)
    logits = torch.randn(3, V, generator=rng)
    presence, frequency = [0.5, -1.0, 2.0], [0.25, 1.5, -2.0]
    pen = Penalties(
        presence, frequency, [1.0] * 3, [len(p) for p in prompts], [p + o for p, o in zip(prompts, outs)]
    )
    got = pen.apply(logits)
    for b in range(3):
        counts = torch.bincount(torch.tensor(outs[b]), minlength=V).float()  # prompt tokens do not count
        ref = logits[b] - counts * frequency[b] - (counts > 0).float() * presence[b]
        assert torch.allclose(got[b], ref, atol=1e-6)


def test_a_row_without_penalties_is_untouched_and_greedy_picks_the_penalised_argmax():
    logits = torch.tensor([[5.0, 4.0, 0.0], [5.0, 4.0, 0.0]])
    pen = Penalties([0.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0, 0], [[], [0]])
    batch = SamplingBatch.build([0.0, 0.0], [0, 0], [1.0, 1.0], [0, 0], [0, 0], "cpu", pen)
    assert sample(logits, batch).tolist() == [0, 1]


def test_logprobs_are_the_raw_distribution():
    rng = torch.Generator().manual_seed(2)
    logits = torch.randn(5, V, generator=rng)
    batch = SamplingBatch.build([0.8] * 5, [0] * 5, [1.0] * 5, list(range(5)), [3] * 5, "cpu", logprobs=4)
    ids, lp, top = sample_full(logits, batch)
    ref = logits.log_softmax(-1)
    assert torch.allclose(lp[:, 0], ref.gather(1, ids[:, None])[:, 0])
    assert torch.equal(top, ref.topk(4).indices) and torch.allclose(lp[:, 1:], ref.topk(4).values)


def test_plan_round_trips_every_column():
    plan = Plan(
        mb=3,
        tokens=[[5, 6, 7], [8, 0, 0]],
        starts=[0, 11],
        logit_index=[2, 0],
        lengths=[3, 1],
        block_tables=[[4, 9], [2]],
        temperature=[0.0, 0.7],
        top_k=[0, 5],
        top_p=[1.0, 0.9],
        seeds=[1, 2**62],
        counters=[0, 4],
        presence=[0.0, 1.5],
        frequency=[0.0, -0.5],
        repetition=[1.0, 1.2],
        prompt_lens=[3, 2],
        histories=[[], [8, 9, 10, 11]],
        logprobs=2,
    )
    back = Plan.decode(*plan.encode())
    assert back.block_tables == [[4, 9], [2, 0]] and back.rows == [0, 1]
    for name in ("mb", "tokens", "starts", "logit_index", "lengths", "top_k", "seeds", "counters",
                 "prompt_lens", "histories", "logprobs"):  # fmt: skip
        assert getattr(back, name) == getattr(plan, name), name
    for name in ("temperature", "top_p", "presence", "frequency", "repetition"):
        assert getattr(back, name) == pytest.approx(getattr(plan, name)), name
    control = Plan.decode(*Plan(kind=ALLOC_PAGED, cache_rows=100, cache_len=16).encode())
    assert (control.kind, control.cache_rows, control.cache_len, control.tokens) == (ALLOC_PAGED, 100, 16, [])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("penalties")
    hf = write_hf_checkpoint("llama", path, seed=5)
    return hf, Generator.from_pretrained(path, with_tokenizer=False)


def test_greedy_with_repetition_penalty_matches_transformers_generate(pair):
    hf, gen = pair
    prompt = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(3))
    ref = hf.generate(prompt, max_new_tokens=24, do_sample=False, repetition_penalty=1.5)
    plain = hf.generate(prompt, max_new_tokens=24, do_sample=False)
    params = SamplingParams(max_tokens=24, temperature=0, repetition_penalty=1.5, ignore_eos=True)
    out = gen.generate([prompt[0].tolist()], params)[0]
    assert out.token_ids == ref[0, 12:].tolist()
    assert out.token_ids != plain[0, 12:].tolist()  # the penalty changed something


def test_logprobs_match_transformers_scores(pair):
    hf, gen = pair
    prompt = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(4))
    ref = hf.generate(
        prompt, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    out = gen.generate(
        [prompt[0].tolist()], SamplingParams(max_tokens=8, temperature=0, logprobs=3, ignore_eos=True)
    )[0]
    for step, (lp, top) in enumerate(out.logprobs):
        expected = ref.logits[step][0].log_softmax(-1)
        assert lp == pytest.approx(expected[out.token_ids[step]].item(), abs=1e-4)
        assert [t for t, _ in top] == expected.topk(3).indices.tolist()
        assert [v for _, v in top] == pytest.approx(expected.topk(3).values.tolist(), abs=1e-4)


def test_the_engine_applies_penalties_and_logprobs_per_request_in_a_mixed_batch(pair):
    _, gen = pair
    rng = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, V, (n,), generator=rng).tolist() for n in (5, 17, 9, 3)]
    params = [
        SamplingParams(max_tokens=14, temperature=0, repetition_penalty=1.8, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0, logprobs=2, ignore_eos=True),
        SamplingParams(
            max_tokens=12,
            temperature=0.9,
            seed=7,
            frequency_penalty=1.0,
            presence_penalty=0.5,
            ignore_eos=True,
        ),  # fmt: skip
        SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
    ]
    alone = [gen.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    engine = Engine.for_model(gen.model, 64, 4, max_batched_tokens=8)  # chunked prefill too
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
    results = drain(engine)
    for i, ref in enumerate(alone):
        outs = results[str(i)]
        assert [t for o in outs for t in o.token_ids] == ref.token_ids, i
        if ref.logprobs:
            got = [lp for o in outs for lp in (o.logprobs or [])]
            assert [t for _, top in got for t, _ in top] == [t for _, top in ref.logprobs for t, _ in top]
            assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in ref.logprobs], abs=1e-4)
        else:
            assert all(o.logprobs is None for o in outs)
