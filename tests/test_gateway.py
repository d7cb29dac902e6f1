"""Ringleader replicas behind the real Shepherd Model Gateway (``smg launch --backend vllm``, over
the gRPC worker service), driven by the official openai client.

The checkpoint is a tiny random Llama with a Llama-3-style tokenizer.json and chat template (what
the gateway needs: it tokenizes, renders the template and detokenizes in Rust). Its output
projection is zero for every token that is special, an eos id, past the vocabulary or not valid
UTF-8 by itself, so that greedy text is plain text that both front ends decode alike (a random
model otherwise emits byte fragments, which the two detokenizers render differently) and every
request runs to max_tokens.

- Greedy completions and chat completions, streamed and not, through the gateway equal the same
  requests sent to the replica's own HTTP front end; a recording gRPC proxy between the gateway
  and the replica checks that the prompt ids the gateway sends are exactly ours (``/tokenize``:
  for completions without special tokens, as the gateway tokenizes them; for chat, the template).
- A stream closed by the client after its first chunk is aborted on the replica.
- Of two replicas, one SIGKILLed under light load is taken out: every request sent from a bounded
  time after the kill on succeeds, on the other replica.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import openai
import psutil
import pytest
import torch
from hf_models import make_hf_model
from servers import LaunchedServer, free_port
from smg_grpc_proto import vllm_engine_pb2 as pb

from server.testing.hf_tokenizers import write_llama3_tokenizer

MODEL = "llama3-gw"  # the checkpoint directory's name: the model id of both front ends
PROMPTS = ["The quick brown fox", "def add(a, b):", "数字 12345 和", "Once upon a time 🎉"]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour please"},
]
NEW_TOKENS = 20
LONG = 900  # max_tokens of the request cancelled at the client (the context is 1024)
KILL_BOUND_S = 12.0  # every request sent this long after a replica's kill must succeed
SMG = Path(sys.executable).with_name("smg")


# ------------------------------------------------------------------------------------- the pieces


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    path = write_llama3_tokenizer(tmp_path_factory.mktemp("gw") / MODEL, vocab_size=600)
    tok = AutoTokenizer.from_pretrained(path)
    model = make_hf_model("llama", vocab_size=len(tok) + 7, max_position_embeddings=1024)
    eos = model.config.eos_token_id  # config.json's (2): the replica stops at it too
    special = (
        set(tok.all_special_ids)
        | set(tok.added_tokens_decoder)
        | set(eos if isinstance(eos, list) else [eos])
    )
    clean = [
        i
        for i in range(len(tok))
        if i not in special and "\ufffd" not in tok.decode([i]) and tok.decode([i]).strip()
    ]
    assert len(clean) > 200
    with torch.no_grad():
        keep = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.bool)
        keep[clean] = True
        model.lm_head.weight[~keep] = 0.0  # logit 0, below the best of hundreds of random ones
    model.save_pretrained(path)
    return path


def _worker(checkpoint: Path) -> LaunchedServer:
    grpc_port = free_port()
    server = LaunchedServer(
        "--model", str(checkpoint), "--grpc-port", str(grpc_port), "--threads", "1", "--kv-cache-mib", "8"
    )
    server.grpc_port = grpc_port
    return server


@pytest.fixture(scope="module")
def worker(checkpoint, request) -> LaunchedServer:
    server = _worker(checkpoint)
    request.addfinalizer(server.kill)
    return server


class Gateway:
    """``smg launch --backend vllm`` in front of gRPC workers, on free loopback ports: the router's
    and the Prometheus exporter's, the only two it opens here (its probe port and its mesh port
    are off unless asked for); ready once ``GET /workers`` lists every worker."""

    def __init__(
        self, model_dir: Path, grpc_ports: list[int], log_path: Path, *extra: str, timeout: float = 60.0
    ):
        self.port, self.prometheus_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [str(SMG), "launch", "--backend", "vllm", "--model-path", str(model_dir)]
        cmd += ["--worker-urls", *(f"grpc://127.0.0.1:{p}" for p in grpc_ports)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--policy", "round_robin"]
        cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(self.prometheus_port)]
        cmd += ["--log-level", "warn", *extra]
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ)
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smg exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.base + "/workers", timeout=2) as r:
                    if len(_workers(json.loads(r.read()))) == len(grpc_ports):
                        break
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"smg not ready after {timeout} s:\n{self.log()}")
            time.sleep(0.2)
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def listening(self) -> set[int]:
        return {
            c.laddr.port
            for c in psutil.Process(self.proc.pid).net_connections("inet")
            if c.status == psutil.CONN_LISTEN
        }

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def _workers(listing) -> list:
    return listing.get("workers", listing) if isinstance(listing, dict) else listing


def _remaining(context) -> float | None:
    """The caller's deadline (grpc answers about 2**63 seconds for a call without one)."""
    left = context.time_remaining()
    return None if left is None or left > 1e6 else left


