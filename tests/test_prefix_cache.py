"""Automatic prefix caching: the block manager's bookkeeping, and an engine that reuses cached
prefixes giving what it gives without them, bit for bit in float32."""

import random

import pytest

from engine.generate import Generator
from engine.kv_cache import BlockAllocator, block_hash
from engine.request import SamplingParams
from engine.scheduler import Engine, drain


def test_a_block_hash_is_chained_and_the_same_in_every_process():
    a = block_hash(None, [1, 2, 3, 4])
    assert a == block_hash(None, [1, 2, 3, 4]) and -(2**63) <= a < 2**63
    assert block_hash(None, [1, 2, 3, 5]) != a
    assert block_hash(a, [5, 6]) != block_hash(None, [5, 6])  # the parent is part of the identity
    assert block_hash(7, [5, 6]) != block_hash(8, [5, 6])
    # a fixed value: no per-process salt (a router in another process must compute the same)
    assert block_hash(None, [0]) == block_hash(None, [0]) == 599992999201982486


def test_cached_blocks_are_found_shared_and_evicted_least_recently_released_first():
    pool = BlockAllocator(7, prefix_caching=True)
    pool.events = []
    h = [block_hash(None, [1])]
    h.append(block_hash(h[0], [2]))
    h.append(block_hash(h[1], [3]))
    first = pool.allocate(3)
    pool.cache(first, h, None, [[1], [2], [3]])
    assert pool.match(h) == first and pool.match([h[0], 99, h[2]]) == first[:1] and pool.match([99]) == []
    pool.take(first[:2])  # a second user of the first two
    pool.release(first)
    assert pool.num_free == 4 and pool.num_cached_free == 1  # only the third has no user left
    pool.release(first[:2])
    assert pool.num_free == 6 and pool.num_cached_free == 3 and pool.num_cached == 3
    # never-cached blocks go first; then cached ones, the end of the chain before its start
    other = pool.allocate(4)
    assert set(other) & set(first) == {first[2]}
    assert pool.match(h) == first[:2]
    assert pool.events[-1].kind == "removed" and pool.events[-1].hashes == (h[2],)
    assert pool.allocate(3) is None and pool.num_free == 2  # nothing taken when too few are free
    pool.release(other)
    # a hash cached in another block keeps that block
    again = pool.allocate(1)
    pool.cache(again, h[:1], None, [[1]])
    assert pool.match(h[:1]) == first[:1]
    pool.release(again)
    assert pool.num_cached_free == 2 + 0 and pool.num_free == 6
    assert pool.reset() == 2 and pool.match(h) == [] and pool.num_cached_free == 0 and pool.num_free == 6
    assert [e.kind for e in pool.events] == ["stored", "removed", "cleared"]
    assert pool.events[0].hashes == tuple(h) and pool.events[0].tokens == ((1,), (2,), (3,))


def test_stored_events_name_each_run_s_parent_and_a_snapshot_lists_parents_first():
    pool = BlockAllocator(8, prefix_caching=True)
    pool.events = []
    h = [block_hash(None, [1])]
    for t in (2, 3, 4):
        h.append(block_hash(h[-1], [t]))
    a = pool.allocate(2)
    pool.cache(a, h[:2], None, [[1], [2]])
    b = pool.allocate(4)  # another sequence with the same first two blocks, computed alongside
    pool.cache(b[1:], h[1:], h[0], [[2], [3], [4]])  # h[1] is cached already: it keeps block a[1]
    assert [(e.hashes, e.parent) for e in pool.events] == [((h[0], h[1]), None), ((h[2], h[3]), h[1])]
    pool.release(a)  # a parent may now be evicted before its children (b still uses them)
    pool.allocate(2)  # the last free fresh block, and the least recently released cached one
    assert pool.events[-1].kind == "removed" and pool.events[-1].hashes == (h[1],)
    listed = [(x, parent) for x, parent, _ in pool.cached_blocks()]
    assert listed == [(h[0], None), (h[2], h[1]), (h[3], h[2])]
    pool.cache(a[1:], h[1:2], h[0], [[2]])  # stored again, after its children: listed before them
    assert [x for x, _, _ in pool.cached_blocks()] == h


