"""Continuous batching: whatever the batching, chunking and preemption, every request gets the
tokens and text it gets alone."""

import pytest

from engine.errors import RequestError
from engine.generate import Generator
from engine.request import SamplingParams
from engine.scheduler import Engine, drain


@pytest.fixture(scope="module")
def gen(tiny_demo):
    return Generator.from_pretrained(tiny_demo)


def _engine(gen, blocks=64, block_size=4, **kw):
    return Engine.for_model(gen.model, blocks, block_size, gen.tokenizer, **kw)


REQUESTS = [
    ("a", "The leader", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)),
    ("b", "A much longer prompt that needs several chunks to prefill",
     SamplingParams(max_tokens=12, temperature=0.9, seed=4, ignore_eos=True)),
    ("c", "x", SamplingParams(max_tokens=25, temperature=1.0, top_p=0.9, seed=8, ignore_eos=True)),
    ("d", "Stop at a string", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)),
]  # fmt: skip


def _alone(gen):
    return {rid: gen.generate([gen.tokenizer.encode(text)], params)[0] for rid, text, params in REQUESTS}


def _check(results, alone):
    for rid, ref in alone.items():
        outs = results[rid]
        assert [t for o in outs for t in o.token_ids] == ref.token_ids, rid
        assert "".join(o.text for o in outs) == ref.text, rid
        assert outs[-1].finish_reason == ref.finish_reason and all(o.finish_reason is None for o in outs[:-1])


@pytest.mark.parametrize("max_batched_tokens", [4, 16, 512])
def test_batched_and_chunked_outputs_equal_generation_alone(gen, max_batched_tokens):
    engine = _engine(gen, max_batched_tokens=max_batched_tokens)
    for rid, text, params in REQUESTS:
        engine.add_request(rid, gen.tokenizer.encode(text), params)
    _check(drain(engine), _alone(gen))
    assert engine.allocator.num_free == engine.num_blocks - 1


def test_requests_join_a_running_batch_and_preemption_loses_nothing(gen):
    engine = _engine(gen, blocks=18, block_size=4, max_batched_tokens=8)  # too few blocks for all at once
    results = {}
    pending = list(REQUESTS)
    steps = 0
    while pending or engine.has_work():
        if pending and steps % 3 == 0:  # a new request every third step
            rid, text, params = pending.pop(0)
            engine.add_request(rid, gen.tokenizer.encode(text), params)
        for out in engine.step():
            results.setdefault(out.request_id, []).append(out)
        steps += 1
    assert engine.preemptions > 0
    _check(results, _alone(gen))
    assert engine.allocator.num_free == engine.num_blocks - 1


def test_stop_strings_are_never_streamed_past(gen):
    prompt = gen.tokenizer.encode("Stop at a string")
    free = gen.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    stop = free.text[6:9]
    engine = _engine(gen)
    engine.add_request(
        "s", prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
    )
    outs = drain(engine)["s"]
    assert "".join(o.text for o in outs) == free.text[: free.text.find(stop)]
    assert outs[-1].finish_reason == "stop"


def test_priority_runs_first_and_abort_frees_blocks(gen):
    engine = _engine(gen, max_running=1)
    low = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    engine.add_request("low", [1, 5, 9], low, priority=0)
    engine.add_request("high", [1, 7, 7], low, priority=5)
    first = engine.step()
    assert [o.request_id for o in first] == ["high"]
    engine.add_request("gone", [1, 2, 3], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    assert engine.abort("gone") and not engine.abort("gone")
    results = drain(engine)
    assert results["gone"][-1].finish_reason == "abort" and results["gone"][-1].token_ids == []
    assert len([t for o in results["low"] for t in o.token_ids]) == 5
    assert engine.allocator.num_free == engine.num_blocks - 1


def test_a_request_that_can_never_fit_is_refused(gen):
    engine = _engine(gen, blocks=4, block_size=4)
    with pytest.raises(RequestError, match="cache blocks"):
        engine.add_request("big", [1] * 10, SamplingParams(max_tokens=10))


def test_static_batching_admits_no_one_until_the_batch_is_done_and_changes_no_output(gen):
    engine = _engine(gen, batching="static", max_running=2, max_batched_tokens=8)
    alone = _alone(gen)
    for rid, text, params in REQUESTS[:3]:
        engine.add_request(rid, gen.tokenizer.encode(text), params)
    results, first_of = {}, {}
    steps = 0
    while engine.has_work():
        for out in engine.step():
            results.setdefault(out.request_id, []).append(out)
            first_of.setdefault(out.request_id, steps)
        steps += 1
        if steps == 2:  # arrives while the first batch runs
            rid, text, params = REQUESTS[3]
            engine.add_request(rid, gen.tokenizer.encode(text), params)
    _check(results, alone)
    # a and b form the first batch; c and d start only after both have finished
    last_of_first = max(first_of["a"] + len(results["a"]), first_of["b"] + len(results["b"])) - 1
    assert first_of["c"] > last_of_first and first_of["d"] > last_of_first


def test_max_wait_holds_new_requests_until_they_fill_the_batch_or_time_runs_out(gen):
    import time

    engine = _engine(gen, max_running=3, max_wait_s=30.0)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    engine.add_request("a", [1, 5, 9], params)
    assert engine.idle_for() > 25 and engine.step() == [] and not engine.running
    engine.add_request("b", [1, 6], params)
    engine.add_request("c", [1, 7], params)  # three waiting fill the three free slots
    assert engine.idle_for() == 0
    assert sorted(o.request_id for o in engine.step()) == ["a", "b", "c"]
    quick = _engine(gen, max_running=3, max_wait_s=0.05)
    quick.add_request("a", [1, 5, 9], params)
    assert quick.step() == [] and 0 < quick.idle_for() <= 0.05
    time.sleep(0.06)
    assert [o.request_id for o in quick.step()] == ["a"]


def test_a_request_past_its_timeout_finishes_with_reason_timeout_and_frees_its_blocks(gen):
    import time

    engine = _engine(gen)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    engine.add_request("slow", [1, 5, 9], params, timeout_s=0.2)
    engine.add_request("fine", [1, 5, 9], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    engine.step()
    time.sleep(0.25)
    results = drain(engine)
    assert results["slow"][-1].finish_reason == "timeout"
    assert results["fine"][-1].finish_reason == "length"
    assert engine.allocator.num_free == engine.num_blocks - 1


@pytest.mark.parametrize("cut", [1, 7])
def test_a_request_resumed_elsewhere_with_its_tokens_goes_on_exactly_as_it_would_have(gen, cut):
    params = SamplingParams(max_tokens=16, temperature=0.9, seed=21, frequency_penalty=0.7, ignore_eos=True)
    prompt = gen.tokenizer.encode("Resume after a failover")
    whole = gen.generate([prompt], params)[0]
    first = _engine(gen)
    first.add_request("r", prompt, params)
    done: list[int] = []
    while len(done) < cut:
        done += [t for o in first.step() for t in o.token_ids]
    first.abort("r")  # the replica is lost
    second = _engine(gen, max_batched_tokens=4)
    second.add_request("r", prompt, params, generated=done)
    outs = drain(second)["r"]
    assert done + [t for o in outs for t in o.token_ids] == whole.token_ids
    assert gen.tokenizer.decode(prompt + done) + "".join(o.text for o in outs) == gen.tokenizer.decode(
        prompt + whole.token_ids
    )