class RecordingProxy(grpc.GenericRpcHandler):
    """A gRPC server on a free port that forwards every call of the worker protocol (and the health
    service) to ``target`` byte for byte, cancellation included, and keeps each GenerateRequest."""

    KINDS = {
        **{
            (f"/{m.containing_service.full_name}/{m.name}"): m.server_streaming
            for m in pb.DESCRIPTOR.services_by_name["VllmEngine"].methods
        },
        "/grpc.health.v1.Health/Check": False,
        "/grpc.health.v1.Health/Watch": True,
    }

    def __init__(self, target: str):
        self.channel = grpc.insecure_channel(target)
        self.generate: list[pb.GenerateRequest] = []
        self.port = free_port()
        self.server = grpc.server(ThreadPoolExecutor(32), handlers=[self])
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def service(self, details):
        method = details.method
        if method not in self.KINDS:
            return None
        if method.endswith("/Generate"):
            upstream = self.channel.unary_stream(method)

            def generate(request: bytes, context):
                self.generate.append(pb.GenerateRequest.FromString(request))
                yield from self._forward(upstream, request, context)

            return grpc.unary_stream_rpc_method_handler(generate)
        if self.KINDS[method]:
            upstream = self.channel.unary_stream(method)
            return grpc.unary_stream_rpc_method_handler(
                lambda request, context: self._forward(upstream, request, context)
            )
        upstream = self.channel.unary_unary(method)

        def unary(request: bytes, context):
            try:
                return upstream(request, timeout=_remaining(context))
            except grpc.RpcError as e:
                context.abort(e.code(), e.details())

        return grpc.unary_unary_rpc_method_handler(unary)

    @staticmethod
    def _forward(upstream, request: bytes, context):
        call = upstream(request, timeout=_remaining(context))
        context.add_callback(call.cancel)
        try:
            yield from call
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED or context.is_active():
                context.abort(e.code(), e.details())

    def close(self) -> None:
        self.server.stop(0)
        self.channel.close()


@pytest.fixture(scope="module")
def proxy(worker, request) -> RecordingProxy:
    proxy = RecordingProxy(f"127.0.0.1:{worker.grpc_port}")
    request.addfinalizer(proxy.close)
    return proxy


@pytest.fixture(scope="module")
def recorded_gateway(checkpoint, proxy, tmp_path_factory, request) -> Gateway:
    gateway = Gateway(checkpoint, [proxy.port], tmp_path_factory.mktemp("smg") / "recorded.log")
    request.addfinalizer(gateway.kill)
    return gateway


@pytest.fixture(scope="module")
def gateway(checkpoint, worker, tmp_path_factory, request) -> Gateway:
    gateway = Gateway(checkpoint, [worker.grpc_port], tmp_path_factory.mktemp("smg") / "direct.log")
    request.addfinalizer(gateway.kill)
    return gateway


def _post(base: str, route: str, body: dict) -> dict:
    req = urllib.request.Request(
        base + route, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _metrics(server: LaunchedServer) -> dict[str, float]:
    with urllib.request.urlopen(server.base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {name: float(value) for name, value in re.findall(r"^(ringleader_\S+)\s+(\S+)$", text, re.M)}


def _finished(metrics: dict[str, float], reason: str) -> float:
    return metrics.get(f'ringleader_request_success_total{{finished_reason="{reason}"}}', 0.0)


def _served(server: LaunchedServer) -> float:
    return sum(v for k, v in _metrics(server).items() if k.startswith("ringleader_request_success_total"))


# ------------------------------------------------------------------------------------------ tests


def test_greedy_completions_and_chat_equal_the_replicas_own_front_end(worker, proxy, recorded_gateway):
    gw = recorded_gateway.client
    own = openai.OpenAI(base_url=worker.base + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert recorded_gateway.listening() == {recorded_gateway.port, recorded_gateway.prometheus_port}
    for text in PROMPTS:
        # the gateway tokenizes a completion's prompt without special tokens (no BOS)
        ids = _post(worker.base, "/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]
        want = own.completions.create(model=MODEL, prompt=ids, max_tokens=NEW_TOKENS, temperature=0)
        sent = len(proxy.generate)
        got = gw.completions.create(model=MODEL, prompt=text, max_tokens=NEW_TOKENS, temperature=0)
        assert [list(r.tokenized.input_ids) for r in proxy.generate[sent:]] == [ids]
        assert got.choices[0].text == want.choices[0].text and want.choices[0].text.strip()
        assert got.choices[0].finish_reason == want.choices[0].finish_reason == "length"
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), NEW_TOKENS)
        assert (want.usage.prompt_tokens, want.usage.completion_tokens) == (len(ids), NEW_TOKENS)
        for client, prompt in ((gw, text), (own, ids)):
            chunks = list(
                client.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, stream=True
                )
            )
            assert "".join(c.choices[0].text for c in chunks if c.choices) == want.choices[0].text
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    chat_ids = _post(worker.base, "/tokenize", {"messages": MESSAGES})["tokens"]
    want = own.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0)
    sent = len(proxy.generate)
    got = gw.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0)
    assert [list(r.tokenized.input_ids) for r in proxy.generate[sent:]] == [chat_ids]
    assert got.choices[0].message.content == want.choices[0].message.content
    assert want.choices[0].message.content.strip()
    assert got.choices[0].finish_reason == want.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(chat_ids), NEW_TOKENS)
    for client in (gw, own):
        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                max_tokens=NEW_TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == want.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == NEW_TOKENS
    assert all(r.sampling_params.temperature == 0 for r in proxy.generate)


