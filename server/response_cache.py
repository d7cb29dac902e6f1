"""A response cache for repeated deterministic requests (``serve --response-cache memory|redis://``).

A completions or chat request whose answer is a function of the request (temperature 0, or a
seed: choice i of n samples with seed + i) is answered from the cache once an identical one has
finished. What the cache keeps is the engine's answer, not the API's: each choice's
``StepOutput``s as the request front handed them out. A hit replays them through the rendering a
computed answer goes through (``server.serving``), so its text, log-probabilities, usage and
finish reasons are those of the computed answer, streamed or whole, however the stored answer
was asked for; only id and created are new. ``x-ringleader-cache`` says what the cache did:
``hit``, ``miss`` (computed, then stored), ``skip`` (not deterministic) or ``unavailable`` (the
backend failed: computed as if there were no cache).

The key is what the engine sees: the prompts' token ids (after the chat template), n, every
field of ``SamplingParams`` (the checkpoint's defaults filled in), the names of ``StepOutput``'s
fields (a change of what is stored starts a new key space) and the model's identity
(``model_identity``). Fields that only shape the answer (stream, stream_options, echo,
return_tokens_as_token_ids, user, priority, which of the two APIs) are outside the key by
construction, and a field that changes the output reaches the engine through the prompt or
``SamplingParams``, so it is in the key without anyone adding it.

Only answers whose every choice finished with "stop" or "length" are stored; errors, aborts and
timeouts never are. Backends: ``memory`` (a least-recently-used map of ``--response-cache-size``
entries in this process) and ``redis://HOST[:PORT][/DB]`` (shared by every member of a cluster;
the ``redis`` package's asyncio client). Entries expire after ``--response-cache-ttl`` seconds.
The cache never fails a request: a lookup or store that errs or takes longer than
``OP_TIMEOUT_S`` counts in ``ringleader_response_cache_errors_total``, the backend is then left
alone for ``RETRY_AFTER_S`` (those lookups count as errors too), and requests are computed as if
there were no cache.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import sys
import time
import urllib.parse
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

from aiohttp import web

from engine.errors import RingleaderError
from engine.request import SamplingParams, StepOutput
from server.engine_loop import RequestFront
from server.state import METRICS, RESPONSE_CACHE

CACHE_HEADER = "x-ringleader-cache"
SCHEMES = ("redis", "rediss")  # rediss: Redis over TLS
NORMAL = ("stop", "length")  # the finish reasons of an answer that may be stored
TIMEOUT_S = 0.25  # Redis's connect and socket timeouts
OP_TIMEOUT_S = 0.5  # the most one lookup or store may take, whatever the backend does
RETRY_AFTER_S = 1.0  # after a failure, the backend is left alone this long
KEY_PREFIX = "ringleader:response:"
OUTPUT_FIELDS = [f.name for f in dataclasses.fields(StepOutput) if f.name != "request_id"]
# the request's entry for its header's value (aiohttp 3.14 types request storage; older ones take a str)
_OUTCOME = (
    web.RequestKey("response_cache", str) if hasattr(web, "RequestKey") else "ringleader.response_cache"
)
_UNAVAILABLE = object()


class Store(Protocol):
    """Where entries live: bytes under string keys, each for the cache's time to live."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes) -> None: ...

    async def close(self) -> None: ...


class MemoryStore:
    """A least-recently-used map of at most ``size`` entries in this process."""

    def __init__(self, size: int, ttl_s: float):
        self.size, self.ttl_s = size, ttl_s
        self.entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # key -> (expiry, value)

    async def get(self, key: str) -> bytes | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            del self.entries[key]
            return None
        self.entries.move_to_end(key)
        return entry[1]

    async def set(self, key: str, value: bytes) -> None:
        self.entries[key] = (time.monotonic() + self.ttl_s, value)
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    async def close(self) -> None:
        self.entries.clear()


