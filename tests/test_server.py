"""The HTTP front end on a real socket, driven by the official openai client and raw HTTP."""

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from servers import app_in_thread

from engine.generate import Generator
from engine.request import SamplingParams
from engine.scheduler import Engine
from server.app import create_app
from server.state import ServerConfig
from server.testing.hf_tokenizers import check_text_offsets

KEY = "test-key"


@pytest.fixture(scope="module")
def gen(tiny_demo):
    return Generator.from_pretrained(tiny_demo)


@contextlib.contextmanager
def _serving(app):
    """``app`` on a free loopback port, its event loop in a thread; yields the base URL."""
    with app_in_thread(app) as (base, _):
        yield base


@pytest.fixture(scope="module")
def server(gen):
    engine = Engine.for_model(gen.model, 128, 8, gen.tokenizer, max_batched_tokens=64)
    app = create_app(engine, ServerConfig(model_name="tiny", api_key=KEY, max_queue=64, max_body_bytes=4096))
    with _serving(app) as base:
        yield base, engine


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def _raw(base, path, body=None, key=KEY, method=None, data=None):
    if data is None and body is not None:
        data = json.dumps(body).encode()
    req = urllib.request.Request(
        base + path, data=data, method=method or ("POST" if data is not None else "GET")
    )
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def test_completion_matches_the_engine_alone(client, gen):
    prompt = "The leader sends"
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, seed=1)
    ref = gen.generate([gen.tokenizer.encode(prompt)], SamplingParams(max_tokens=12, temperature=0))[0]
    assert got.choices[0].text == ref.text
    assert got.choices[0].finish_reason == ref.finish_reason
    assert got.usage.completion_tokens == len(ref.token_ids)
    assert got.usage.prompt_tokens == len(ref.prompt_ids)
    assert got.object == "text_completion" and got.model == "tiny"


def test_streaming_gives_the_same_text_and_a_usage_chunk(client):
    kwargs = dict(model="tiny", prompt="Stream me", max_tokens=16, temperature=0.8, seed=3)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_several_prompts_and_n(client):
    got = client.completions.create(
        model="tiny", prompt=["a b", "c d e"], max_tokens=5, n=2, temperature=1.0, seed=9
    )
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert got.choices[0].text != got.choices[1].text or got.choices[0].text == ""
    ids = client.completions.create(model="tiny", prompt=[[1, 5, 9], [1, 7]], max_tokens=3, temperature=0)
    assert len(ids.choices) == 2


def test_models_health_ready_metrics(server, client):
    base, _ = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert _raw(base, "/health", key=None)[0] == 200
    assert _raw(base, "/ready", key=None)[0] == 200
    status, text, headers = _raw(base, "/metrics", key=None)
    assert status == 200 and "ringleader_requests_total" in text and "ringleader_free_kv_blocks" in text


def test_metrics_count_tokens_and_latencies(server, client):
    base, _ = server

    def value(text, name):
        line = next(x for x in text.splitlines() if x.startswith(name + " ") or x.startswith(name + "{"))
        return float(line.rsplit(" ", 1)[1])

    before = _raw(base, "/metrics", key=None)[1]
    got = client.completions.create(model="tiny", prompt=[[1, 2, 3, 4]], max_tokens=6, temperature=0)
    after = _raw(base, "/metrics", key=None)[1]
    tokens = got.usage.completion_tokens
    assert (
        value(after, "ringleader_generation_tokens_total")
        - value(before, "ringleader_generation_tokens_total")
        == tokens
    )
    assert (
        value(after, "ringleader_prompt_tokens_total") - value(before, "ringleader_prompt_tokens_total") == 4
    )
    for hist in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        name = f"ringleader_{hist}_seconds_count"
        assert value(after, name) == value(before, name) + 1
    assert (
        value(after, "ringleader_inter_token_latency_seconds_count")
        - value(before, "ringleader_inter_token_latency_seconds_count")
        == tokens - 1
    )
    assert 'ringleader_request_success_total{finished_reason="length"}' in after
    assert value(after, "ringleader_process_resident_memory_bytes") > 0
    # the engine ran the request in this process: CPU use since the scrape before is not zero
    assert value(after, "ringleader_process_cpu_percent") > 0
    assert 0 <= value(after, "ringleader_kv_cache_usage_perc") <= 1


