"""The engine against transformers, logit by logit and token by token, for every architecture."""

import pytest
import torch
from hf_models import CASES, write_hf_checkpoint

from engine.generate import Generator
from engine.kv_cache import ContiguousKVCache, make_step
from engine.request import SamplingParams

TOL = 1e-4
DECODE_STEPS = 32


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = write_hf_checkpoint(request.param, path)
    return hf, Generator.from_pretrained(path, with_tokenizer=False)


def _cache(gen, rows, length):
    cfg = gen.config
    return ContiguousKVCache(gen.model.layer_ids, rows, length, cfg.num_kv_heads, cfg.head_dim, torch.float32)


@torch.inference_mode()
def test_prefill_and_decode_logits_match_transformers(pair):
    hf, gen = pair
    prompt = torch.randint(0, hf.config.vocab_size, (1, 19), generator=torch.Generator().manual_seed(1))
    ref = hf.generate(
        prompt,
        max_new_tokens=DECODE_STEPS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    ref_tokens = ref.sequences[0, prompt.shape[1] :].tolist()

    cache = _cache(gen, 1, prompt.shape[1] + DECODE_STEPS)
    step = make_step(prompt, [0], [0], gen.windows)
    logits = gen.model(prompt, step, cache)
    full = hf(prompt).logits
    assert (logits - full).abs().max().item() <= TOL
    for i, token in enumerate(ref_tokens):
        assert (logits[:, -1] - ref.logits[i]).abs().max().item() <= TOL, f"decode step {i}"
        x = torch.tensor([[token]])
        logits = gen.model(x, make_step(x, [prompt.shape[1] + i], [0], gen.windows), cache)


def test_greedy_continuation_matches_transformers(pair):
    hf, gen = pair
    prompt = torch.randint(0, hf.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = hf.generate(prompt, max_new_tokens=DECODE_STEPS, do_sample=False)
    ours = gen.generate(
        [prompt[0].tolist()], SamplingParams(max_tokens=DECODE_STEPS, temperature=0, ignore_eos=True)
    )
    assert ours[0].token_ids == ref[0, prompt.shape[1] :].tolist()
    assert ours[0].finish_reason == "length"


def test_batch_of_different_lengths_matches_one_by_one(pair):
    hf, gen = pair
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=g).tolist() for n in (3, 17, 9, 1)]
    params = SamplingParams(max_tokens=DECODE_STEPS, temperature=0, ignore_eos=True)
    batch = gen.generate(prompts, params)
    for prompt, out in zip(prompts, batch):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=DECODE_STEPS, do_sample=False)
        assert out.token_ids == ref[0, len(prompt) :].tolist()


@torch.inference_mode()
def test_batched_prefill_logits_match_per_prompt(pair):
    hf, gen = pair
    g = torch.Generator().manual_seed(4)
    lengths = [5, 13, 8]
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=g) for n in lengths]
    tokens = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    last = torch.tensor([n - 1 for n in lengths])
    cache = _cache(gen, len(prompts), max(lengths))
    logits = gen.model(tokens, make_step(tokens, [0] * 3, [0, 1, 2], gen.windows, last), cache)
    for i, p in enumerate(prompts):
        ref = hf(p[None]).logits[0, -1]
        assert (logits[i] - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("threads", [2, 3])
@torch.inference_mode()
def test_logits_match_transformers_with_products_split_over_threads(pair, threads):
    """On CPU a product of few rows is split over the threads (slices of the input dimension up
    to 2 rows, blocks of output columns up to 32, the head by input slices up to 32; 3 threads
    divide some of these models' widths and not others, so the fallbacks run too): every batch
    size, prefill and decode, within TOL of transformers."""
    hf, gen = pair
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(5)
        for rows in (1, 2, 5, 40):
            tokens = torch.randint(0, hf.config.vocab_size, (rows, 8), generator=g)
            ref = hf(tokens).logits
            cache = _cache(gen, rows, tokens.shape[1])
            prefill = tokens[:, :5]
            logits = gen.model(prefill, make_step(prefill, [0] * rows, list(range(rows)), gen.windows), cache)
            assert (logits - ref[:, :5]).abs().max().item() <= TOL, f"prefill of {rows} rows"
            for t in range(5, tokens.shape[1]):
                x = tokens[:, t : t + 1]
                logits = gen.model(x, make_step(x, [t] * rows, list(range(rows)), gen.windows), cache)
                assert (logits[:, 0] - ref[:, t]).abs().max().item() <= TOL, f"{rows} rows at position {t}"
    finally:
        torch.set_num_threads(saved)


@torch.inference_mode()
def test_logits_match_transformers_with_weights_stored_by_rows(pair):
    """A compiled CPU decoder turns its model's projections by rows ([out, in]); the steps it
    leaves eager (prefill, chunks) then multiply by those weights: as blocks of output rows up to
    32 rows on 2 threads, F.linear past that and on one thread. Every path within TOL of
    transformers; the turned layers hold the same weights transposed."""
    import copy

    from engine.model import Linear

    hf, gen = pair
    model = copy.deepcopy(gen.model)
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    before = [m.weight.clone() for m in layers]
    for m in layers:
        m.store_by_rows()
    assert all(m.by_rows and torch.equal(m.weight, w.t()) for m, w in zip(layers, before))
    saved = torch.get_num_threads()
    try:
        g = torch.Generator().manual_seed(6)
        for threads, rows in ((2, 1), (2, 5), (2, 40), (1, 5)):
            torch.set_num_threads(threads)
            tokens = torch.randint(0, hf.config.vocab_size, (rows, 6), generator=g)
            ref = hf(tokens).logits
            cache = _cache(gen, rows, tokens.shape[1])
            prefill = tokens[:, :5]
            logits = model(prefill, make_step(prefill, [0] * rows, list(range(rows)), gen.windows), cache)
            assert (logits - ref[:, :5]).abs().max().item() <= TOL, (
                f"prefill of {rows} rows, {threads} threads"
            )
            x = tokens[:, 5:6]
            logits = model(x, make_step(x, [5] * rows, list(range(rows)), gen.windows), cache)
            assert (logits[:, 0] - ref[:, 5]).abs().max().item() <= TOL, f"{rows} rows decoding"
    finally:
        torch.set_num_threads(saved)
