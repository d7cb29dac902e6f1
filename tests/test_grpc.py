"""The gateway's gRPC worker service (vllm.grpc.engine.VllmEngine) on a real socket, next to the
HTTP front end of the same app, driven by a real grpcio client."""

import asyncio
import contextlib
import hashlib
import io
import json
import queue
import random
import threading
import time
import urllib.request
import zipfile

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from servers import LaunchedServer, app_in_thread, free_port, post_json
from smg_grpc_proto import vllm_engine_pb2 as pb
from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2

from engine.generate import Generator
from engine.kv_cache import block_hash
from engine.scheduler import Engine
from server.app import create_app
from server.grpc_service import GRPC_SERVER, SERVICE, Refused, add_grpc
from server.state import ENGINE_LOOP, ServerConfig


@contextlib.contextmanager
def _serving(app, grpc_port):
    """``app`` (HTTP and gRPC) on free loopback ports, its event loop in a thread."""
    with app_in_thread(app) as (base, loop):
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        grpc.channel_ready_future(channel).result(timeout=20)
        try:
            yield base, channel, loop
        finally:
            channel.close()


@pytest.fixture(scope="module")
def server(tiny_demo):
    gen = Generator.from_pretrained(tiny_demo)
    engine = Engine.for_model(gen.model, 64, 8, gen.tokenizer, max_batched_tokens=64)
    app = create_app(engine, ServerConfig(model_name="tiny", max_queue=16))
    grpc_port = free_port()
    add_grpc(app, "127.0.0.1", grpc_port, tiny_demo, log=False)
    with _serving(app, grpc_port) as (base, channel, loop):
        yield base, pb_grpc.VllmEngineStub(channel), channel, engine, app, loop


def _request(prompt, request_id="r", stream=True, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=request_id,
        tokenized=pb.TokenizedInput(input_ids=prompt),
        sampling_params=pb.SamplingParams(**sampling),
        stream=stream,
    )


