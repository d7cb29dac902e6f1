"""Emulated clusters for the tests and the chaos benchmark: nodes started by ``./launch.sh serve
--cluster`` on loopback, a proxy that follows ``/ready`` (as HAProxy does with Patroni), and a
steady load of openai-client requests checked against known outputs.

The load's clients never retry on their own (``max_retries=0``): a request that fails is sent
again only where the caller allows it (``Load(retry=True)``, for the loss of the leader, whose
connections break), and every such retry is counted."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import shutil
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.request

import aiohttp
import openai
from aiohttp import web

from server.testing.processes import LaunchedServer, free_port

SECRET = "test-cluster-secret"
NAMES = ("n1", "n2", "n3")
LEASE_MS = 1000
PROMPTS = [(f"request {i} of the steady load", 24 + 8 * (i % 4)) for i in range(8)]
RETRY_STATUSES = (502, 503)  # the proxy lost its upstream; no leader yet, or a member's was gone


def get(url: str, timeout: float = 1.0):
    """(status, JSON body, headers) of a GET; (None, None, {}) when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null"), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, None, dict(e.headers)
    except (OSError, ValueError):
        return None, None, {}


def member(state: dict | None, name: str) -> dict:
    """The row of member ``name`` in a ``/cluster`` answer ({} when there is none)."""
    return next((m for m in (state or {}).get("members") or [] if m.get("name") == name), {})


def counter(base: str, metric: str) -> float:
    """The sum over its labels of ``metric`` (a sample name: ``ringleader_failovers_total``) on the
    ``/metrics`` of the server at ``base``; 0 when it has not exported the metric yet."""
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError as e:
        raise AssertionError(f"{base}/metrics did not answer: {e}") from None
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return sum(float(value) for sample, value in samples if sample.split("{")[0] == metric)


def wait_for(predicate, timeout: float, what: str, step: float = 0.05):
    """``predicate()``'s first truthy value within ``timeout`` seconds, else AssertionError naming
    ``what`` was waited for."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        time.sleep(step)


class Cluster:
    def __init__(self, model, names=NAMES, extra_args: tuple[str, ...] = ()):
        self.model, self.names, self.extra_args = model, tuple(names), tuple(extra_args)
        self.state_root = tempfile.mkdtemp(prefix="ringleader-cluster-")  # each member's term and vote
        self.ports = {name: free_port() for name in self.names}
        self.spec = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in self.ports.items())
        self.nodes: dict[str, LaunchedServer] = {}
        self.joined: dict[str, str] = {}  # members started with --join, and the member they asked
        for name in self.names:
            self.start(name, wait=False)
        for name in self.names:
            self.nodes[name].wait()

    def start(self, name: str, wait: bool = True) -> None:
        """Start member ``name`` (again): with the launch list, or for a member that joined, with
        ``--join`` as the first time; either way a configuration it saved replaces them."""
        how = ["--join", self.url(self.joined[name])] if name in self.joined else ["--cluster", self.spec]
        args = ["--model", str(self.model), "--threads", "1", "--kv-cache-mib", "4",
                "--max-batched-tokens", "64", *how, "--name", name,
                "--lease-ms", str(LEASE_MS), "--state-dir", os.path.join(self.state_root, name),
                *self.extra_args]  # fmt: skip
        node = LaunchedServer(*args, port=self.ports[name], ready_path="/health", env={
            "RINGLEADER_CLUSTER_SECRET": SECRET}, defer=True)  # fmt: skip
        self.nodes[name] = node
        if wait:
            node.wait()

    def join(self, name: str, via: str, wait: bool = True) -> None:
        """Start a new member ``name`` that joins the running cluster through member ``via``."""
        self.ports[name] = free_port()
        self.names = (*self.names, name)
        self.joined[name] = via
        self.start(name, wait=wait)

    def forget(self, name: str) -> None:
        """Member ``name`` left the cluster (its process has exited): no longer one of ``names``."""
        self.names = tuple(n for n in self.names if n != name)
        self.joined.pop(name, None)
        self.nodes.pop(name).kill()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def state(self, name: str) -> dict | None:
        """Member ``name``'s ``GET /cluster``, or None when it does not answer."""
        return get(self.url(name) + "/cluster")[1]

    def running(self, name: str) -> bool:
        return self.nodes[name].proc.poll() is None

    def leader(self, timeout: float = 15.0, among=None) -> str:
        """The member that leads with a live lease (its ``/cluster`` says ``leading``), polling
        ``among`` (leave out a paused member: it would hold every poll for its whole timeout)."""
        among = self.names if among is None else among

        def one():
            up = [n for n in among if self.running(n) and self.nodes[n].leads()]
            return up[0] if up else None

        try:
            return wait_for(one, timeout, f"a leader (a member of {list(among)} leading with a lease)")
        except AssertionError as e:
            seen = {n: (self.state(n) or {}).get("role") if self.running(n) else "exited" for n in among}
            raise AssertionError(f"{e}; their roles: {seen}") from None

    def replica(self, member: str, name: str) -> dict:
        """Member ``member``'s row for replica ``name`` in its ``/cluster`` ({} when there is none)."""
        rows = (self.state(member) or {}).get("replicas") or []
        return next((r for r in rows if r.get("name") == name), {})

    def counter(self, name: str, metric: str) -> float:
        return counter(self.url(name), metric)

    def total(self, metric: str, among=None) -> float:
        """``metric`` summed over the running members ``among`` (every member by default): each
        front end counts what it routed."""
        among = self.names if among is None else among
        return sum(self.counter(n, metric) for n in among if self.running(n))

    def outstanding(self, replica: str | None = None, among=None) -> int:
        """Requests the members ``among`` have routed to ``replica`` (any when None) and not seen
        finish, from their ``/cluster``."""
        count = 0
        for n in self.names if among is None else among:
            rows = (self.state(n) or {}).get("replicas") or []
            count += sum(r.get("outstanding", 0) for r in rows if replica is None or r.get("name") == replica)
        return count

    def heal(self, timeout: float = 30.0) -> str:
        """Every member running (a paused one resumed, an exited one started again), one leader,
        and every replica routable from it; returns the leader. A fault test starts here, so that
        it can run alone or after any other."""
        for node in self.nodes.values():
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)
        for name, node in list(self.nodes.items()):
            if node.proc.poll() is not None:
                self.start(name)
        leader = self.leader(timeout=timeout)
        wait_for(lambda: all(self.replica(m, n).get("routable") for m in self.names for n in self.names),
                 timeout, f"every replica routable from every member (the leader is {leader})")  # fmt: skip
        return leader

    def stop(self) -> None:
        for node in self.nodes.values():
            node.kill()
        shutil.rmtree(self.state_root, ignore_errors=True)


