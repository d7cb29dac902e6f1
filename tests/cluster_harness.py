"""Emulated clusters for tests and the chaos benchmark: nodes started by ``./launch.sh serve
--cluster`` on loopback, a proxy that follows ``/ready`` (as HAProxy does with Patroni), and a
steady load of openai-client requests checked against known outputs."""

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

import aiohttp
import openai
from aiohttp import web
from servers import LaunchedServer, free_port

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

    def leader(self, timeout: float = 15.0, among=NAMES) -> str:
        """The member answering /ready 200, polling ``among`` (leave out a paused member: it
        would hold every poll for its whole timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name in among:
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
            # the node went away mid-answer (or the client did): drop this connection too, so that
            # the client sees a connection error and retries
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=502)

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
        self.done: list[tuple[float, int]] = []  # (when, tokens) of every completed request
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
        return {"sent": self.sent, "completed": self.completed, "failed": len(self.errors),
                "lost": self.sent - self.completed - len(self.errors), "retried": self.retried}  # fmt: skip

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
