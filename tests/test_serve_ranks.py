"""End to end against a tp = 2 replica started by ``./launch.sh serve --tp 2`` (torchrun, two
processes, gloo): the openai client, concurrency, disconnects, bad input and a SIGTERM drain; and a
replica that loses a rank."""

import concurrent.futures
import http.client
import json
import re
import signal
import time
import urllib.error
import urllib.request

import openai
import psutil
import pytest
from servers import LaunchedServer, app_in_thread

from engine.generate import Generator
from engine.request import SamplingParams
from engine.scheduler import Engine
from server.app import create_app
from server.state import ServerConfig
from server.testing.cluster import get, wait_for


@pytest.fixture(scope="module")
def gen(tiny_demo):
    return Generator.from_pretrained(tiny_demo)


@pytest.fixture(scope="module")
def server(tiny_demo):
    server = LaunchedServer(
        "--model", str(tiny_demo), "--tp", "2", "--threads", "1", "--kv-cache-mib", "4",
        "--max-batched-tokens", "64", "--drain-timeout", "20",
    )  # fmt: skip
    yield server
    server.kill()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)


def _metric(server, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def _greedy(gen, text, n):
    return gen.generate(
        [gen.tokenizer.encode(text)], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    )[0]


def test_completions_and_chat_equal_one_process(server, client, gen):
    assert "on tp=2 x pp=1 ranks" in server.stderr
    ref = _greedy(gen, "The leader", 12)
    out = client.completions.create(
        model="tiny", prompt="The leader", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ref.prompt_ids), 12)
    stream = client.completions.create(
        model="tiny",
        prompt="The leader",
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == 12
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, logprobs=True
    )
    assert chat.choices[0].message.role == "assistant" and len(chat.choices[0].logprobs.content) == 6
    assert chat.usage.completion_tokens == 6


def test_a_shared_prefix_is_found_in_the_replicas_cache_and_changes_nothing(client, gen):
    prefix = "the leader of the cluster sends each rank the plan of every step, " * 3
    for i, suffix in enumerate(("and then waits", "while the ranks compute")):
        ref = _greedy(gen, prefix + suffix, 10)
        body = {"ignore_eos": True}
        out = client.completions.create(
            model="tiny", prompt=prefix + suffix, max_tokens=10, temperature=0, extra_body=body
        )
        assert out.choices[0].text == ref.text
        cached = out.usage.prompt_tokens_details.cached_tokens
        # the second finds the first's full blocks (16 tokens each) of the shared prefix
        assert cached == 0 if i == 0 else cached >= 16 * (len(gen.tokenizer.encode(prefix)) // 16 - 1)


def test_sampling_features_equal_one_process(client, gen):
    params = SamplingParams(max_tokens=10, temperature=0.8, seed=11, repetition_penalty=1.4, logprobs=2,
                            ignore_eos=True)  # fmt: skip
    ref = gen.generate([gen.tokenizer.encode("Penalised")], params)[0]
    out = client.completions.create(
        model="tiny",
        prompt="Penalised",
        max_tokens=10,
        temperature=0.8,
        seed=11,
        logprobs=2,
        extra_body={"repetition_penalty": 1.4, "ignore_eos": True},
    )
    assert out.choices[0].text == ref.text
    assert out.choices[0].logprobs.token_logprobs == pytest.approx([lp for lp, _ in ref.logprobs], abs=1e-4)


def test_32_concurrent_requests_each_equal_the_request_alone(client, gen):
    prompts = [f"request number {i} says" for i in range(32)]
    lengths = [4 + (i * 7) % 20 for i in range(32)]

    def one(i):
        return client.completions.create(
            model="tiny",
            prompt=prompts[i],
            max_tokens=lengths[i],
            temperature=0,
            extra_body={"ignore_eos": True},
        )

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(one, range(32)))
    for i, out in enumerate(outs):
        assert out.choices[0].text == _greedy(gen, prompts[i], lengths[i]).text, i