class RedisStore:
    """Entries in Redis, shared by every server that uses the same URL; short socket timeouts and
    no retries, so that a dead Redis costs a request little."""

    def __init__(self, url: str, ttl_s: float, timeout_s: float = TIMEOUT_S):
        import redis.asyncio as redis  # here: 0.1 s of imports that a server without the cache skips
        from redis import exceptions
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.lost = (exceptions.ConnectionError, exceptions.TimeoutError)  # a dead or unreachable Redis
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self.ttl_ms = max(1, round(ttl_s * 1000))

    async def get(self, key: str) -> bytes | None:
        return await self._run(self.client.get, key)

    async def set(self, key: str, value: bytes) -> None:
        await self._run(self.client.set, key, value, px=self.ttl_ms)

    async def close(self) -> None:
        await self.client.aclose()

    async def _run(self, command, *args, **kwargs):
        try:
            return await command(*args, **kwargs)
        except self.lost:
            # the pool's other connections went with the one that failed: drop them, so that none
            # fails once more after Redis is back
            await self.client.connection_pool.disconnect()
            raise


def deterministic(params: SamplingParams) -> bool:
    """Whether a request's answer is a function of the request: greedy, or sampled with a seed."""
    return params.temperature == 0 or params.seed is not None


def encode(outputs: list[list[StepOutput]]) -> bytes:
    """An answer (each choice's step outputs) as an entry; ``decode`` reads it back."""
    rows = [[[getattr(out, f) for f in OUTPUT_FIELDS] for out in choice] for choice in outputs]
    return json.dumps(rows, separators=(",", ":")).encode()