BAD_BODIES = [
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "top_k": -2}, 400, "top_k"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 17}, 400, "n"),
    ({"prompt": "x", "n": "2"}, 400, "n"),
    ({"prompt": "x", "seed": "x"}, 400, "seed"),
    ({"prompt": "x", "stop": 5}, 400, "stop"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "stop": [1]}, 400, "stop"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "priority": "high"}, 400, "priority"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[]]}, 400, "prompt"),
    ({"prompt": [1.5, 2]}, 400, "prompt"),
    ({"prompt": [[1, 99999]]}, 400, "prompt"),
    ({"prompt": [-1]}, 400, "prompt"),
    ({"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ({"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": "much"}, 400, "frequency_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    ({"prompt": "x", "echo": "yes"}, 400, "echo"),
    ({"prompt": "x", "ignore_eos": 1}, 400, "ignore_eos"),
    ({"prompt": "x", "stop_token_ids": [99999]}, 400, "stop_token_ids"),
    ({"prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ({"prompt": "x", "user": 7}, 400, "user"),
    ({"prompt": "x", "model": "other"}, 404, "model"),
    ({"model": "tiny"}, 400, "prompt"),
]


@pytest.mark.parametrize("body, status, param", BAD_BODIES)
def test_bad_requests_get_one_json_error_shape_and_the_server_keeps_serving(
    server, client, body, status, param
):
    base, _ = server
    code, text, _ = _raw(base, "/v1/completions", body)
    assert code == status
    error = json.loads(text)["error"]
    assert error["param"] == param and error["message"] and error["type"]
    assert client.completions.create(model="tiny", prompt="still here", max_tokens=2).choices


def test_transport_errors(server):
    base, _ = server
    assert _raw(base, "/v1/completions", data=b"{not json")[0] == 400
    assert _raw(base, "/v1/completions", data=b'{"prompt": "\xff\xfe"}')[0] == 400  # invalid UTF-8
    assert _raw(base, "/v1/completions", data=b"[1, 2]")[0] == 400
    assert _raw(base, "/v1/completions", {"prompt": "x"}, key="wrong")[0] == 401
    assert _raw(base, "/v1/completions", {"prompt": "x"}, key=None)[0] == 401
    assert _raw(base, "/nowhere")[0] == 404
    assert _raw(base, "/v1/completions", method="GET")[0] == 405
    code, text, _ = _raw(base, "/v1/completions", {"prompt": "x" * 10000})
    assert code == 413 and json.loads(text)["error"]["message"]


def test_a_full_queue_answers_429_with_retry_after(server):
    base, engine = server
    bodies = [{"prompt": [[1, 2, 3]] * 64, "max_tokens": 60, "temperature": 0}]  # fills the queue of 64
    results = []

    def long_request():
        results.append(_raw(base, "/v1/completions", bodies[0]))

    first = threading.Thread(target=long_request)
    first.start()
    for _ in range(500):  # until they are queued
        if engine.running or engine.waiting:
            break
        threading.Event().wait(0.01)
    code, text, headers = _raw(base, "/v1/completions", {"prompt": "one more", "max_tokens": 2})
    first.join(timeout=60)
    assert (
        code == 429 and headers.get("Retry-After") and json.loads(text)["error"]["type"] == "rate_limit_error"
    )
    assert results and results[0][0] == 200


def test_a_client_that_disconnects_frees_its_blocks(server):
    base, engine = server
    import http.client
    from urllib.parse import urlparse

    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    body = json.dumps({"prompt": "go on", "max_tokens": 400, "stream": True, "temperature": 0})
    conn.request(
        "POST",
        "/v1/completions",
        body,
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    response = conn.getresponse()
    assert response.status == 200
    response.fp.readline()  # the first event
    assert engine.running
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    for _ in range(300):
        if not engine.running and not engine.waiting:
            break
        threading.Event().wait(0.01)
    assert not engine.running and not engine.waiting
    assert engine.allocator.num_free == engine.num_blocks - 1


def test_launch_serve_answers_the_openai_client_and_drains_on_sigterm(tiny_demo):
    from servers import LaunchedServer

    # one sequence at a time: the 16 choices below take 16 runs of 480 steps, far past the drain
    server = LaunchedServer("--model", str(tiny_demo), "--kv-cache-mib", "8", "--drain-timeout", "0.8",
                            "--max-running", "1", env={"RINGLEADER_API_KEY": "k"})  # fmt: skip
    try:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        assert client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0).choices
        # a request too long to finish within the drain time, in flight when SIGTERM arrives
        stream = client.completions.create(
            model="tiny",
            prompt="hello",
            max_tokens=480,
            n=16,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        next(chunks)
        server.terminate()
        time.sleep(0.3)
        status, text, _ = _raw(server.base, "/v1/completions", {"prompt": "x"}, key="k")
        assert status == 503 and json.loads(text)["error"]["code"] == "shutting_down"
        assert _raw(server.base, "/ready", key="k")[0] == 503
        finished = set()  # the choices that ran to their end before the drain ran out
        with pytest.raises(openai.APIError, match="shut down before the request finished"):
            for chunk in chunks:
                finished.update(c.index for c in chunk.choices if c.finish_reason)
        code, err = server.stop()
    finally:
        if server.proc.poll() is None:
            server.kill()
    assert code == 0, err
    assert "KV cache" in err and "blocks of 16 tokens" in err
    assert len(finished) < 16 and f"{16 - len(finished)} unfinished requests failed" in err, err
    assert "Traceback" not in err


def test_launch_serve_rejects_bad_flags(tiny_demo):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "RINGLEADER_PYTHON": sys.executable}
    run = subprocess.run([str(ROOT / "launch.sh"), "serve", "--model", str(tiny_demo), "--block-size", "0"],
                         capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert run.returncode == 2 and "--block-size must be >= 1" in run.stderr and "Traceback" not in run.stderr
    flags = ["--model", str(tiny_demo), "--tp", "2", "--decode-mode", "compiled"]
    run = subprocess.run([str(ROOT / "launch.sh"), "serve", *flags], capture_output=True, text=True, env=env,
                         timeout=60)  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "--decode-mode compiled runs a whole model in one process; tp=2 x pp=1" in run.stderr


def test_chat_completion_uses_the_default_template(client, gen):
    from server.chat import ChatFormatter

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    prompt = ChatFormatter(gen.tokenizer).prompt_ids(messages)
    assert gen.tokenizer.decode(prompt) == "<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\n"
    ref = gen.generate([prompt], SamplingParams(max_tokens=10, temperature=0))[0]
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == ref.text
    assert got.usage.prompt_tokens == len(prompt) and got.usage.completion_tokens == len(ref.token_ids)
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


@pytest.mark.parametrize(
    "messages",
    [
        None,
        [],
        "hello",
        [{"role": "robot", "content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": 5}],
    ],
)
def test_bad_chat_messages_are_400(server, messages):
    base, _ = server
    code, text, _ = _raw(base, "/v1/chat/completions", {"messages": messages})
    assert code == 400 and json.loads(text)["error"]["param"] == "messages"


def test_a_checkpoint_chat_template_is_rendered(gen, tiny_demo, tmp_path):
    import shutil

    from engine.tokenizer import load_tokenizer
    from server.chat import ChatFormatter

    model_dir = tmp_path / "with-template"
    shutil.copytree(tiny_demo, model_dir)
    settings = json.loads((model_dir / "tokenizer_config.json").read_text())
    settings["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}>"
    )
    (model_dir / "tokenizer_config.json").write_text(json.dumps(settings))
    formatter = ChatFormatter(load_tokenizer(model_dir))
    ids = formatter.prompt_ids([{"role": "user", "content": "hey"}])
    # the BOS the template writes is one token, the special one, and nothing adds a second
    assert ids[0] == gen.tokenizer.bos_id and ids.count(gen.tokenizer.bos_id) == 1
    assert gen.tokenizer.decode(ids) == "[user] hey>"


def test_64_concurrent_requests_each_equal_the_request_alone(server, gen):
    from concurrent.futures import ThreadPoolExecutor

    base, _ = server
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
    prompts = [f"Request number {i} of the crowd" for i in range(64)]

    def ask(prompt):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(ask, prompts))
    alone = gen.generate(
        [gen.tokenizer.encode(p) for p in prompts], SamplingParams(max_tokens=8, temperature=0)
    )
    for answer, ref in zip(answers, alone):
        assert answer.choices[0].text == ref.text
        assert answer.usage.completion_tokens == len(ref.token_ids)


def test_logprobs_echo_and_penalties(client, gen):
    prompt = gen.tokenizer.encode("Log me")
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=3, frequency_penalty=1.2, ignore_eos=True)
    ref = gen.generate([prompt], params)[0]
    out = client.completions.create(
        model="tiny",
        prompt="Log me",
        max_tokens=6,
        temperature=0,
        logprobs=3,
        frequency_penalty=1.2,
        extra_body={"ignore_eos": True},
    ).choices[0]
    assert out.text == ref.text
    lp = out.logprobs
    assert lp.token_logprobs == pytest.approx([v for v, _ in ref.logprobs], abs=1e-4)
    # top_logprobs maps each token's name to its log-probability: every entry has a name of its own
    assert len(lp.top_logprobs) == 6 and all(len(top) == 3 for top in lp.top_logprobs)
    assert [max(top.values()) for top in lp.top_logprobs] == pytest.approx(
        [top[0][1] for _, top in ref.logprobs]
    )
    assert lp.tokens == [gen.tokenizer.token_text(t) for t in ref.token_ids]
    echoed = client.completions.create(
        model="tiny", prompt="Log me", max_tokens=6, temperature=0, echo=True, extra_body={"ignore_eos": True}
    )
    plain = gen.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert echoed.choices[0].text == "Log me" + plain.text
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in entries)
    assert all(e.logprob <= 0 for e in entries)


def test_byte_fallback_and_padded_ids_in_logprobs(client, gen):
    """A byte-fallback token is shown as its byte (``bytes:\\xNN``) with that one byte; text_offset
    indexes the returned text; none of the 20 entries of a position is lost (ids past the
    vocabulary: tests/test_hf_checkpoint.py, whose model has a padded embedding)."""
    tok = gen.tokenizer
    seen_byte = False
    for text in ("Log me", "数字", "emoji 🎉", "The leader"):
        prompt = tok.encode(text)
        ref = gen.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
        got = client.completions.create(
            model="tiny",
            prompt=text,
            max_tokens=24,
            temperature=0,
            logprobs=20,
            extra_body={"ignore_eos": True},
        ).choices[0]
        lp = got.logprobs
        assert got.text == ref.text and all(len(top) == 20 for top in lp.top_logprobs)
        for token_id, name in zip(ref.token_ids, lp.tokens):
            if tok.sp.is_byte(token_id):
                seen_byte = True
                assert name == f"bytes:\\x{int(tok.sp.id_to_piece(token_id)[3:5], 16):02x}"
        check_text_offsets(tok.decode, got.text, ref.token_ids, lp.text_offset)
        chat = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": text}],
            max_tokens=24,
            temperature=0,
            logprobs=True,
            top_logprobs=1,
            extra_body={"ignore_eos": True},
        ).choices[0]
        for e in chat.logprobs.content:
            if e.token.startswith("bytes:"):
                assert len(e.bytes) == 1 and e.token == f"bytes:\\x{e.bytes[0]:02x}"
            else:
                assert bytes(e.bytes).decode() == e.token
    assert seen_byte


def test_a_request_past_the_timeout_fails_with_504_and_a_stream_ends_with_an_error_event(gen):
    engine = Engine.for_model(gen.model, 128, 8, gen.tokenizer)
    app = create_app(engine, ServerConfig(model_name="tiny", request_timeout_s=0.3))
    with _serving(app) as base:
        body = {"prompt": "slow", "max_tokens": 480, "n": 16, "ignore_eos": True}
        status, text, _ = _raw(base, "/v1/completions", body, key=None)
        assert status == 504 and json.loads(text)["error"]["code"] == "timeout"
        status, text, _ = _raw(base, "/v1/completions", {**body, "stream": True}, key=None)
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        assert status == 200 and events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["type"] == "timeout_error"
        assert _raw(base, "/v1/completions", {"prompt": "fast", "max_tokens": 2}, key=None)[0] == 200
    assert engine.allocator.num_free == engine.num_blocks - 1