def test_a_pool_without_prefix_caching_caches_nothing():
    pool = BlockAllocator(4)
    blocks = pool.allocate(2)
    pool.cache(blocks, [1, 2], None, [[1], [2]])
    assert pool.match([1, 2]) == [] and pool.num_cached == 0


@pytest.fixture(scope="module")
def gen(tiny_demo):
    return Generator.from_pretrained(tiny_demo)


def _engine(gen, caching, blocks=96, block_size=4, **kw):
    return Engine.for_model(gen.model, blocks, block_size, gen.tokenizer, prefix_caching=caching, **kw)


def _requests(vocab, n=6, prefix_len=37, seed=0):
    """Requests sharing one long prefix, with suffixes of their own; greedy and seeded sampling,
    each asking for its top log-probabilities (compared bit for bit)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]
    out = []
    for i in range(n):
        suffix = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 9))]
        temperature = 0 if i % 2 == 0 else 0.9
        params = SamplingParams(max_tokens=10, temperature=temperature, seed=i, ignore_eos=True, logprobs=5)
        out.append((f"r{i}", prefix + suffix, params))
    return out


def _tokens(results):
    return {rid: [t for o in outs for t in o.token_ids] for rid, outs in results.items()}


def _logprobs(results):
    """Every generated token's log-probability and its top five, flattened, per request."""
    return {
        rid: [x for o in outs for lp, top in o.logprobs for x in (lp, *(v for _, v in top))]
        for rid, outs in results.items()
    }


def _assert_same(got, ref, exact=False):
    assert _tokens(got) == _tokens(ref)
    assert {r: [o.finish_reason for o in outs] for r, outs in got.items()} == {
        r: [o.finish_reason for o in outs] for r, outs in ref.items()
    }
    a, b = _logprobs(got), _logprobs(ref)
    if exact:
        assert a == b
    else:
        # a one-token chunk takes the matrix-vector kernels, whose rounding differs from the
        # matrix-matrix ones by an ulp (as a batch of one decode differs from a batch of two)
        assert max(abs(x - y) for r in a for x, y in zip(a[r], b[r], strict=True)) < 1e-5


def _run(engine, requests, together=True, steps_between=0):
    results = {}
    pending = list(requests)
    while pending or engine.has_work():
        if pending:
            batch = pending if together else pending[:1]
            for rid, prompt, params in batch:
                engine.add_request(rid, prompt, params)
            pending = [] if together else pending[1:]
            if not together:  # one after another: the previous one has finished
                for out in drain_one(engine):
                    results.setdefault(out.request_id, []).append(out)
                continue
        for out in engine.step():
            results.setdefault(out.request_id, []).append(out)
    return results