def test_a_disconnect_frees_the_sequence_and_bad_input_is_refused(server, client):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = {"prompt": "x", "max_tokens": 400, "stream": True, "ignore_eos": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.readline()
    assert _metric(server, "ringleader_num_requests_running") == 1
    conn.close()
    deadline = time.monotonic() + 10
    while _metric(server, "ringleader_num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(server, "ringleader_num_requests_running") == 0
    assert _metric(server, "ringleader_kv_cache_usage_perc") == 0
    bad_bodies = [({"prompt": "x", "max_tokens": -1}, "max_tokens"), ({"prompt": [99999]}, "prompt"),
                  ({"prompt": "x", "top_p": 7}, "top_p"), ({"prompt": "x", "wat": 1}, "wat")]  # fmt: skip
    for bad, param in bad_bodies:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt=bad.pop("prompt"), extra_body=bad)
        assert e.value.body["param"] == param
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2).choices


def test_sigterm_finishes_in_flight_requests_then_every_rank_exits(server, client):
    launcher = psutil.Process(server.proc.pid)
    ranks = launcher.children(recursive=True)
    assert len(ranks) == 2
    stream = client.completions.create(
        model="tiny",
        prompt="drain me",
        max_tokens=200,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    next(chunks)
    server.terminate()
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"  # finished, not cut off
    code, err = server.stop()
    assert "drained in" in err and "0 unfinished requests failed" in err
    assert code == 128 + 15 and "Traceback" not in err
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)


HUNG_RANK_TIMEOUT_S = 6.0


def test_a_hung_rank_is_declared_lost_after_the_timeout_and_the_replica_stops_serving(tiny_demo):
    server = LaunchedServer("--model", str(tiny_demo), "--tp", "2", "--threads", "1", "--kv-cache-mib", "4",
                            "--timeout", str(HUNG_RANK_TIMEOUT_S))  # fmt: skip
    try:
        ranks = {p.environ().get("RANK"): p for p in psutil.Process(server.proc.pid).children(recursive=True)}
        assert {"0", "1"} <= ranks.keys(), f"the replica's ranks: {ranks}"
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)
        chunks = iter(client.completions.create(model="tiny", prompt="hang", max_tokens=480, stream=True,
                                                extra_body={"ignore_eos": True}))  # fmt: skip
        next(chunks)
        ranks["1"].send_signal(signal.SIGSTOP)  # the head's next all-reduce waits for it
        hung = time.monotonic()
        with pytest.raises(openai.APIError, match="generation failed"):
            for _ in chunks:
                pass
        declared = time.monotonic() - hung
        answers = []  # /ready from now until the head has exited

        def head_gone() -> bool:
            answers.append(get(server.base + "/ready", timeout=0.5)[0])
            return not ranks["0"].is_running() or ranks["0"].status() == psutil.STATUS_ZOMBIE

        wait_for(head_gone, 15, "the head rank to exit")
        print(f"\nrank 1 hung: its request failed after {declared:.2f} s (--timeout "
              f"{HUNG_RANK_TIMEOUT_S:g}); /ready then answered {sorted(set(answers), key=str)}")  # fmt: skip
        assert HUNG_RANK_TIMEOUT_S - 0.5 <= declared <= HUNG_RANK_TIMEOUT_S + 15
        # the head's last line may still be in the pipe when it has exited: wait for the reader
        wait_for(lambda: "rank 0: lost the replica" in server.stderr, 5, "the head to say so")
        assert 200 not in answers  # never ready again: 503, then nothing listens
    finally:
        server.kill()


def test_ready_is_503_once_a_step_of_a_multi_rank_replica_failed(gen):
    engine = Engine.for_model(gen.model, 64, 8, gen.tokenizer)
    engine.executor.distributed = True  # a step that fails now means a lost rank

    def lost_rank():
        raise RuntimeError("Connection closed by peer")

    engine.step = lost_rank
    with app_in_thread(create_app(engine, ServerConfig(model_name="tiny"))) as (base, _):
        assert get(base + "/ready")[0] == 200
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIError, match="Connection closed by peer"):
            client.completions.create(model="tiny", prompt="x", max_tokens=2)
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(base + "/ready", timeout=5)
        message = (json.loads(not_ready.value.read()).get("error") or {}).get("message", "")
        assert not_ready.value.code == 503 and "the replica failed (Connection closed by peer)" in message
