"""Fault tolerance with real processes: three emulated nodes (separate ``./launch.sh serve
--cluster`` invocations on loopback), one replica each, under a steady load of streaming and
non-streaming requests from the official openai client through a test-side proxy that sends
traffic to whichever node answers ``/ready`` with 200 (as HAProxy does with Patroni).

The tests run in order on one cluster: forged messages, a follower killed (and rejoining), the
leader killed (and rejoining), the leader paused past its lease. Each prints its figures."""

import asyncio
import hashlib
import hmac
import json
import os
import signal
import threading
import time
import urllib.request

import aiohttp
import openai
import pytest
from aiohttp import web
from servers import LaunchedServer, free_port

from engine.generate import Generator, SamplingParams

SECRET = "test-cluster-secret"
NAMES = ("n1", "n2", "n3")
LEASE_MS = 1000
PROMPTS = [(f"request {i} of the steady load", 24 + 8 * (i % 4)) for i in range(8)]


def _get(url: str, timeout: float = 1.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null"), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, None, dict(e.headers)
    except (OSError, ValueError):
        return None, None, {}


class Cluster:
    def __init__(self, model):
        self.model = model
        self.ports = {name: free_port() for name in NAMES}
        self.spec = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in self.ports.items())
        self.nodes: dict[str, LaunchedServer] = {}
        for name in NAMES:
            self.start(name, wait=False)
        for name in NAMES:
            self.nodes[name].wait()

    def start(self, name: str, wait: bool = True) -> None:
        args = ["--model", str(self.model), "--threads", "1", "--kv-cache-mib", "4",
                "--max-batched-tokens", "64", "--cluster", self.spec, "--name", name,
                "--lease-ms", str(LEASE_MS)]  # fmt: skip
        node = LaunchedServer(*args, port=self.ports[name], ready_path="/health", env={
            "RINGLEADER_CLUSTER_SECRET": SECRET}, defer=True)  # fmt: skip
        self.nodes[name] = node
        if wait:
            node.wait()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def state(self, name: str) -> dict | None:
        return _get(self.url(name) + "/cluster")[1]

    def leader(self, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name in NAMES:
                if self.nodes[name].proc.poll() is None and _get(self.url(name) + "/ready")[0] == 200:
                    return name
            time.sleep(0.05)
        raise AssertionError("no leader")

    def stop(self) -> None:
        for node in self.nodes.values():
            node.kill()


class Proxy:
    """Sends every request to the node that answers /ready 200 (polled every 100 ms), waiting up to
    10 s for one; records every poll round and the term every response carries."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.polls: list[tuple[float, list[str]]] = []  # (time, nodes answering 200)
        self.responses: list[tuple[float, str | None, int | None]] = []  # (time, node, term)
        self.target: str | None = None
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait(10)
        self.base = f"http://127.0.0.1:{self.port}/v1"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.loop.run_forever()

    async def _start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=1))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.poller = asyncio.ensure_future(self._poll())
        self.ready.set()

    async def _stop(self) -> None:
        self.poller.cancel()
        await self.runner.cleanup()
        await self.session.close()

    async def _poll(self) -> None:
        timeout = aiohttp.ClientTimeout(total=0.5)
        while True:

            async def status(name):
                try:
                    async with self.session.get(self.cluster.url(name) + "/ready", timeout=timeout) as r:
                        return r.status
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    return None

            codes = await asyncio.gather(*(status(n) for n in NAMES))
            up = [n for n, c in zip(NAMES, codes) if c == 200]
            self.polls.append((time.monotonic(), up))
            self.target = up[0] if len(up) == 1 else self.target if up else None
            await asyncio.sleep(0.1)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        deadline = time.monotonic() + 10
        while self.target is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.target is None:
            return web.json_response({"error": {"message": "no leader"}}, status=503)
        node = self.target
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization")}
        try:
            url = self.cluster.url(node) + request.path_qs
            async with self.session.request(request.method, url, data=body, headers=headers) as upstream:
                term = upstream.headers.get("X-Ringleader-Term")
                self.responses.append((time.monotonic(), node, int(term) if term else None))
                response = web.StreamResponse(status=upstream.status)
                response.content_type = upstream.content_type
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionResetError):
            # the node went away mid-answer: so does this connection (the client retries)
            if request.transport is not None:
                request.transport.abort()
            raise

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)

    def two_leaders(self) -> list:
        return [p for p in self.polls if len(p[1]) > 1]


class Load:
    """Client threads sending requests in a loop until stopped; odd workers stream."""

    def __init__(self, proxy: Proxy, expected: dict, workers: int = 4, retry_broken_streams: bool = False):
        self.proxy, self.expected, self.retry = proxy, expected, retry_broken_streams
        self.sent = self.completed = self.retried = 0
        self.errors: list[str] = []
        self.wrong: list[str] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._worker, args=(w,), daemon=True) for w in range(workers)]
        for t in self.threads:
            t.start()

    def _worker(self, w: int) -> None:
        client = openai.OpenAI(base_url=self.proxy.base, api_key="unused")  # the default retries
        i = w
        while not self.stopping.is_set():
            prompt, n = PROMPTS[i % len(PROMPTS)]
            i += 1
            with self.lock:
                self.sent += 1
            while True:
                try:
                    text = self._one(client, prompt, n, stream=w % 2 == 1)
                    break
                except openai.APIConnectionError as e:
                    if not self.retry:
                        with self.lock:
                            self.errors.append(f"{type(e).__name__}: {e}")
                        text = None
                        break
                    with self.lock:
                        self.retried += 1
                except openai.APIError as e:
                    with self.lock:
                        self.errors.append(f"{type(e).__name__}: {e}")
                    text = None
                    break
            if text is not None:
                with self.lock:
                    self.completed += 1
                    if text != self.expected[prompt]:
                        self.wrong.append(prompt)

    @staticmethod
    def _one(client, prompt, n, stream):
        common = {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": n,
            "temperature": 0,
            "extra_body": {"ignore_eos": True},
        }
        if not stream:
            return client.completions.create(**common).choices[0].text
        return "".join(
            c.choices[0].text for c in client.completions.create(**common, stream=True) if c.choices
        )

    def finish(self) -> dict:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=60)
        return {"sent": self.sent, "completed": self.completed, "failed": len(self.errors),
                "lost": self.sent - self.completed - len(self.errors), "retried": self.retried}  # fmt: skip


@pytest.fixture(scope="module")
def expected(tiny_demo):
    gen = Generator.from_pretrained(tiny_demo)
    params = {n: SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in PROMPTS}
    return {p: gen.generate([gen.tokenizer.encode(p)], params[n])[0].text for p, n in PROMPTS}


@pytest.fixture(scope="module")
def cluster(tiny_demo):
    c = Cluster(tiny_demo)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def proxy(cluster):
    p = Proxy(cluster)
    yield p
    p.stop()


def _sign(body: bytes, secret: str = SECRET) -> dict:
    return {"X-Ringleader-Signature": hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
            "Content-Type": "application/json"}  # fmt: skip


def _post(url, body: bytes, headers) -> int:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_forged_and_replayed_control_messages_are_refused_and_counted(cluster):
    leader = cluster.leader()
    follower = next(n for n in NAMES if n != leader)
    url = cluster.url(follower)
    term = cluster.state(follower)["term"]
    message = {
        "from": leader,
        "term": term + 5,
        "leader": leader,
        "ts": time.time(),
        "nonce": os.urandom(8).hex(),
    }
    body = json.dumps(message).encode()
    assert _post(url + "/_control/heartbeat", body, _sign(body, "wrong secret")) == 403
    assert _post(url + "/_control/heartbeat", body, {"Content-Type": "application/json"}) == 403
    stale = json.dumps({**message, "ts": time.time() - 3600}).encode()
    assert _post(url + "/_control/heartbeat", stale, _sign(stale)) == 403
    # a genuine message from the past (a stale term) is refused by its term
    old = json.dumps({**message, "term": 0, "nonce": "n-old"}).encode()
    assert _post(url + "/_control/generate", old, _sign(old)) == 409
    assert _post(url + "/_control/generate", old, _sign(old)) == 403  # the same bytes again: replayed
    assert cluster.state(follower)["term"] == term and cluster.leader() == leader
    metrics = urllib.request.urlopen(url + "/metrics").read().decode()
    counts = {r: 0.0 for r in ("bad signature", "stale", "replayed")}
    for line in metrics.splitlines():
        for reason in counts:
            if line.startswith(f'ringleader_control_rejected_total{{reason="{reason}"}}'):
                counts[reason] = float(line.split()[-1])
    print(f"\nrefused control messages on {follower}: {counts}")
    assert counts["bad signature"] == 2 and counts["stale"] == 1 and counts["replayed"] == 1


def test_a_killed_follower_costs_no_request_and_rejoins(cluster, proxy, expected):
    leader = cluster.leader()
    victim = next(n for n in NAMES if n != leader)
    load = Load(proxy, expected)
    time.sleep(3)
    before = load.completed
    cluster.nodes[victim].proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    detected = None
    while time.monotonic() - killed < 10:
        state = cluster.state(leader)
        if state and not next(m for m in state["members"] if m["name"] == victim)["alive"]:
            detected = time.monotonic() - killed
            break
        time.sleep(0.05)
    time.sleep(3)
    figures = load.finish()
    print(f"\nfollower {victim} killed: detected in {detected:.2f} s; {figures}; before the kill {before}")
    assert detected is not None and detected <= 3
    assert figures["failed"] == 0 and figures["lost"] == 0, load.errors[:3]
    assert figures["completed"] > before and not load.wrong
    # the node comes back (a new launch naming the same members), rejoins and is routed to
    cluster.start(victim)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rows = cluster.state(cluster.leader())["replicas"] or []
        if any(r["name"] == victim and r["routable"] for r in rows):
            break
        time.sleep(0.1)
    load = Load(proxy, expected, workers=6)
    time.sleep(4)
    figures = load.finish()
    served = urllib.request.urlopen(cluster.url(victim) + "/metrics").read().decode()
    tokens = next(float(line.split()[-1]) for line in served.splitlines()
                  if line.startswith("ringleader_generation_tokens_total"))  # fmt: skip
    print(f"{victim} rejoined: {figures}; it generated {tokens:.0f} tokens")
    assert figures["failed"] == 0 and not load.wrong and tokens > 0


def test_a_killed_leader_is_replaced_within_5s_and_clients_finish(cluster, proxy, expected):
    leader = cluster.leader()
    term = cluster.state(leader)["term"]
    load = Load(proxy, expected, retry_broken_streams=True)
    time.sleep(3)
    cluster.nodes[leader].proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    new = cluster.leader(timeout=10)
    failover = time.monotonic() - killed
    time.sleep(3)
    figures = load.finish()
    print(f"\nleader {leader} killed: {new} leads after {failover:.2f} s; {figures}")
    assert new != leader and failover <= 5
    assert cluster.state(new)["term"] > term
    assert figures["failed"] == 0 and figures["lost"] == 0 and not load.wrong, load.errors[:3]
    assert not proxy.two_leaders()
    cluster.start(leader)  # back as a follower


def test_a_paused_leader_steps_down_and_never_answers_in_an_old_term(cluster, proxy, expected):
    leader = cluster.leader()
    term = cluster.state(leader)["term"]
    load = Load(proxy, expected, retry_broken_streams=True)
    time.sleep(2)
    node = cluster.nodes[leader]
    node.proc.send_signal(signal.SIGSTOP)
    paused = time.monotonic()
    new = cluster.leader(timeout=10)
    new_term_began = time.monotonic()
    time.sleep(max(0.0, 2 * LEASE_MS / 1000 - (time.monotonic() - paused)))
    node.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (cluster.state(leader) or {}).get("role") == "leader":
        time.sleep(0.05)
    stepped_down = cluster.state(leader)
    time.sleep(2)
    figures = load.finish()
    print(f"\nleader {leader} paused: {new} leads; the old one says {stepped_down['role']} in term "
          f"{stepped_down['term']}; {figures}")  # fmt: skip
    assert new != leader and stepped_down["role"] != "leader" and stepped_down["term"] > term
    late = [r for r in proxy.responses if r[0] > new_term_began and r[2] is not None and r[2] <= term]
    assert not late, late
    assert not proxy.two_leaders()
    assert figures["failed"] == 0 and not load.wrong, load.errors[:3]