def drain_one(engine):
    outs = []
    while engine.has_work():
        outs += engine.step()
    return outs


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("together", [True, False], ids=["together", "one-after-another"])
def test_outputs_with_prefix_caching_equal_outputs_without(gen, block_size, together):
    requests = _requests(gen.model.config.vocab_size)
    blocks = 800 // block_size
    plain = _engine(gen, False, blocks, block_size, max_batched_tokens=32)
    cached = _engine(gen, True, blocks, block_size, max_batched_tokens=32)
    ref = _run(plain, requests, together)
    got = _run(cached, requests, together)
    _assert_same(got, ref)
    assert cached.allocator.num_free == cached.num_blocks - 1  # every block back (cached ones free)
    stats = cached.stats()
    assert stats.prefix_cache_queries == sum(len(p) for _, p, _ in requests)
    if not together:  # each later request finds the whole shared prefix, in full blocks
        found = (37 // block_size) * block_size
        assert stats.prefix_cache_hits >= found * (len(requests) - 1)
        firsts = [outs[0].cached_tokens for outs in (got[rid] for rid, _, _ in requests)]
        assert firsts[0] == 0 and all(c >= found for c in firsts[1:])
    assert plain.stats().prefix_cache_hits == 0


def test_reused_prefix_gives_bitwise_the_same_logprobs_when_the_computed_shapes_match(gen):
    # without caching, a 32-token prefix is the first chunk (max_batched_tokens=32); with it, that
    # chunk is found in the cache: the rest is computed over the same keys in the same shapes
    shared = _requests(gen.model.config.vocab_size)
    requests = [(rid, p[:32] + p[37:] + [5, 6], params) for rid, p, params in shared]
    plain = _engine(gen, False, 200, 16, max_batched_tokens=32)
    cached = _engine(gen, True, 200, 16, max_batched_tokens=32)
    ref = _run(plain, requests, together=False)
    got = _run(cached, requests, together=False)
    _assert_same(got, ref, exact=True)
    assert [got[rid][0].cached_tokens for rid, _, _ in requests] == [0] + [32] * (len(requests) - 1)


def test_preemption_and_eviction_under_a_small_pool_lose_nothing(gen):
    requests = _requests(gen.model.config.vocab_size, n=8, seed=3)
    ref = _run(_engine(gen, False, 400, 4), requests, together=False)  # each alone, room to spare
    small = _engine(gen, True, 30, 4, max_batched_tokens=16)  # 29 blocks: two or three at a time
    evicted = []
    small.allocator.events = evicted
    pending, results, steps = list(requests), {}, 0
    while pending or small.has_work():
        if pending and steps % 2 == 0:
            small.add_request(*pending.pop(0))
        for out in small.step():
            results.setdefault(out.request_id, []).append(out)
        steps += 1
    _assert_same(results, ref)
    assert small.preemptions > 0 and any(e.kind == "removed" for e in evicted)
    assert small.stats().prefix_cache_hits > 0
    assert small.allocator.num_free == small.num_blocks - 1


def test_aborts_timeouts_and_a_failover_resume_keep_the_blocks_right(gen):
    vocab = gen.model.config.vocab_size
    (rid, prompt, params), *_ = _requests(vocab, n=1, seed=5)
    ref = _run(_engine(gen, False, 200, 4), [(rid, prompt, params)])[rid]
    engine = _engine(gen, True, 200, 4)
    engine.add_request("warm", prompt, params)
    engine.add_request("aborted", prompt + [9, 9, 9, 9, 9], params)
    engine.add_request("late", prompt, params, timeout_s=0)
    engine.step()
    assert engine.abort("aborted")
    drain(engine)
    assert engine.allocator.num_free == engine.num_blocks - 1
    # a request resumed after its replica was lost: prompt plus what it already generated
    done = [t for o in ref for t in o.token_ids]
    engine.add_request("resumed", prompt, params, generated=done[:4])
    outs = drain(engine)["resumed"]
    assert [t for o in outs for t in o.token_ids] == done[4:]
    assert outs[0].cached_tokens == (len(prompt) // 4) * 4  # its prompt's full blocks, from "warm"
    assert engine.allocator.num_free == engine.num_blocks - 1


def test_reset_forgets_every_prefix_and_is_refused_while_requests_run(gen):
    (rid, prompt, params), *_ = _requests(gen.model.config.vocab_size, n=1, seed=6)
    engine = _engine(gen, True, 200, 4)
    engine.add_request("a", prompt, params)
    drain_one(engine)
    engine.add_request("b", prompt, params)
    engine.step()
    assert engine.reset_prefix_cache() is None  # "b" runs on cached blocks
    drain_one(engine)
    cached = engine.allocator.num_cached
    assert cached >= (len(prompt) + params.max_tokens - 1) // 4
    assert engine.reset_prefix_cache() == cached and engine.allocator.num_cached == 0
    engine.add_request("c", prompt, params)
    assert drain_one(engine)[0].cached_tokens == 0
    assert engine.allocator.num_free == engine.num_blocks - 1


@pytest.fixture(scope="module")
def long_context(tiny_demo, tmp_path_factory):
    """The tiny demo checkpoint with a 2048-token context (rotary positions extend as they are)."""
    import json
    import shutil

    path = tmp_path_factory.mktemp("long") / "tiny-2k"
    shutil.copytree(tiny_demo, path)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 2048
    (path / "config.json").write_text(json.dumps(config))
    return path


def _metric(base, name):
    import re
    import urllib.request

    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def _server_engine(path, caching):
    return Engine.from_pretrained(path, device="cpu", kv_cache_mib=16, block_size=16, prefix_caching=caching)


def test_a_shared_1000_token_prefix_is_found_and_reported_in_usage_and_metrics(long_context):
    from servers import app_in_thread, post_json

    from server.app import create_app
    from server.state import ServerConfig

    rng = random.Random(7)
    prefix = [rng.randrange(3, 1024) for _ in range(1000)]
    first, second = prefix + [11, 12, 13], prefix + [21, 22]
    body = {"model": "tiny", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    answers = {}
    for caching in (False, True):
        app = create_app(_server_engine(long_context, caching), ServerConfig(model_name="tiny"))
        with app_in_thread(app) as (base, _):
            status, one = post_json(base, "/v1/completions", {**body, "prompt": first})
            assert status == 200 and one["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
            queries = _metric(base, "ringleader_prefix_cache_queries_total")
            hits = _metric(base, "ringleader_prefix_cache_hits_total")
            status, two = post_json(base, "/v1/completions", {**body, "prompt": second})
            assert status == 200
            cached = two["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert _metric(base, "ringleader_prefix_cache_hits_total") - hits == cached
            # nothing is looked up with caching off
            assert _metric(base, "ringleader_prefix_cache_queries_total") - queries == len(second) * caching
            answers[caching] = (one["choices"][0]["text"], two["choices"][0]["text"], cached)
            if caching:
                assert cached >= 960 and cached == 1000 // 16 * 16
                assert _metric(base, "ringleader_cached_free_kv_blocks") >= 1000 // 16
                # streamed, the usage chunk says the same
                chunks = _sse(base, {**body, "prompt": second, "stream": True,
                                     "stream_options": {"include_usage": True}})  # fmt: skip
                usage = chunks[-1]["usage"]
                assert usage["prompt_tokens_details"]["cached_tokens"] == (len(second) - 1) // 16 * 16
                status, reset = post_json(base, "/reset_prefix_cache", {})
                assert status == 200 and reset["cached_blocks_dropped"] >= 1000 // 16
                status, three = post_json(base, "/v1/completions", {**body, "prompt": second})
                assert three["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
                assert three["choices"][0]["text"] == two["choices"][0]["text"]
            else:
                assert cached == 0
                status, refused = post_json(base, "/reset_prefix_cache", {})
                assert status == 400 and "--no-prefix-caching" in refused["error"]["message"]
    assert answers[True][:2] == answers[False][:2]


def _sse(base, body):
    import json
    import urllib.request

    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=60) as r:
        lines = [ln[6:] for ln in r.read().decode().splitlines() if ln.startswith("data: ")]
    return [json.loads(ln) for ln in lines if ln != "[DONE]"]


def test_reset_is_refused_while_a_request_runs_and_the_server_serves_on(long_context):
    import json
    import urllib.request

    from servers import app_in_thread, post_json

    from server.app import create_app
    from server.state import ServerConfig

    app = create_app(_server_engine(long_context, True), ServerConfig(model_name="tiny"))
    with app_in_thread(app) as (base, _):
        body = {"model": "tiny", "prompt": [5] * 40, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
                "stream": True}  # fmt: skip
        req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(), method="POST")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=60) as stream:
            stream.readline()  # the first event: the request is running
            status, refused = post_json(base, "/reset_prefix_cache", {})
            assert status == 409 and refused["error"]["code"] == "requests_running"
            rest = stream.read().decode()
        assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in rest
        assert post_json(base, "/reset_prefix_cache", {})[0] == 200


def test_a_chunk_near_the_context_end_shares_a_step_with_a_wider_one(gen):
    # "late" starts on 496 cached tokens of a 512-token context and computes 4; "wide" computes 64
    # in the same step: the padding of the narrow row must not reach positions past the context
    vocab, max_len = gen.model.config.vocab_size, gen.model.rotary.max_len
    rng = random.Random(9)
    long = [rng.randrange(3, vocab) for _ in range(max_len - 16)]
    late = long[:-4] + [7, 8, 9, 10]
    wide = [rng.randrange(3, vocab) for _ in range(64)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    plain = _engine(gen, False, 200, 16, max_batched_tokens=128)
    cached = _engine(gen, True, 200, 16, max_batched_tokens=128)
    ref = {}
    for engine in (plain, cached):
        engine.add_request("long", long, params)
        drain_one(engine)
        engine.add_request("late", late, params)
        engine.add_request("wide", wide, params)
        ref[engine.prefix_caching] = _tokens(drain(engine))
    assert cached.stats().prefix_cache_hits >= len(long) - 16
    assert ref[True] == ref[False]
