"""The gateway's gRPC worker service (vllm.grpc.engine.VllmEngine) on a real socket, next to the
HTTP front end of the same app, driven by a real grpcio client."""

import asyncio
import contextlib
import hashlib
import io
import json
import time
import urllib.request
import zipfile

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from servers import LaunchedServer, app_in_thread, free_port
from smg_grpc_proto import vllm_engine_pb2 as pb
from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2

from engine.generate import Generator
from engine.scheduler import Engine
from server.app import create_app
from server.grpc_service import SERVICE, add_grpc
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
    with pytest.raises(grpc.RpcError) as e:
        list(stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest()))
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "prefix cache" in e.value.details()
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == 1  # SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = list(
        reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    listed = {s.name for s in answer.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed


def test_zz_draining_reports_not_serving_and_refuses(server):
    """Last: the server drains for good."""
    _, stub, channel, _, app, loop = server
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


def test_serve_grpc_port_flag(tiny_demo):
    grpc_port = free_port()
    server = LaunchedServer("--model", str(tiny_demo), "--grpc-port", str(grpc_port), "--kv-cache-mib", "4")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.VllmEngineStub(channel)
            (reply,) = list(
                stub.Generate(_request(PROMPT, "cli", False, temperature=0, max_tokens=3), timeout=30)
            )
            assert reply.complete.completion_tokens == 3
    finally:
        code, err = server.stop()
    assert code == 0, err
    assert f"gRPC ({SERVICE}) at 127.0.0.1:{grpc_port}" in err
