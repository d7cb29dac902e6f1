"""Compiled decoding and the paged cache against transformers, not against our eager path: an
Engine with decode_mode="compiled" over a sliding-window model (window 7, sequences of up to 34
tokens) must produce transformers' greedy tokens, and every step's logits (the paged prefill and
each decode step, compiled and eager) must be transformers' logits for that position.

Kept fast the way tests/test_compiled.py is: a two-layer model and two buckets (max_running=2)."""

import pytest
import torch
from hf_models import write_hf_checkpoint

from engine.config import ModelConfig
from engine.loader import Checkpoint, build_model
from engine.request import SamplingParams
from engine.scheduler import Engine

TOL = 1e-4  # float32 throughout, the bound tests/test_parity.py holds the eager path to
BLOCK = 4
NEW = 20
WINDOW = 7


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("compiled-oracle")
    hf = write_hf_checkpoint("mistral", path, seed=5, sliding_window=WINDOW, num_hidden_layers=2)
    model = build_model(ModelConfig.from_hf(path), Checkpoint(path), torch.device("cpu"), None, 64)
    assert set(model.config.sliding_windows) == {WINDOW}
    return hf, model


def _reference(hf, prompt: list[int]):
    """transformers' greedy continuation of ``prompt`` with its logits; an explicit attention
    mask, since generate would otherwise mask prompt tokens equal to pad_token_id (0)."""
    return hf.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=NEW,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@torch.inference_mode()
def test_paged_engine_tokens_and_logits_equal_transformers_past_the_window(pair, mode):
    """eager: the paged cache's own attention (gathered blocks); compiled: flex attention over the pool."""
    hf, model = pair
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (9, 14)]
    refs = [_reference(hf, p) for p in prompts]
    engine = Engine.for_model(model, 40, BLOCK, decode_mode=mode, max_running=2)
    assert engine.warm_up() == ([1, 2] if mode == "compiled" else [])
    # record, per request, the logits of the rows it was sampled from: wrap step() to map rows
    logits: dict[str, list[torch.Tensor]] = {"0": [], "1": []}
    tokens: dict[str, list[int]] = {"0": [], "1": []}
    executor = engine.executor
    submit, result = executor.submit, executor.result
    plans = {}

    def record_submit(plan):
        plan.record_logits = True
        plans[plan.mb] = plan
        submit(plan)

    def record_result(mb):
        sampled = result(mb)
        plan = plans.pop(mb)
        for i, table in enumerate(plan.block_tables):
            rid = next(s.request_id for s in engine.running + engine.waiting if s.blocks is table)
            logits[rid].append(sampled.logits[i].clone())
        return sampled

    executor.submit, executor.result = record_submit, record_result
    step = 0
    while step == 0 or engine.has_work():
        if step in (0, 3):  # the second joins later: the two sequences' blocks interleave in the pool
            rid = str(step // 3)
            engine.add_request(
                rid, prompts[int(rid)], SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
            )
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
        step += 1
    if mode == "compiled":
        steps = executor.compiled.steps
        assert steps[1] >= 2 and steps[2] >= NEW - 4  # most decodes ran compiled, at both buckets
    worst = 0.0
    for rid, ref in zip("01", refs):
        assert tokens[rid] == ref.sequences[0, len(prompts[int(rid)]) :].tolist(), rid
        assert len(logits[rid]) == NEW
        for i, (ours, theirs) in enumerate(zip(logits[rid], ref.logits)):
            err = (ours - theirs[0]).abs().max().item()
            worst = max(worst, err)
            assert err <= TOL, f"request {rid}, token {i}: {err}"
    print(f"\n{mode} paged engine vs transformers: max |logit diff| {worst:.2e} over {2 * NEW} steps")


@torch.inference_mode()
def test_compiled_batch_generation_equals_transformers(pair):
    """Generator with compiled decode steps (each row a fixed run of blocks in a paged pool), on
    2 threads: three prompts of different lengths in one batch (bucket 4, whose products are
    split into column blocks), then a single prompt (bucket 1, the compiler's own product), give
    transformers' greedy tokens and logits; the decode steps ran compiled, and the smaller call
    kept the same pool."""
    from engine.executor import LocalExecutor
    from engine.generate import Generator

    hf, model = pair
    executor = LocalExecutor(model, torch.device("cpu"), "compiled")
    gen = Generator(model, executor=executor)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (14, 5, 9)]
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pool = None
        for batch in (prompts, prompts[1:2]):
            outs = gen.generate(batch, params, record_logits=True)
            pool = pool or executor.cache
            assert executor.cache is pool
            for prompt, out in zip(batch, outs):
                ref = _reference(hf, prompt)
                assert out.token_ids == ref.sequences[0, len(prompt) :].tolist()
                for i, (ours, theirs) in enumerate(zip(out.logits, ref.logits)):
                    assert (ours - theirs[0]).abs().max().item() <= TOL, f"token {i}"
    finally:
        torch.set_num_threads(saved)
    assert executor.compiled.steps == {4: NEW - 1, 1: NEW - 1}