def _http(base, body) -> dict:
    req = urllib.request.Request(
        base + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _wait_free(engine, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.free_blocks == stats.usable_blocks and stats.running == stats.waiting == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"blocks not freed: {engine.stats()}")


PROMPT = [1, 17, 42, 99, 7, 300]


def test_streaming_generate_matches_http_greedy_token_for_token(server):
    base, stub, _, engine, _, _ = server
    body = {
        "prompt": PROMPT,
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": 0,
        "ignore_eos": True,
        "return_tokens_as_token_ids": True,
    }
    http = _http(base, body)
    http_ids = [int(t.removeprefix("token_id:")) for t in http["choices"][0]["logprobs"]["tokens"]]
    replies = list(stub.Generate(_request(PROMPT, temperature=0, max_tokens=12, ignore_eos=True), timeout=30))
    chunks = [r.chunk for r in replies if r.HasField("chunk")]
    completes = [r.complete for r in replies if r.HasField("complete")]
    assert [t for c in chunks for t in c.token_ids] == http_ids
    assert len(completes) == 1 and replies[-1].HasField("complete")
    done = completes[0]
    assert done.finish_reason == http["choices"][0]["finish_reason"] == "length"
    assert (done.prompt_tokens, done.completion_tokens) == (len(PROMPT), 12)
    assert http["usage"]["completion_tokens"] == 12
    # without streaming: one complete with every token, and log-probabilities when asked
    (whole,) = list(
        stub.Generate(
            _request(PROMPT, "r2", False, temperature=0, max_tokens=12, ignore_eos=True, logprobs=2),
            timeout=30,
        )
    )
    assert list(whole.complete.output_ids) == http_ids
    lp = whole.complete.output_logprobs
    assert list(lp.token_ids) == http_ids and len(lp.token_logprobs) == 12
    assert all(len(t.token_ids) == 2 for t in lp.top_logprobs)
    _wait_free(engine)


def test_n_samples_stop_token_and_seed(server):
    _, stub, _, engine, _, _ = server
    replies = list(
        stub.Generate(
            _request(PROMPT, "n", False, temperature=1.0, seed=5, n=3, max_tokens=6, ignore_eos=True),
            timeout=30,
        )
    )
    assert sorted(r.complete.index for r in replies) == [0, 1, 2]
    again = list(
        stub.Generate(
            _request(PROMPT, "n2", False, temperature=1.0, seed=5, n=3, max_tokens=6, ignore_eos=True),
            timeout=30,
        )
    )
    ids = {r.complete.index: list(r.complete.output_ids) for r in replies}
    assert ids == {r.complete.index: list(r.complete.output_ids) for r in again}
    # a stop token id ends the sequence and is reported as the match
    greedy = list(ids.values())[0]
    first = list(stub.Generate(_request(PROMPT, "g", False, temperature=0, max_tokens=6, ignore_eos=True)))
    target = list(first[0].complete.output_ids)[2]
    (stopped,) = list(
        stub.Generate(
            _request(
                PROMPT, "s", False, temperature=0, max_tokens=6, ignore_eos=True, stop_token_ids=[target]
            )
        )
    )
    out = list(stopped.complete.output_ids)
    assert out[-1] == target and stopped.complete.finish_reason == "stop"
    assert stopped.complete.matched_token_id == target and len(greedy) == 6
    _wait_free(engine)


def test_abort_ends_the_stream_and_frees_blocks(server):
    _, stub, _, engine, _, _ = server
    call = stub.Generate(_request(PROMPT, "long", max_tokens=400, ignore_eos=True, temperature=0), timeout=60)
    first = next(call)
    assert first.HasField("chunk")
    stub.Abort(pb.AbortRequest(request_ids=["long", "no-such-request"]))
    rest = list(call)
    assert rest[-1].complete.finish_reason == "abort"
    assert rest[-1].complete.completion_tokens < 400
    _wait_free(engine)


def test_client_cancellation_cancels_the_request(server):
    _, stub, _, engine, _, _ = server
    call = stub.Generate(_request(PROMPT, "gone", max_tokens=400, ignore_eos=True), timeout=60)
    next(call)
    assert engine.stats().free_blocks < engine.stats().usable_blocks
    call.cancel()
    _wait_free(engine, timeout=5)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (_request([1, 10**6]), "tokenized.input_ids"),
        (_request(PROMPT, max_tokens=0), "sampling_params.max_tokens"),
        (_request(PROMPT, min_p=0.1), "sampling_params.min_p"),
        (_request(PROMPT, json_schema="{}"), "sampling_params.json_schema"),
        (_request(PROMPT, logit_bias={3: 1.0}), "sampling_params.logit_bias"),
        (_request(PROMPT, top_p=1.5), "sampling_params.top_p"),
        (_request(PROMPT, stop=["x"]), "sampling_params.skip_special_tokens"),
        (
            pb.GenerateRequest(
                request_id="k", tokenized=pb.TokenizedInput(input_ids=PROMPT), kv_transfer_params_json="{}"
            ),
            "kv_transfer_params_json",
        ),
        (pb.GenerateRequest(request_id="e"), "tokenized"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(server, request_, field):
    _, stub, _, engine, _, _ = server
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(request_, timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field), e.value.details()
    replies = list(stub.Generate(_request(PROMPT, "ok", False, max_tokens=2), timeout=10))
    assert replies[-1].complete.completion_tokens >= 1  # still serving
    _wait_free(engine)


def test_stop_strings_and_text_prompts(server):
    _, stub, _, engine, _, _ = server
    tok = engine.tokenizer
    (whole,) = list(
        stub.Generate(_request(PROMPT, "t", False, temperature=0, max_tokens=16, ignore_eos=True))
    )
    text = tok.decode(PROMPT + list(whole.complete.output_ids))[len(tok.decode(PROMPT)) :]
    stop = next((text[i : i + 2] for i in range(1, len(text) - 2) if text[i : i + 2].strip()), None)
    assert stop is not None, text
    if stop:
        (cut,) = list(
            stub.Generate(
                _request(
                    PROMPT,
                    "t2",
                    False,
                    temperature=0,
                    max_tokens=16,
                    ignore_eos=True,
                    stop=[stop],
                    skip_special_tokens=True,
                )
            )
        )
        assert cut.complete.finish_reason == "stop" and cut.complete.matched_stop_str == stop
        assert len(cut.complete.output_ids) <= len(whole.complete.output_ids)
    by_text = pb.GenerateRequest(
        request_id="txt", text="hello", sampling_params=pb.SamplingParams(temperature=0, max_tokens=3)
    )
    (reply,) = list(stub.Generate(by_text))
    assert reply.complete.prompt_tokens == len(tok.encode("hello"))
    _wait_free(engine)


def test_info_loads_health_and_tokenizer(server):
    _, stub, channel, engine, _, _ = server
    assert stub.HealthCheck(pb.HealthCheckRequest()).healthy
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.max_context_length == engine.max_len and info.vocab_size == engine.config.vocab_size
    assert set(info.eos_token_ids) == engine.eos_ids and info.served_model_name == "tiny"
    assert info.is_generation and info.architectures
    server_info = stub.GetServerInfo(pb.GetServerInfoRequest())
    assert server_info.server_type == "vllm-grpc" and server_info.block_size == 8
    assert not server_info.is_paused and server_info.data_parallel_size == 1
    loads = stub.GetLoads(pb.GetLoadsRequest())
    assert loads.dp_rank_count == 1 and loads.loads[0].num_running_reqs == 0
    assert loads.loads[0].max_total_num_tokens == engine.stats().usable_blocks * 8
    chunks = list(stub.GetTokenizer(common_pb2.GetTokenizerRequest()))
    data = b"".join(c.data for c in chunks)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert "tokenizer.model" in names and "tokenizer_config.json" in names
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == 1  # SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = list(
        reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    listed = {s.name for s in answer.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed


class _Subscription:
    """A SubscribeKvEvents stream read in a thread, its batches (and its end) queued as they come."""

    def __init__(self, stub, start=0, early_load=False):
        request = common_pb2.SubscribeKvEventsRequest(
            start_sequence_number=start, load_records_before_first_batch=early_load
        )
        self.call = stub.SubscribeKvEvents(request, timeout=60)
        self.items: queue.Queue = queue.Queue()
        self.index: dict[int, tuple] = {}  # what the stream says is cached: hash -> (parent, token ids)
        self.last = None  # the sequence number of the last event batch taken
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for batch in self.call:
                self.items.put(batch)
            self.items.put("end")
        except grpc.RpcError as e:
            self.items.put(e)

    def next(self, timeout=10.0):
        item = self.items.get(timeout=timeout)
        if isinstance(item, grpc.RpcError):
            raise item
        return item

    def snapshot(self) -> list:
        """The snapshot's chunks, applied to the index."""
        chunks = [self.next()]
        while chunks[-1].load.load_only:  # records before the first batch
            chunks[-1:] = [self.next()]
        while chunks[-1].snapshot.index + 1 < chunks[-1].snapshot.count:
            chunks.append(self.next())
        for chunk in chunks:
            self.apply(chunk)
        return chunks

    def apply(self, batch) -> None:
        """Replay a batch as a subscriber does; a removed hash must have been stored."""
        assert batch.sequence_number == (self.last + 1 if self.last is not None else batch.sequence_number)
        for event in batch.events:
            kind = event.WhichOneof("data")
            if kind == "cleared":
                self.index.clear()
            elif kind == "stored":
                stored = event.stored
                parent = stored.parent_block_hash if stored.HasField("parent_block_hash") else None
                for block in stored.blocks:
                    self.index[block.block_hash] = (parent, tuple(block.token_ids))
                    parent = block.block_hash
            else:
                for h in event.removed.block_hashes:
                    del self.index[h]
        self.last = batch.sequence_number

    def events_until(self, seq, timeout=10.0, replay=True) -> list:
        """The event batches up to sequence ``seq`` (load_only ones skipped), applied to the index
        (``replay``) or only checked to follow each other."""
        batches = []
        deadline = time.monotonic() + timeout
        while self.last < seq:
            batch = self.next(max(0.1, deadline - time.monotonic()))
            if batch.load.load_only:
                continue
            if replay:
                self.apply(batch)
            else:
                assert batch.sequence_number == self.last + 1
                self.last = batch.sequence_number
            batches.append(batch)
        return batches


def _chain(tokens, bs=8) -> list[int]:
    """block_hash chained over the full blocks of ``tokens``."""
    hashes = []
    for i in range(len(tokens) // bs):
        hashes.append(block_hash(hashes[-1] if hashes else None, tokens[i * bs : (i + 1) * bs]))
    return hashes


def _between_steps(app, loop, fn):
    return asyncio.run_coroutine_threadsafe(app[ENGINE_LOOP].between_steps(fn), loop).result(timeout=10)


def _cache_state(app, loop) -> tuple[int, list]:
    """(the publisher's last sequence, the allocator's cached blocks), read between two steps."""
    publisher = app[GRPC_SERVER].service.kv_events
    return _between_steps(app, loop, lambda engine: (publisher.seq, engine.allocator.cached_blocks()))


def _caught_up(sub, app, loop) -> None:
    """Once idle: the subscriber has every batch, and its index is the engine's prefix cache."""
    seq, blocks = _cache_state(app, loop)
    sub.events_until(seq)
    assert sub.index == {h: (parent, tuple(tokens)) for h, parent, tokens in blocks}


def _tokens(seed, n) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


def _run(stub, engine, prompt, request_id):
    list(stub.Generate(_request(prompt, request_id, False, max_tokens=1, temperature=0), timeout=30))
    _wait_free(engine)


def test_kv_events_store_the_prompts_hash_chain_and_only_new_blocks(server):
    _, stub, _, engine, app, loop = server
    sub = _Subscription(stub)
    chunks = sub.snapshot()
    assert chunks[0].snapshot.count == len(chunks) and chunks[0].events[0].HasField("cleared")
    first = _tokens(1, 80)  # 10 full blocks of 8 in two prefill steps (max_tokens 1: no output computed)
    _run(stub, engine, first, "kv1")
    seq, _ = _cache_state(app, loop)
    batches = sub.events_until(seq)
    stored = [e.stored for b in batches for e in b.events if e.HasField("stored")]
    blocks = [b for s in stored for b in s.blocks]
    hashes = _chain(first)
    assert [b.block_hash for b in blocks] == hashes
    assert [list(b.token_ids) for b in blocks] == [first[i : i + 8] for i in range(0, 80, 8)]
    assert {b.block_size for b in blocks} == {8}
    assert not stored[0].HasField("parent_block_hash") and len(stored) >= 2
    for s in stored[1:]:  # each run after the block before it
        assert s.parent_block_hash == hashes[hashes.index(s.blocks[0].block_hash) - 1]
    assert {(s.tier, s.locality) for s in stored} == {
        (common_pb2.KV_CACHE_TIER_DEVICE, common_pb2.KV_CACHE_LOCALITY_LOCAL)
    }
    ids = [e.event_id for b in batches for e in b.events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and ids[0] > 0
    assert all(b.dp_rank == 0 and b.timestamp > 0 and b.HasField("load") for b in batches)
    # a prompt that shares its first 3 blocks stores only its last 2, after the shared ones
    second = first[:24] + _tokens(2, 16)
    _run(stub, engine, second, "kv2")
    seq, _ = _cache_state(app, loop)
    stored = [e.stored for b in sub.events_until(seq) for e in b.events if e.HasField("stored")]
    assert [b.block_hash for s in stored for b in s.blocks] == _chain(second)[3:]
    assert stored[0].parent_block_hash == hashes[2]
    _caught_up(sub, app, loop)
    sub.call.cancel()


def test_kv_events_eviction_removes_stored_hashes_and_reset_clears(server):
    base, stub, _, engine, app, loop = server
    sub = _Subscription(stub)
    sub.snapshot()
    for i in range(4):  # 25 blocks each: 63 usable blocks hold two
        _run(stub, engine, _tokens(10 + i, 200), f"evict{i}")
    seq, _ = _cache_state(app, loop)
    removed = [h for b in sub.events_until(seq) for e in b.events for h in e.removed.block_hashes]
    assert removed  # and each was stored before: the index would have raised
    assert set(removed).isdisjoint(sub.index)
    _caught_up(sub, app, loop)
    status, body = post_json(base, "/reset_prefix_cache", {})
    assert status == 200 and body["cached_blocks_dropped"] > 0
    seq, blocks = _cache_state(app, loop)
    (batch,) = sub.events_until(seq)
    assert [e.WhichOneof("data") for e in batch.events] == ["cleared"] and sub.index == {} and blocks == []
    sub.call.cancel()


def test_kv_events_late_subscriber_gets_a_chunked_snapshot_then_live_batches(server):
    _, stub, _, engine, app, loop = server
    publisher = app[GRPC_SERVER].service.kv_events
    for i in range(3):
        _run(stub, engine, _tokens(20 + i, 48), f"snap{i}")
    chunk_blocks, publisher.chunk_blocks = publisher.chunk_blocks, 4
    try:
        sub = _Subscription(stub)
        chunks = sub.snapshot()
    finally:
        publisher.chunk_blocks = chunk_blocks
    seq, blocks = _cache_state(app, loop)  # idle: as the snapshot found them
    assert len(chunks) == -(-len(blocks) // 4) and not chunks[0].load.load_only
    assert [c.sequence_number for c in chunks] == list(range(seq - len(chunks) + 1, seq + 1))
    assert [(c.snapshot.index, c.snapshot.count, c.snapshot.blocks) for c in chunks] == [
        (i, len(chunks), len(blocks)) for i in range(len(chunks))
    ]
    assert chunks[0].events[0].HasField("cleared") and chunks[0].load.HasField("max_total_num_tokens")
    events = [e for c in chunks for e in c.events]
    assert {e.event_id for e in events} == {0}
    listed = []
    for e in events[1:]:
        parent = e.stored.parent_block_hash if e.stored.HasField("parent_block_hash") else None
        for b in e.stored.blocks:
            listed.append((b.block_hash, parent, tuple(b.token_ids)))
            parent = b.block_hash
    assert listed == blocks  # every live block, parents first
    _run(stub, engine, _tokens(30, 16), "snap-live")
    live = sub.next()
    while live.load.load_only:
        live = sub.next()
    assert live.sequence_number == seq + 1 and not live.HasField("snapshot")
    sub.apply(live)
    _caught_up(sub, app, loop)
    sub.call.cancel()
    # load records first, numbered 0, when the subscriber takes them before the first batch
    early = _Subscription(stub, early_load=True)
    record = early.next()
    assert record.load.load_only and record.sequence_number == 0 and not record.events
    assert record.load.max_total_num_tokens == engine.stats().usable_blocks * 8
    assert early.snapshot()[-1].sequence_number == _cache_state(app, loop)[0]
    _caught_up(early, app, loop)
    early.call.cancel()


def test_kv_events_resume_from_a_cursor_gets_exactly_the_batches_after_it(server):
    _, stub, _, engine, app, loop = server
    live = _Subscription(stub)
    cursor = live.snapshot()[-1].sequence_number
    for i in range(3):
        _run(stub, engine, _tokens(40 + i, 24), f"resume{i}")
    seq, _ = _cache_state(app, loop)
    after = live.events_until(seq)
    assert len(after) >= 3
    resumed = _Subscription(stub, start=cursor + 1)
    resumed.last = cursor + 1
    again = resumed.events_until(seq, replay=False)
    assert [(b.sequence_number, list(b.events)) for b in again] == [
        (b.sequence_number, list(b.events)) for b in after[1:]
    ]
    resumed.call.cancel()
    # a cursor ahead of the publisher (an earlier life of the server) gets a snapshot
    ahead = _Subscription(stub, start=seq + 100)
    assert ahead.snapshot()[-1].sequence_number == seq
    _caught_up(ahead, app, loop)
    ahead.call.cancel()
    live.call.cancel()


def test_kv_events_load_records_come_with_changes_and_as_heartbeats(server):
    _, stub, _, engine, app, loop = server
    sub = _Subscription(stub)
    last = sub.snapshot()[-1]
    beats = [sub.next(3.0), sub.next(3.0)]
    for beat in beats:
        assert beat.load.load_only and not beat.events and beat.sequence_number == last.sequence_number
        assert beat.load.running_requests == beat.load.waiting_requests == 0
        assert beat.load.max_running_requests == engine.max_running
        assert beat.load.max_total_num_tokens == engine.stats().usable_blocks * 8
    assert last.load.sample < beats[0].load.sample < beats[1].load.sample
    assert 0.8 < beats[1].timestamp - beats[0].timestamp < 1.5
    # FlushCache clears; then a request on cached blocks only changes the load: records say so at once
    assert stub.FlushCache(common_pb2.FlushCacheRequest()).success
    seq, _ = _cache_state(app, loop)
    (batch,) = sub.events_until(seq)
    assert [e.WhichOneof("data") for e in batch.events] == ["cleared"]
    prompt = _tokens(50, 9)
    _run(stub, engine, prompt, "load1")  # caches its first block
    seq, _ = _cache_state(app, loop)
    sub.events_until(seq)
    started = time.monotonic()
    list(stub.Generate(_request(prompt, "load2", False, max_tokens=3, temperature=0, ignore_eos=True)))
    running = []
    while 0 not in running[1:]:
        record = sub.next(max(0.01, started + 0.9 - time.monotonic()))  # before any heartbeat
        assert record.load.load_only and record.sequence_number == seq
        running.append(record.load.running_requests)
    assert 1 in running and _cache_state(app, loop)[0] == seq
    sub.call.cancel()


def test_kv_events_cancelled_and_slow_subscribers_leave_nothing_behind(server):
    _, stub, _, engine, app, loop = server
    publisher = app[GRPC_SERVER].service.kv_events

    def none_left():
        deadline = time.monotonic() + 5
        while publisher.subscribers:
            assert time.monotonic() < deadline, publisher.subscribers
            time.sleep(0.02)

    async def snapshot_tasks():
        return [
            t for t in asyncio.all_tasks() if "_take_snapshot" in getattr(t.get_coro(), "__qualname__", "")
        ]

    none_left()  # those the tests before cancelled
    subs = [_Subscription(stub), _Subscription(stub, early_load=True)]
    for sub in subs:
        sub.snapshot()
    assert len(publisher.subscribers) == 2
    for sub in subs:
        sub.call.cancel()
    _Subscription(stub, start=10**9).call.cancel()  # at once, its snapshot perhaps not taken yet
    none_left()
    # a cancelled snapshot task ends on the event loop's next turns: wait for that, within a bound
    deadline = time.monotonic() + 5
    while left := asyncio.run_coroutine_threadsafe(snapshot_tasks(), loop).result(timeout=10):
        assert time.monotonic() < deadline, left
        time.sleep(0.02)

    async def abandoned():
        """A stream cancelled while its snapshot waits for the step in progress to end."""
        stream = publisher.stream(10**9, False)
        step = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.001)  # the stream starts and asks for its snapshot
        step.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await step
        await asyncio.sleep(0.2)  # steps have ended since: the snapshot's call would have run
        return len(publisher.subscribers)

    busy = stub.Generate(_request(PROMPT, "busy", max_tokens=400, ignore_eos=True), timeout=60)
    next(busy)  # the engine steps from now on
    assert asyncio.run_coroutine_threadsafe(abandoned(), loop).result(timeout=10) == 0
    busy.cancel()
    _wait_free(engine)

    async def slow():
        """A stream that stops reading while more batches than the history holds are published."""
        stream = publisher.stream(publisher.seq, False)
        await stream.__anext__()  # its first load record
        for _ in range(publisher.history.maxlen + 1):
            await app[ENGINE_LOOP].between_steps(lambda engine: engine.reset_prefix_cache())
        with pytest.raises(Refused) as e:
            for _ in range(3):
                await stream.__anext__()
        await stream.aclose()
        return e.value

    error = asyncio.run_coroutine_threadsafe(slow(), loop).result(timeout=30)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "start_sequence_number" in str(error)
    assert not publisher.subscribers


def test_zz_draining_reports_not_serving_and_refuses(server):
    """Last: the server drains for good."""
    _, stub, channel, _, app, loop = server
    events = _Subscription(stub)
    events.next()
    asyncio.run_coroutine_threadsafe(app[ENGINE_LOOP].drain(1.0), loop).result(timeout=10)
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 5
    while health.Check(health_pb2.HealthCheckRequest(service=SERVICE)).status != 2:  # NOT_SERVING
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not stub.HealthCheck(pb.HealthCheckRequest()).healthy
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(_request(PROMPT, "late"), timeout=10))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # a KV-event stream ends (OK) when the server drains; a new one is refused
    deadline = time.monotonic() + 3
    while (item := events.next(3.0)) != "end":
        assert item.load.load_only or item.HasField("snapshot")
        assert time.monotonic() < deadline, "the stream goes on after the drain"
    with pytest.raises(grpc.RpcError) as e:
        list(stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(), timeout=10))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_serve_grpc_port_flag(tiny_demo):
    grpc_port = free_port()
    server = LaunchedServer(
        "--model", str(tiny_demo), "--grpc-port", str(grpc_port), "--kv-cache-mib", "4", "--no-prefix-caching"
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.VllmEngineStub(channel)
            (reply,) = list(
                stub.Generate(_request(PROMPT, "cli", False, temperature=0, max_tokens=3), timeout=30)
            )
            assert reply.complete.completion_tokens == 3
            with pytest.raises(grpc.RpcError) as e:
                list(stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(), timeout=10))
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--no-prefix-caching" in e.value.details()
    finally:
        code, err = server.stop()
    assert code == 0, err
    assert f"gRPC ({SERVICE}) at 127.0.0.1:{grpc_port}" in err