def decode(data: bytes, choices: int) -> list[list[StepOutput]]:
    """An entry of ``choices`` finished choices as step outputs (request ids left empty); ValueError
    for one that is not."""
    try:
        rows = json.loads(data)
        outputs = [[StepOutput("", **dict(zip(OUTPUT_FIELDS, row, strict=True))) for row in c] for c in rows]
    except (TypeError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed response cache entry: {e}") from None
    if len(outputs) != choices or not all(c and c[-1].finish_reason in NORMAL for c in outputs):
        raise ValueError("response cache entry of another shape")
    return outputs


class ResponseCache:
    """The cache of one server: its store, the model's identity, the hit, miss and error counters."""

    def __init__(self, store: Store, identity: str, metrics: dict):
        self.store, self.identity = store, identity
        self.hits, self.misses = metrics["response_cache_hits"], metrics["response_cache_misses"]
        self.errors = metrics["response_cache_errors"]
        self.down_until = 0.0  # the backend failed: left alone until then
        self.failing = False

    def key(self, prompts: list[list[int]], params: SamplingParams, n: int) -> str:
        request = {
            "model": self.identity,
            "prompts": prompts,
            "n": n,
            "params": dataclasses.asdict(params),
            "outputs": OUTPUT_FIELDS,
        }
        canonical = json.dumps(request, sort_keys=True, separators=(",", ":"))
        return KEY_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()

    async def front(
        self,
        request: web.Request,
        inner: RequestFront,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
    ) -> RequestFront:
        """Where the request's choices go: a replay of the stored answer on a hit; ``inner``,
        recorded to be stored, on a miss; ``inner`` alone when the request is not deterministic or
        the backend is unavailable. The outcome becomes the answer's ``x-ringleader-cache``."""
        if not deterministic(params):
            request[_OUTCOME] = "skip"
            return inner
        key = self.key(prompts, params, n)
        data = await self._call(self.store.get, key)
        if data is _UNAVAILABLE:
            request[_OUTCOME] = "unavailable"
            return inner
        if data is not None:
            try:
                outputs = decode(data, len(prompts) * n)
            except ValueError:
                self.errors.inc()  # computed and stored anew
            else:
                self.hits.inc()
                request[_OUTCOME] = "hit"
                return Replay(inner, outputs)
        self.misses.inc()
        request[_OUTCOME] = "miss"
        return Recording(inner, self, key, len(prompts) * n)

    async def put(self, key: str, outputs: list[list[StepOutput]]) -> None:
        """Store an answer; never raises."""

        async def store() -> None:
            await self.store.set(key, encode(outputs))

        await self._call(store)

    async def _call(self, op, *args):
        """``op(*args)``'s result, or _UNAVAILABLE (counted) when it fails or the backend is left
        alone after a failure."""
        if time.monotonic() < self.down_until:
            self.errors.inc()
            return _UNAVAILABLE
        try:
            result = await asyncio.wait_for(op(*args), OP_TIMEOUT_S)
        except Exception as e:  # whatever the backend raises, the request goes on without the cache
            self.errors.inc()
            self.down_until = time.monotonic() + RETRY_AFTER_S
            if not self.failing:
                why = str(e) or type(e).__name__
                print(f"ringleader: response cache unavailable ({why}); computing without it",
                      file=sys.stderr, flush=True)  # fmt: skip
            self.failing = True
            return _UNAVAILABLE
        if self.failing:
            print("ringleader: response cache available again", file=sys.stderr, flush=True)
            self.failing = False
        return result


class _Wrapped:
    """A request front over another, for one request."""

    def __init__(self, inner: RequestFront):
        self.inner = inner

    @property
    def draining(self) -> bool:
        return self.inner.draining

    @property
    def fatal(self) -> BaseException | None:
        return self.inner.fatal

    @property
    def task(self) -> asyncio.Task | None:
        return self.inner.task

    def outstanding(self) -> int:
        return self.inner.outstanding()

    def cancel(self, request_id: str) -> None:
        self.inner.cancel(request_id)

    async def drain(self, timeout_s: float) -> int:
        return await self.inner.drain(timeout_s)


class Replay(_Wrapped):
    """A hit: the i-th choice submitted gets the stored answer's i-th choice, and takes no place in
    the queue."""

    def __init__(self, inner: RequestFront, outputs: list[list[StepOutput]]):
        super().__init__(inner)
        self.outputs = outputs
        self.submitted = 0

    def outstanding(self) -> int:
        return 0

    def submit(self, request_id, prompt, params, priority, timeout_s=None) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        for out in self.outputs[self.submitted]:
            queue.put_nowait(dataclasses.replace(out, request_id=request_id))
        self.submitted += 1
        return queue

    def cancel(self, request_id: str) -> None:
        pass


class Recording(_Wrapped):
    """A miss: each choice's outputs pass through on their way to the answer; once the last choice
    has finished, and every one with "stop" or "length", the answer is stored before its last
    output goes on."""

    def __init__(self, inner: RequestFront, cache: ResponseCache, key: str, choices: int):
        super().__init__(inner)
        self.cache, self.key = cache, key
        self.outputs: list[list[StepOutput]] = [[] for _ in range(choices)]
        self.pumps: dict[str, asyncio.Task] = {}
        self.finished, self.spoiled = 0, False

    def submit(self, request_id, prompt, params, priority, timeout_s=None) -> asyncio.Queue:
        source = self.inner.submit(request_id, prompt, params, priority, timeout_s)
        queue: asyncio.Queue = asyncio.Queue()
        self.pumps[request_id] = asyncio.create_task(self._pump(len(self.pumps), source, queue))
        return queue

    async def _pump(self, index: int, source: asyncio.Queue, queue: asyncio.Queue) -> None:
        while True:
            item = await source.get()
            last = not isinstance(item, StepOutput) or item.finish_reason is not None
            if last:
                self.finished += 1
                if not (isinstance(item, StepOutput) and item.finish_reason in NORMAL):
                    self.spoiled = True
            self.outputs[index].append(item)
            try:
                if last and self.finished == len(self.outputs) and not self.spoiled:
                    await self.cache.put(self.key, self.outputs)
            finally:
                queue.put_nowait(item)
            if last:
                return

    def cancel(self, request_id: str) -> None:
        self.inner.cancel(request_id)
        pump = self.pumps.get(request_id)
        if pump is not None and not pump.done():
            pump.cancel()


async def _mark(request: web.Request, response: web.StreamResponse) -> None:
    outcome = request.get(_OUTCOME)
    if outcome is not None:
        response.headers[CACHE_HEADER] = outcome


def add_response_cache(app: web.Application, store: Store, identity: str) -> ResponseCache:
    """Answer ``app``'s deterministic completions and chat requests from ``store``; ``identity``
    names the model (``model_identity``), so that servers of other models sharing a Redis never
    answer for each other."""
    cache = ResponseCache(store, identity, app[METRICS])
    app[RESPONSE_CACHE] = cache
    app.on_response_prepare.append(_mark)

    async def close(app: web.Application) -> None:
        await store.close()

    app.on_cleanup.append(close)
    return cache


WHOLE_FILE_BYTES = 8 << 20  # files up to this size are fingerprinted whole
WINDOWS, WINDOW_BYTES = 16, 64 << 10  # larger ones (the weights): windows spread over the file


def model_identity(model_dir, dtype: str, quantize: str | None) -> str:
    """A fingerprint of the model a server runs: the checkpoint directory's files by name, the small
    ones (config, tokenizer, generation_config, chat template) whole and the large ones (weights) by
    size and ``WINDOWS`` windows spread over them, with the dtype and quantization. Replicas of one
    checkpoint share entries wherever it is stored; a changed checkpoint starts afresh (a fine-tune
    changes every tensor; a change confined to the bytes between two windows would go unseen)."""
    h = hashlib.sha256(f"{dtype}|{quantize}".encode())
    for path in sorted(p for p in Path(model_dir).iterdir() if p.is_file()):
        size = path.stat().st_size
        h.update(f"|{path.name}|{size}|".encode())
        with path.open("rb") as f:
            if size <= WHOLE_FILE_BYTES:
                h.update(f.read())
                continue
            for i in range(WINDOWS):
                f.seek((size - WINDOW_BYTES) * i // (WINDOWS - 1))
                h.update(f.read(WINDOW_BYTES))
    return h.hexdigest()


def backend(value: str) -> str:
    """``--response-cache``'s value: ``memory``, or a Redis URL ``redis://HOST[:PORT][/DB]``."""
    if value == "memory":
        return value
    parts = urllib.parse.urlsplit(value)
    try:
        ok = parts.scheme in SCHEMES and bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:  # a port that is no number
        ok = False
    if not ok or not (parts.path in ("", "/") or parts.path[1:].isdigit()):
        raise argparse.ArgumentTypeError(f"expected memory or redis://HOST[:PORT][/DB], got {value!r}")
    return value


def _positive(kind):
    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            number = None
        if number is None or not number > 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {value!r}")
        return number

    return parse


def add_response_cache_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("response cache (answers to repeated deterministic requests)")
    group.add_argument(
        "--response-cache",
        type=backend,
        default=None,
        metavar="memory|redis://HOST[:PORT][/DB]",
        help="memory (this process) or redis://HOST[:PORT][/DB] (shared by every server that uses it); "
        "default: off",
    )
    group.add_argument(
        "--response-cache-size",
        type=_positive(int),
        default=None,
        metavar="N",
        help="entries the memory cache holds, least recently used evicted first (default 1024)",
    )
    group.add_argument(
        "--response-cache-ttl",
        type=_positive(float),
        default=None,
        metavar="S",
        help="seconds an entry lives (default 3600)",
    )


def check_response_cache_flags(args) -> None:
    """RingleaderError for knobs that do not go with ``--response-cache``'s value."""
    if args.response_cache is None:
        for flag in ("response_cache_size", "response_cache_ttl"):
            if getattr(args, flag) is not None:
                raise RingleaderError(f"--{flag.replace('_', '-')} needs --response-cache")
    elif args.response_cache != "memory" and args.response_cache_size is not None:
        raise RingleaderError(
            "--response-cache-size bounds the memory cache; Redis bounds its own (its maxmemory setting)"
        )


def store_from_flags(args) -> Store | None:
    """The store ``--response-cache`` names, or None when it is off."""
    check_response_cache_flags(args)
    ttl_s = args.response_cache_ttl or 3600.0
    if args.response_cache is None:
        return None
    if args.response_cache == "memory":
        return MemoryStore(args.response_cache_size or 1024, ttl_s)
    return RedisStore(args.response_cache, ttl_s)