def test_a_stream_closed_by_the_client_is_aborted_on_the_replica(worker, gateway):
    before = _metrics(worker)
    stream = gateway.client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=LONG, temperature=0, stream=True
    )
    first = next(c for c in stream if c.choices and c.choices[0].text)
    assert first.choices[0].finish_reason is None
    assert _metrics(worker)["ringleader_num_requests_running"] == 1
    stream.close()
    closed = time.monotonic()
    deadline = closed + 60
    while _metrics(worker)["ringleader_num_requests_running"] != 0:
        assert time.monotonic() < deadline, "the request still runs a minute after the client left"
        time.sleep(0.05)
    after = _metrics(worker)
    # it ended as aborted, not by running to max_tokens ("length")
    assert _finished(after, "abort") == _finished(before, "abort") + 1
    assert _finished(after, "length") == _finished(before, "length")
    made = after["ringleader_generation_tokens_total"] - before["ringleader_generation_tokens_total"]
    assert 1 <= made < LONG
    print(f"\ncancelled after the first chunk: {made:.0f} of {LONG} tokens generated, the replica idle "
          f"{time.monotonic() - closed:.2f} s after the close")  # fmt: skip


@pytest.mark.parametrize("flags", [(), ("--disable-retries",)], ids=["gateway-retries", "no-gateway-retries"])
def test_a_killed_replica_is_taken_out_of_routing(checkpoint, worker, tmp_path_factory, flags):
    """With its default retries the gateway resends a request that failed on the dead replica to
    the other one; without them, the requests sent at the moment of the kill fail (allowed) until
    the gateway stops routing to it (its circuit breaker, or its liveness check)."""
    victim = _worker(checkpoint)
    gateway = None
    try:
        log_path = tmp_path_factory.mktemp("smg") / "two.log"
        gateway = Gateway(checkpoint, [worker.grpc_port, victim.grpc_port], log_path, *flags)
        log: list[tuple[float, float, bool, str]] = []  # (sent, done, ok, error)
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = gateway.client.completions.create(
                        model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0, timeout=20
                    )
                    ok, error = r.usage.completion_tokens == 8, ""
                except openai.OpenAIError as e:
                    ok, error = False, f"{type(e).__name__}: {e}"[:200]
                log.append((sent, time.monotonic(), ok, error))
                stop.wait(0.05)

        served = {"survivor": _served(worker), "victim": _served(victim)}
        threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while _served(victim) - served["victim"] < 3 or _served(worker) - served["survivor"] < 3:
            assert time.monotonic() < deadline, "round robin did not reach both replicas"
            time.sleep(0.1)
        on_survivor = _served(worker)
        killed = time.monotonic()
        victim.kill()
        stop.wait(KILL_BOUND_S + 3)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        after_kill = [r for r in log if r[0] >= killed]
        failed = [r for r in log if not r[2]]
        late = [r for r in after_kill if r[0] >= killed + KILL_BOUND_S]
        assert all(r[2] for r in log if r[1] < killed), "requests failed before the kill"
        recovered = max((r[0] for r in failed), default=killed) - killed
        summary = (
            f"{len(log)} requests, {len(failed)} failed, the last failed one sent {recovered:.2f} s "
            f"after the kill; errors: {sorted({r[3] for r in failed})}"
        )
        print(f"\n{summary}")
        assert len(late) >= 10 and all(r[2] for r in late), f"{summary}\n{gateway.log()}"
        # everything after the kill that succeeded was served by the survivor
        assert _served(worker) - on_survivor >= sum(r[2] for r in after_kill)
    finally:
        if gateway is not None:
            gateway.kill()
        victim.kill()