class Endpoint:
    """Load clients that all send to one API base (``http://host:port/v1``)."""

    def __init__(self, base: str, label: str = "endpoint"):
        self.base, self.label = base, label

    def target(self, w: int, attempt: int = 0) -> tuple[str, str]:
        return self.label, self.base


class Members:
    """Load clients bound to members directly: worker ``w`` sends to ``names[w % len(names)]``, as
    clients spread by DNS or a load balancer stay on one member."""

    def __init__(self, cluster: Cluster, names):
        self.cluster, self.names = cluster, list(names)

    def target(self, w: int, attempt: int = 0) -> tuple[str, str]:
        """(member, its API base) for worker ``w``; a retry (``attempt`` > 0) goes to the next
        member whose process runs, as a client reconnecting through its load balancer would."""
        name = self.names[w % len(self.names)]
        if attempt:
            others = [n for n in self.cluster.names if n != name and self.cluster.running(n)]
            name = others[(w + attempt) % len(others)] if others else name
        return name, self.cluster.url(name) + "/v1"


class Proxy:
    """A load balancer in front of every member: it sends each request to the next member that
    answers ``/ready`` 200 (round robin; polled every 100 ms, as HAProxy's health checks), waiting
    up to 10 s for one. A connection the chosen member refuses (it has exited since the last poll)
    goes to the next member instead and is recorded in ``redispatched``; nothing else is retried: a
    broken upstream breaks the client's connection too. Each poll round also records which members
    said they lead (``/cluster``'s ``leading``), so that ``two_leaders`` can tell whether two ever
    led at once, and every response's member and term are kept."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.polls: list[tuple[float, list[str], list[str]]] = []  # (time, answering 200, leading)
        self.responses: list[tuple[float, str | None, int | None]] = []  # (time, node, term)
        self.up: list[str] = []  # the members answering /ready 200 at the last poll
        self.turn = 0
        self.redispatched: list[tuple[float, str]] = []  # (time, node) of connections it refused
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

    def target(self, w: int, attempt: int = 0) -> tuple[str, str]:
        return "proxy", self.base

    async def _poll(self) -> None:
        timeout = aiohttp.ClientTimeout(total=0.5)
        names = self.cluster.names

        async def status(name):
            try:
                async with self.session.get(self.cluster.url(name) + "/ready", timeout=timeout) as r:
                    ready = r.status
                async with self.session.get(self.cluster.url(name) + "/cluster", timeout=timeout) as r:
                    leading = bool((await r.json()).get("leading"))
                return ready, leading
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                return None, False

        while True:
            answers = await asyncio.gather(*(status(n) for n in names))
            up = [n for n, (code, _) in zip(names, answers) if code == 200]
            leading = [n for n, (_, leads) in zip(names, answers) if leads]
            self.polls.append((time.monotonic(), up, leading))
            self.up = up
            await asyncio.sleep(0.1)

    def _next(self) -> str | None:
        if not self.up:
            return None
        self.turn += 1
        return self.up[self.turn % len(self.up)]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization")}
        deadline = time.monotonic() + 10
        refused: set[str] = set()
        while True:
            node = self._next()
            while (node is None or node in refused) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                node = self._next()
            if node is None or node in refused:
                return web.json_response({"error": {"message": "no member ready"}}, status=503)
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
            except aiohttp.ClientConnectorError:
                # nothing listens there any more (a member that drained and exited before the next
                # poll saw it): the request never reached it, so it goes to the next member, as
                # HAProxy's redispatch does; recorded, never hidden
                self.redispatched.append((time.monotonic(), node))
                refused.add(node)
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionResetError):
                # the node went away mid-answer (or the client did): drop this connection too, so that
                # the client sees a connection error
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=502)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)

    def two_leaders(self) -> list:
        """The poll rounds in which more than one member said it led."""
        return [p for p in self.polls if len(p[2]) > 1]


class Load:
    """Client threads sending requests in a loop until stopped; odd workers stream. The clients do
    not retry (``max_retries=0``). With ``retry``, a request whose connection broke or that was
    answered 502/503 is sent again by its thread, for up to ``retry_for_s`` seconds (with Members,
    to another running member), and each such retry is counted in ``retried`` (with where the
    client was and why in ``retries``); without it, every error is a failure."""

    def __init__(self, proxy, expected: dict, workers: int = 4, retry: bool = False, retry_for_s: float = 30):
        # proxy: where each worker's client sends (a Proxy, or Members for clients on members)
        self.proxy, self.expected, self.retry, self.retry_for_s = proxy, expected, retry, retry_for_s
        self.sent = self.completed = self.retried = 0
        self.errors: list[str] = []
        self.retries: list[str] = []
        self.wrong: list[str] = []
        self.done: list[tuple[float, int]] = []  # (when, tokens) of every completed request
        self.by_target: dict[str, int] = collections.Counter()  # completed requests by where sent
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._worker, args=(w,), daemon=True) for w in range(workers)]
        for t in self.threads:
            t.start()

    def _worker(self, w: int) -> None:
        label, base = self.proxy.target(w)
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
        i = w
        while not self.stopping.is_set():
            prompt, n = PROMPTS[i % len(PROMPTS)]
            i += 1
            with self.lock:
                self.sent += 1
            until = time.monotonic() + self.retry_for_s
            attempt = 0
            while True:
                if attempt:
                    client = openai.OpenAI(base_url=self.proxy.target(w, attempt)[1], api_key="unused",
                                           max_retries=0)  # fmt: skip
                try:
                    text = self._one(client, prompt, n, stream=w % 2 == 1)
                    break
                except Exception as e:  # every failure is counted; none ends the thread
                    status = getattr(e, "status_code", None)
                    broken = isinstance(e, openai.APIConnectionError) or status in RETRY_STATUSES
                    with self.lock:
                        if self.retry and broken and time.monotonic() < until:
                            self.retried += 1
                            self.retries.append(f"{label}: {type(e).__name__} {status or ''}".strip())
                            attempt += 1
                            continue
                        self.errors.append(f"{label}: {type(e).__name__}: {e}")
                    text = None
                    break
            if attempt:
                client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
            if text is not None:
                with self.lock:
                    self.completed += 1
                    self.by_target[label] += 1
                    self.done.append((time.monotonic(), n))
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
        with self.lock:
            failed = len(self.errors)
            return {"sent": self.sent, "completed": self.completed, "failed": failed,
                    "lost": self.sent - self.completed - failed, "retried": self.retried}  # fmt: skip

    def tokens_per_s(self, start: float, end: float) -> float:
        """Output tokens of the requests that completed in [start, end), per second."""
        with self.lock:
            tokens = sum(n for t, n in self.done if start <= t < end)
        return tokens / (end - start) if end > start else 0.0


def expected_outputs(model_dir) -> dict[str, str]:
    """The greedy text of every load prompt, from the model in this process."""
    from engine.generate import Generator
    from engine.request import SamplingParams

    gen = Generator.from_pretrained(model_dir)
    return {
        p: gen.generate(
            [gen.tokenizer.encode(p)], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        )[0].text
        for p, n in PROMPTS
    }
