"""OpenAI-compatible HTTP front end over a continuous-batching engine (aiohttp).

``create_app(engine, config)`` builds the application. One background task owns the engine: it
hands new requests and cancellations to it between steps and runs each step in a worker thread,
so the event loop never blocks on the model; every step's outputs go to the waiting handlers.
A client that disconnects cancels its request, whose cache blocks are free before the next step.

Routes: POST /v1/completions and /v1/chat/completions (streaming as server-sent events),
GET /v1/models, GET /health,
GET /ready, GET /metrics (Prometheus). Every error is one JSON shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
import uuid
from dataclasses import dataclass, field

import aiohttp
import psutil
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from engine.errors import RequestError
from engine.generate import MAX_LOGPROBS, SamplingParams, check_request
from engine.hardware import gpus
from engine.scheduler import Engine, StepOutput
from engine.tokenizer import IncrementalDetokenizer
from server.chat import ChatError, ChatFormatter
from server.cluster import (
    SIGNATURE,
    TERM_HEADER,
    Cluster,
    Forged,
    Signer,
    add_control_routes,
    cluster_metrics,
    verified,
)
from server.metrics import RequestTimings
from server.router import NoReplica, Router, ServerShutdown


@dataclass
class ServerConfig:
    model_name: str = "ringleader"
    api_key: str | None = None
    max_queue: int = 256  # requests waiting or running; more get 429
    max_body_bytes: int = 1 << 20
    request_timeout_s: float | None = None  # a request still running after this fails with 504
    drain_timeout_s: float = 20.0  # on shutdown, how long in-flight requests may take to finish
    # sampling values a request that leaves them out gets (generation_config.json's, as vLLM)
    sampling_defaults: dict = field(default_factory=dict)


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error_body(status, message, type_, param=None, code=None):
    return web.json_response(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}, status=status
    )


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as e:
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        response = _error_body(e.status, e.message, e.type, e.param, e.code)
        if headers:
            response.headers.update(headers)
        return response
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}
        return _error_body(e.status, e.reason or "error", kind.get(e.status, "invalid_request_error"))


class EngineLoop:
    """Owns the engine: the only code that calls it."""

    def __init__(self, engine: Engine, metrics: dict):
        self.engine, self.metrics = engine, metrics
        self.incoming: list[tuple[str, list[int], SamplingParams, int]] = []
        self.cancels: list[str] = []
        self.queues: dict[str, asyncio.Queue] = {}
        self.wake = asyncio.Event()
        self.steps = 0
        self.task: asyncio.Task | None = None
        self.timings = RequestTimings(metrics)
        self.draining = False
        self.stopping = False
        self.idle = asyncio.Event()  # set whenever no request is outstanding
        self.fatal: BaseException | None = None  # why the replica can no longer run steps
        self.on_fatal = None  # called with that error
        self.step_started: float | None = None  # when the step in progress began
        self.step_deadline_s: float | None = None  # a step running longer is a hung replica

    def stalled(self) -> bool:
        """A step has run past the step deadline: a rank of the replica hangs."""
        started, deadline = self.step_started, self.step_deadline_s
        return started is not None and deadline is not None and time.monotonic() - started > deadline

    def submit(
        self, request_id, prompt, params, priority, timeout_s=None, generated=None, observe=True
    ) -> asyncio.Queue:
        """Queue a request; its outputs (or an exception) arrive on the returned queue. ``observe``:
        count it in the latency metrics (not when a cluster's router already does)."""
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = queue
        self.idle.clear()
        if observe:
            self.timings.start(request_id, len(prompt))
        self.incoming.append((request_id, prompt, params, priority, timeout_s, generated))
        self.wake.set()
        return queue

    async def drain(self, timeout_s: float) -> int:
        """Stop taking requests, give the running ones ``timeout_s`` to finish, then fail the rest
        with ``ServerShutdown``. Returns how many were failed."""
        self.draining = True
        if self.queues:
            try:
                await asyncio.wait_for(self.idle.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        left = list(self.queues)
        for request_id in left:
            self.cancel(request_id)
            self._deliver(
                request_id,
                ServerShutdown.after(timeout_s),
            )
        return len(left)

    def cancel(self, request_id: str) -> None:
        if request_id in self.queues:
            self.cancels.append(request_id)
            self.wake.set()

    def outstanding(self) -> int:
        return len(self.queues)

    def stop(self) -> None:
        """End the loop after the step in progress (a step is never cut off halfway: on a
        multi-rank replica the other ranks are in the middle of it too)."""
        self.stopping = True
        self.wake.set()

    async def _sleep(self, seconds: float | None) -> bool:
        """Wait for news (True) or ``seconds`` (False)."""
        self.wake.clear()
        try:
            await asyncio.wait_for(self.wake.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        executor = self.engine.executor
        keepalive = executor.keepalive_s
        while not self.stopping:
            idle = not (self.incoming or self.cancels or self.engine.has_work())
            held = 0.0 if idle or self.incoming or self.cancels else self.engine.idle_for()
            if idle or held > 0:
                # nothing to do, or new requests held back to batch them (max wait); a replica on
                # other ranks hears from the head at least every keepalive interval
                delay = held or None
                if keepalive is not None:
                    delay = keepalive if delay is None else min(delay, keepalive)
                if not await self._sleep(delay) and idle and keepalive is not None:
                    await loop.run_in_executor(None, executor.keepalive)
                continue
            for request_id, prompt, params, priority, timeout_s, generated in self.incoming:
                try:
                    self.engine.add_request(request_id, prompt, params, priority, timeout_s, generated)
                except RequestError as e:
                    self._deliver(request_id, e)
            self.incoming.clear()
            for request_id in self.cancels:
                self.engine.abort(request_id)
            self.cancels.clear()
            if not self.engine.has_work():
                continue
            try:
                self.step_started = time.monotonic()
                outputs = await loop.run_in_executor(None, self.engine.step)
            except Exception as e:
                # a failed step fails its requests, never the server; a replica that lost a rank
                # cannot run another step, so the server stops serving (and says so on /ready)
                for request_id in list(self.queues):
                    self.engine.abort(request_id)
                    self._deliver(request_id, e)
                if executor.distributed:
                    self.fatal = e
                    if self.on_fatal is not None:
                        self.on_fatal(e)
                    return
                continue
            finally:
                self.step_started = None
            self.steps += 1
            self.metrics["steps"].inc()
            for out in outputs:
                self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item) -> None:
        queue = self.queues.get(request_id)
        if queue is None:
            return
        queue.put_nowait(item)
        if isinstance(item, StepOutput):
            self.timings.observe(request_id, item, self.engine.admitted.get(request_id))
        if not isinstance(item, StepOutput) or item.finish_reason is not None:
            del self.queues[request_id]
            self.timings.end(request_id)
            self.engine.admitted.pop(request_id, None)
            if not self.queues:
                self.idle.set()


ENGINE_LOOP = web.AppKey("engine_loop", EngineLoop)
CONFIG = web.AppKey("config", ServerConfig)
ENGINE = web.AppKey("engine", Engine)
METRICS = web.AppKey("metrics", dict)
CHAT_FORMATTER = web.AppKey("chat_formatter", ChatFormatter)
STARTED = web.AppKey("started", int)  # when the server started (Unix time): /v1/models' "created"
FRONT = web.AppKey("front", object)  # where requests go: the engine loop, or a cluster's router
CLUSTER = web.AppKey("cluster", Cluster)
ROUTER = web.AppKey("router", Router)
PROXY = web.AppKey("proxy", aiohttp.ClientSession)


def _check_auth(request: web.Request) -> None:
    key = request.app[CONFIG].api_key
    if key and request.headers.get("Authorization") != f"Bearer {key}":
        raise ApiError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")


async def _json_body(request: web.Request) -> dict:
    if request.content_length is not None and request.content_length > request.app[CONFIG].max_body_bytes:
        raise ApiError(413, f"request body over {request.app[CONFIG].max_body_bytes} bytes")
    try:
        body = await request.json()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"request body over {request.app[CONFIG].max_body_bytes} bytes") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _field(body: dict, name: str, kinds, default, check=None, why=""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ApiError(400, f"'{name}' must be {why or kinds}", param=name)
    if not isinstance(value, kinds) or (check is not None and not check(value)):
        raise ApiError(400, f"'{name}' must be {why}, got {value!r}", param=name)
    return value


def _prompts(body: dict, engine: Engine) -> list[list[int]]:
    prompt = body.get("prompt")
    tok = engine.tokenizer
    if prompt == "" or prompt == [] or prompt == [""]:
        raise ApiError(400, "'prompt' is empty", param="prompt")
    if isinstance(prompt, str):
        return [tok.encode(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [tok.encode(p) for p in prompt]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return [list(prompt)]
    if (
        isinstance(prompt, list)
        and prompt
        and all(
            isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
            for p in prompt
        )
    ):
        return [list(p) for p in prompt]
    raise ApiError(
        400,
        "'prompt' must be a string, a list of strings, or token ids (a list or a list of lists)",
        param="prompt",
    )


COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "stop_token_ids",
                 "seed", "stream", "stream_options", "priority", "user", "presence_penalty", "ignore_eos",
                 "frequency_penalty", "repetition_penalty", "logprobs", "logit_bias",
                 "return_tokens_as_token_ids"}  # fmt: skip
FIELDS = {
    "text_completion": COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"},
    "chat.completion": COMMON_FIELDS
    | {
        "messages",
        "max_completion_tokens",
        "top_logprobs",
        "tools",
        "documents",
        "chat_template_kwargs",
        "add_generation_prompt",
    },
}
# accepted only at the value that changes nothing
NEUTRAL = {"suffix": ("",), "logit_bias": ({},)}


def _check_fields(body: dict, shape_object: str) -> None:
    for name in body:
        if name not in FIELDS[shape_object]:
            raise ApiError(400, f"unknown field {name!r}", param=name)
    for name, neutral in NEUTRAL.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise ApiError(400, f"{name!r} is not supported by this server yet", param=name)
    if body.get("best_of") is not None and body.get("best_of") != body.get("n", 1):
        raise ApiError(400, "'best_of' other than n is not supported", param="best_of")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(400, "'user' must be a string", param="user")


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many top log-probabilities each generated token comes with (None: no log-probabilities).
    Completions: ``logprobs`` is that number; chat: ``logprobs`` is a flag and ``top_logprobs`` the
    number."""
    if chat:
        wanted = _field(body, "logprobs", bool, False, None, "a boolean")
        top = _field(
            body,
            "top_logprobs",
            int,
            None,
            lambda v: 0 <= v <= MAX_LOGPROBS,
            f"an integer in [0, {MAX_LOGPROBS}]",
        )
        if top is not None and not wanted:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return (top or 0) if wanted else None
    return _field(
        body, "logprobs", int, None, lambda v: 0 <= v <= MAX_LOGPROBS, f"an integer in [0, {MAX_LOGPROBS}]"
    )


# a stop string written like a special token: one the tokenizer lacks is a mistake, not text
SPECIAL_LOOKING = re.compile(r"<\|[^<>|\s]+\|>")


def _stops(body: dict, tokenizer) -> tuple[list[str], list[int]]:
    """Stop strings and stop token ids; a stop string that is one special token of the tokenizer
    (``<|eot_id|>``, which decoding never writes as text) stops on that token's id instead."""
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of non-empty strings", param="stop")
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and not (
        isinstance(stop_ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids)
    ):
        raise ApiError(400, "'stop_token_ids' must be a list of token ids", param="stop_token_ids")
    strings, ids = [], list(stop_ids or [])
    for s in stop or []:
        token_id = tokenizer.token_to_id(s) if tokenizer is not None else None
        if token_id is not None and token_id in tokenizer.special_ids:
            ids.append(token_id)
        elif SPECIAL_LOOKING.fullmatch(s) and tokenizer is not None and token_id is None:
            raise ApiError(
                400,
                f"'stop': {s!r} is not a special token of this model's tokenizer ({tokenizer.path})",
                param="stop",
            )
        else:
            strings.append(s)
    return strings, ids


def _sampling(
    body: dict, chat: bool, tokenizer=None, defaults: dict | None = None
) -> tuple[SamplingParams, int]:
    """The request's sampling parameters; ``defaults`` (the checkpoint's generation_config.json)
    fill in the ones it leaves out."""
    stop, stop_ids = _stops(body, tokenizer)
    defaults = defaults or {}
    number = (int, float)
    penalty = (number, 0.0, lambda v: -2 <= v <= 2, "a number in [-2, 2]")
    params = SamplingParams(
        max_tokens=_field(body, "max_tokens", int, 16, lambda v: v >= 1, "an integer >= 1"),
        temperature=float(
            _field(
                body,
                "temperature",
                number,
                defaults.get("temperature", 1.0),
                lambda v: 0 <= v <= 2,
                "a number in [0, 2]",
            )
        ),
        top_p=float(
            _field(
                body, "top_p", number, defaults.get("top_p", 1.0), lambda v: 0 < v <= 1, "a number in (0, 1]"
            )
        ),
        top_k=_field(body, "top_k", int, defaults.get("top_k", 0), lambda v: v >= -1, "an integer >= -1"),
        seed=_field(body, "seed", int, None, None, "an integer"),
        stop=stop,
        stop_token_ids=stop_ids,
        ignore_eos=_field(body, "ignore_eos", bool, False, None, "a boolean"),
        presence_penalty=float(_field(body, "presence_penalty", *penalty)),
        frequency_penalty=float(_field(body, "frequency_penalty", *penalty)),
        repetition_penalty=float(
            _field(
                body,
                "repetition_penalty",
                number,
                defaults.get("repetition_penalty", 1.0),
                lambda v: 0 < v <= 2,
                "a number in (0, 2]",
            )
        ),
        logprobs=_logprobs(body, chat),
    )
    n = _field(body, "n", int, 1, lambda v: 1 <= v <= 16, "an integer in [1, 16]")
    return params, n


class Logprobs:
    """Log-probabilities of one choice in the API's shape: the legacy completions layout (tokens,
    token_logprobs, top_logprobs, text_offset) or chat's (a content list of token entries).

    A token is shown as ``Tokenizer.token_text`` writes it (its text; ``bytes:\\xNN`` for bytes
    that are no whole character and for byte-fallback tokens; ``token_id:N`` past the vocabulary,
    and for every token with ``return_tokens_as_token_ids``), so that the entries of one position
    never collide (a collision that remains is shown as ``token_id:N``). ``bytes`` are the token's
    own bytes. ``text_offset`` is where each token's text starts in the choice's text: a token
    whose character is completed by a later one contributes nothing and the later one the whole
    character, as the detokenizer hands the text out; offsets past a text cut by a stop string
    are that text's length."""

    def __init__(self, tokenizer, chat: bool, prompt: list[int], stop_ids, offset: int, as_ids: bool):
        self.tok, self.chat, self.stop_ids, self.as_ids = tokenizer, chat, stop_ids, as_ids
        self.detok = IncrementalDetokenizer(tokenizer, prompt)
        self.position = offset  # where the next token's text starts in the choice's text
        self.handed_out = offset  # characters of the choice's text sent so far (the echo included)

    def name(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.tok.token_text(token_id)

    def _bytes(self, token_id: int) -> list[int] | None:
        data = self.tok.token_bytes(token_id)
        return None if data is None else list(data)

    def _top(self, top) -> list[tuple[str, int, float]]:
        seen, out = set(), []
        for t, v in top:
            name = self.name(t)
            name = f"token_id:{t}" if name in seen else name
            seen.add(name)
            out.append((name, t, v))
        return out

    def render(self, out: StepOutput) -> dict | None:
        self.handed_out += len(out.text)
        offsets = []
        for token in out.token_ids:
            offsets.append(self.position)
            if token not in self.stop_ids:  # a stop token ends the sequence and adds no text
                self.position += len(self.detok.push(token))
        if out.finish_reason is not None:
            offsets = [min(o, self.handed_out) for o in offsets]
        if out.logprobs is None:
            return None
        if self.chat:
            content = [
                {
                    "token": self.name(token),
                    "logprob": lp,
                    "bytes": self._bytes(token),
                    "top_logprobs": [
                        {"token": name, "logprob": v, "bytes": self._bytes(t)}
                        for name, t, v in self._top(top)
                    ],
                }
                for token, (lp, top) in zip(out.token_ids, out.logprobs)
            ]
            return {"content": content}
        return {
            "tokens": [self.name(t) for t in out.token_ids],
            "token_logprobs": [lp for lp, _ in out.logprobs],
            "top_logprobs": [{name: v for name, _, v in self._top(top)} for _, top in out.logprobs],
            "text_offset": offsets,
        }

    @staticmethod
    def merge(parts: list[dict | None], chat: bool) -> dict:
        parts = [p for p in parts if p is not None]
        if chat:
            return {"content": [c for p in parts for c in p["content"]]}
        return {
            k: [v for p in parts for v in p[k]]
            for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        }


@dataclass(frozen=True)
class Shape:
    """How one API shapes its responses: text completions or chat completions."""

    prefix: str
    object: str
    chunk_object: str

    @property
    def chat(self) -> bool:
        return self.object == "chat.completion"

    def choice(self, index: int, text: str, reason: str | None, logprobs: dict | None) -> dict:
        if self.chat:
            return {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": reason,
            }
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def delta(self, index: int, text: str, reason: str | None, first: bool, logprobs: dict | None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


TEXT = Shape("cmpl", "text_completion", "text_completion")
CHAT = Shape("chatcmpl", "chat.completion", "chat.completion.chunk")


async def completions(request: web.Request) -> web.StreamResponse:
    _check_auth(request)
    body = await _json_body(request)
    _check_model(request, body)
    return await _complete(request, body, _prompts(body, request.app[ENGINE]), TEXT)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    _check_auth(request)
    body = await _json_body(request)
    _check_model(request, body)
    try:
        prompt = request.app[CHAT_FORMATTER].prompt_ids(body.get("messages"), **_template_fields(body))
    except ChatError as e:
        raise ApiError(400, str(e), param=e.param) from None
    return await _complete(request, body, [prompt], CHAT)


def _template_fields(body: dict) -> dict:
    """What a chat request gives its template besides the messages (ChatFormatter.render's)."""
    return {
        "add_generation_prompt": _field(body, "add_generation_prompt", bool, True, None, "a boolean"),
        "tools": body.get("tools"),
        "documents": body.get("documents"),
        "template_kwargs": body.get("chat_template_kwargs"),
    }


def _check_model(request: web.Request, body: dict) -> None:
    name = request.app[CONFIG].model_name
    model = body.get("model")
    if model is not None and model != name:
        raise ApiError(
            404,
            f"model {model!r} does not exist (this server has {name!r})",
            param="model",
            code="model_not_found",
        )


@dataclass
class Choice:
    request_id: str
    prompt: list[int]
    queue: asyncio.Queue
    echo: str  # text put before the completion (the prompt, with echo)
    logprobs: Logprobs | None
    prompt_index: int  # which prompt of the request (n choices share one)


async def _complete(
    request: web.Request, body: dict, prompts: list[list[int]], shape: Shape
) -> web.StreamResponse:
    app = request.app
    engine, loop, config = app[ENGINE], app[FRONT], app[CONFIG]
    _check_fields(body, shape.object)
    if loop.draining:
        raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
    if shape is CHAT and body.get("max_completion_tokens") is not None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    params, n = _sampling(body, shape.chat, engine.tokenizer, config.sampling_defaults)
    stream = _field(body, "stream", bool, False, None, "a boolean")
    echo = _field(body, "echo", bool, False, None, "a boolean")
    if echo and params.logprobs is not None:
        raise ApiError(
            400, "'echo' with 'logprobs' (prompt log-probabilities) is not supported", param="echo"
        )
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    priority = _field(body, "priority", int, 0, None, "an integer")
    as_ids = _field(body, "return_tokens_as_token_ids", bool, False, None, "a boolean")
    for prompt in prompts:
        try:
            check_request(prompt, params, engine.config.vocab_size, engine.max_len)
        except RequestError as e:
            raise ApiError(400, str(e), param=e.param) from None
    if loop.outstanding() + len(prompts) * n > config.max_queue:
        raise ApiError(429, "the server's queue is full; retry later", "rate_limit_error")
    completion_id = f"{shape.prefix}-{uuid.uuid4().hex}"
    created = int(time.time())
    # choice i: prompt i // n, its (i % n)-th sample; seeded samples differ per choice
    choices = []
    for i, prompt in enumerate(itertools.chain.from_iterable([p] * n for p in prompts)):
        seed = params.seed + i if params.seed is not None and n > 1 else params.seed
        p = SamplingParams(**{**params.__dict__, "seed": seed})
        rid = f"{completion_id}-{i}"
        queue = loop.submit(rid, prompt, p, priority, config.request_timeout_s)
        prefix = engine.tokenizer.decode(prompt) if echo else ""
        lp = None
        if params.logprobs is not None:
            stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else engine.eos_ids)
            lp = Logprobs(engine.tokenizer, shape.chat, prompt, stop_ids, len(prefix), as_ids)
        choices.append(Choice(rid, prompt, queue, prefix, lp, i // n))
    app[METRICS]["requests"].inc()
    head = {"id": completion_id, "created": created, "model": config.model_name}
    try:
        if stream:
            return await _stream(request, head, shape, choices, include_usage)
        answer = await _collect(head, shape, choices, config.request_timeout_s)
        if not _may_answer(request):
            _cut(request)
        return answer
    finally:
        for c in choices:
            loop.cancel(c.request_id)  # no-op for finished ones; a disconnected client's work stops here


def _may_answer(request: web.Request) -> bool:
    """A clustered member answers requests only while it leads with a live lease: a leader that
    lost its lease (partitioned, or paused past it) must not answer in a term that has ended."""
    cluster = request.app.get(CLUSTER)
    return cluster is None or cluster.is_leader()


def _cut(request: web.Request):
    """Drop the connection without an answer; the client sees a connection error and retries."""
    if request.transport is not None:
        request.transport.abort()
    raise ConnectionResetError("no longer the leader")


def _failure(item, timeout_s) -> ApiError | None:
    """The API error a queue item stands for, if it is not a normal output."""
    if isinstance(item, RequestError):
        return ApiError(400, str(item), param=item.param)
    if isinstance(item, ServerShutdown):
        return ApiError(503, str(item), "server_error", code="shutting_down")
    if isinstance(item, NoReplica):
        return ApiError(503, str(item), "server_error", code="no_replica")
    if isinstance(item, Exception):
        return ApiError(500, f"generation failed: {item}", "server_error")
    if item.finish_reason == "timeout":
        return ApiError(
            504, f"the request did not finish within {timeout_s:g} s", "timeout_error", code="timeout"
        )
    return None


async def _next(queue: asyncio.Queue, timeout_s) -> StepOutput:
    item = await queue.get()
    error = _failure(item, timeout_s)
    if error is not None:
        raise error
    return item


def _usage(choices: list[Choice], counts) -> dict:
    """OpenAI's usage: each prompt counted once, however many choices (n) it has."""
    prompt_tokens = sum(len(c.prompt) for c in {c.prompt_index: c for c in choices}.values())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": sum(counts),
        "total_tokens": prompt_tokens + sum(counts),
    }


async def _collect(head, shape: Shape, choices: list[Choice], timeout: float | None) -> web.Response:
    out, counts = [], []
    for index, c in enumerate(choices):
        text, count, reason, logprobs = [c.echo], 0, None, []
        while reason is None:
            item = await _next(c.queue, timeout)
            text.append(item.text)
            count += len(item.token_ids)
            reason = item.finish_reason
            if c.logprobs is not None:
                logprobs.append(c.logprobs.render(item))
        counts.append(count)
        merged = Logprobs.merge(logprobs, shape.chat) if c.logprobs is not None else None
        out.append(shape.choice(index, "".join(text), reason, merged))
    return web.json_response(
        {**head, "object": shape.object, "choices": out, "usage": _usage(choices, counts)}
    )


async def _stream(request, head, shape: Shape, choices: list[Choice], include_usage) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(payload) -> None:
        if not _may_answer(request):
            _cut(request)
        await response.write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())

    async def chunk(choice_list, **extra) -> None:
        await send({**head, "object": shape.chunk_object, "choices": choice_list, **extra})

    timeout = request.app[CONFIG].request_timeout_s
    pending = {i: asyncio.ensure_future(choices[i].queue.get()) for i in range(len(choices))}
    counts = [0] * len(choices)
    started = [False] * len(choices)
    try:
        while pending:
            done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
            for index in [i for i, f in pending.items() if f in done]:
                item = pending.pop(index).result()
                error = _failure(item, timeout)
                if error is not None:
                    # the status line has gone out: the error is the stream's last event
                    body = {
                        "message": error.message,
                        "type": error.type,
                        "param": error.param,
                        "code": error.code,
                    }
                    await send({"error": body})
                    await response.write(b"data: [DONE]\n\n")
                    return response
                c = choices[index]
                counts[index] += len(item.token_ids)
                logprobs = c.logprobs.render(item) if c.logprobs is not None else None
                text = (c.echo + item.text) if not started[index] else item.text
                if text or item.finish_reason or not started[index] or logprobs:
                    await chunk([shape.delta(index, text, item.finish_reason, not started[index], logprobs)])
                    started[index] = True
                if item.finish_reason is None:
                    pending[index] = asyncio.ensure_future(c.queue.get())
        if include_usage:
            await chunk([], usage=_usage(choices, counts))
        await response.write(b"data: [DONE]\n\n")
    except ConnectionResetError:
        pass  # the client went away; the caller cancels its requests
    finally:
        for f in pending.values():
            f.cancel()
    return response


async def models(request: web.Request) -> web.Response:
    _check_auth(request)
    name = request.app[CONFIG].model_name
    model = {
        "id": name,
        "object": "model",
        "created": request.app[STARTED],
        "owned_by": "ringleader",
        "max_model_len": request.app[ENGINE].max_len,
    }
    return web.json_response({"object": "list", "data": [model]})


TOKENIZE_FIELDS = {"model", "prompt", "messages", "add_generation_prompt", "add_special_tokens", "tools",
                   "documents", "chat_template_kwargs"}  # fmt: skip


async def tokenize(request: web.Request) -> web.Response:
    """vLLM's ``POST /tokenize``: the token ids of a prompt, or of chat messages rendered with the
    chat template; ``add_special_tokens`` defaults to true for a prompt and false for messages
    (the template writes them)."""
    _check_auth(request)
    body = await _json_body(request)
    _check_model(request, body)
    for name in body:
        if name not in TOKENIZE_FIELDS:
            raise ApiError(400, f"unknown field {name!r}", param=name)
    engine = request.app[ENGINE]
    chat = "messages" in body
    if chat == ("prompt" in body):
        raise ApiError(400, "give either 'prompt' (a string) or 'messages'", param="prompt")
    special = _field(body, "add_special_tokens", bool, not chat, None, "a boolean")
    if chat:
        try:
            text = request.app[CHAT_FORMATTER].render(body["messages"], **_template_fields(body))
        except ChatError as e:
            raise ApiError(400, str(e), param=e.param) from None
    else:
        for name in ("add_generation_prompt", "tools", "documents", "chat_template_kwargs"):
            if name in body:
                raise ApiError(400, f"{name!r} goes with 'messages', not 'prompt'", param=name)
        text = body["prompt"]
        if not isinstance(text, str):
            raise ApiError(400, "'prompt' must be a string", param="prompt")
    tokens = await asyncio.to_thread(engine.tokenizer.encode, text, special)
    return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_len})


async def detokenize(request: web.Request) -> web.Response:
    """vLLM's ``POST /detokenize``: the text of token ids (special tokens left out)."""
    _check_auth(request)
    body = await _json_body(request)
    _check_model(request, body)
    for name in body:
        if name not in ("model", "tokens"):
            raise ApiError(400, f"unknown field {name!r}", param=name)
    engine = request.app[ENGINE]
    tokens = body.get("tokens")
    vocab = engine.tokenizer.vocab_size
    if not (
        isinstance(tokens, list)
        and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens)
    ):
        raise ApiError(400, f"'tokens' must be a list of token ids in [0, {vocab})", param="tokens")
    return web.json_response({"prompt": engine.tokenizer.decode(tokens)})


async def health(request: web.Request) -> web.Response:
    task = request.app[ENGINE_LOOP].task
    alive = task is not None and not task.done()
    return web.json_response(
        {"status": "ok" if alive else "engine loop stopped"}, status=200 if alive else 503
    )


async def ready(request: web.Request) -> web.Response:
    loop = request.app[ENGINE_LOOP]
    cluster = request.app.get(CLUSTER)
    if cluster is not None and not cluster.is_leader():
        leader = cluster.leader_url()
        raise ApiError(
            503, f"not ready: not the leader (leader: {leader or 'being elected'})", "server_error"
        )
    if cluster is None and loop.fatal is not None:
        raise ApiError(503, f"not ready: the replica failed ({loop.fatal})", "server_error")
    if loop.draining:
        raise ApiError(503, "not ready: the server is shutting down", "server_error")
    if loop.task is None or loop.task.done():
        raise ApiError(503, "not ready: the engine loop is not running", "server_error")
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    engine = request.app[ENGINE]
    m["running"].set(len(engine.running))
    m["waiting"].set(len(engine.waiting))
    free, usable = engine.allocator.num_free, engine.num_blocks - 1
    m["free_blocks"].set(free)
    m["kv_usage"].set(1 - free / usable)
    process = m["process"]  # one object across scrapes: cpu_percent measures since the last call
    m["cpu"].set(process.cpu_percent(interval=None))
    m["rss"].set(process.memory_info().rss)
    for gpu in gpus()[0]:
        m["gpu_memory"].labels(gpu=str(gpu["index"])).set(gpu["memory_used_bytes"])
        if gpu.get("utilization_percent") is not None:
            m["gpu_util"].labels(gpu=str(gpu["index"])).set(gpu["utilization_percent"])
    return web.Response(body=generate_latest(m["registry"]), headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(
    engine: Engine,
    config: ServerConfig | None = None,
    cluster: Cluster | None = None,
    signer: Signer | None = None,
) -> web.Application:
    """The server over ``engine``; with ``cluster``, one member of a cluster (``server.cluster``)."""
    config = config or ServerConfig()
    middlewares = [errors_middleware] + ([leader_middleware] if cluster is not None else [])
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body_bytes)
    registry = CollectorRegistry()
    latency_buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
    r = registry
    process = psutil.Process()
    process.cpu_percent(interval=None)  # the first call only starts the measurement
    app[METRICS] = {
        "registry": registry,
        "process": process,
        "requests": Counter("ringleader_requests", "completion requests accepted", registry=r),
        "steps": Counter("ringleader_engine_steps", "engine steps run", registry=r),
        "running": Gauge("ringleader_num_requests_running", "sequences in the running batch", registry=r),
        "waiting": Gauge("ringleader_num_requests_waiting", "sequences waiting to start", registry=r),
        "free_blocks": Gauge("ringleader_free_kv_blocks", "free KV cache blocks", registry=r),
        "kv_usage": Gauge("ringleader_kv_cache_usage_perc", "fraction of KV cache blocks in use", registry=r),
        "prompt_tokens": Counter("ringleader_prompt_tokens", "prompt tokens received", registry=r),
        "generation_tokens": Counter("ringleader_generation_tokens", "tokens generated", registry=r),
        "finished": Counter(
            "ringleader_request_success", "finished requests", ["finished_reason"], registry=r
        ),
        "ttft": Histogram(
            "ringleader_time_to_first_token_seconds",
            "time to first token",
            buckets=latency_buckets,
            registry=r,
        ),  # fmt: skip
        "itl": Histogram(
            "ringleader_inter_token_latency_seconds",
            "time between tokens",
            buckets=latency_buckets,
            registry=r,
        ),  # fmt: skip
        "e2e": Histogram(
            "ringleader_e2e_request_latency_seconds", "request latency", buckets=latency_buckets, registry=r
        ),  # fmt: skip
        "queue_time": Histogram(
            "ringleader_request_queue_time_seconds",
            "time before admission",
            buckets=latency_buckets,
            registry=r,
        ),  # fmt: skip
        "cpu": Gauge("ringleader_process_cpu_percent", "CPU use of the server process", registry=r),
        "rss": Gauge("ringleader_process_resident_memory_bytes", "resident memory of the server", registry=r),
        "gpu_memory": Gauge(
            "ringleader_gpu_memory_used_bytes", "GPU memory in use (NVML)", ["gpu"], registry=r
        ),
        "gpu_util": Gauge(
            "ringleader_gpu_utilization_percent", "GPU utilisation (NVML)", ["gpu"], registry=r
        ),
    }
    app[CONFIG], app[ENGINE], app[STARTED] = config, engine, int(time.time())
    app[ENGINE_LOOP] = app[FRONT] = EngineLoop(engine, app[METRICS])
    if cluster is not None:
        _add_cluster(app, engine, cluster, signer)

    async def engine_task(app: web.Application):
        loop = app[ENGINE_LOOP]
        loop.task = asyncio.create_task(loop.run())
        yield
        loop.stop()
        await loop.task

    app.cleanup_ctx.append(engine_task)
    app[CHAT_FORMATTER] = ChatFormatter(engine.tokenizer)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    return app


# clusters


@web.middleware
async def leader_middleware(request: web.Request, handler):
    """On a member that is not the leader, API calls go to the leader (or get 503 while there is
    none); a leader marks its answers with its term."""
    cluster = request.app[CLUSTER]
    if request.path.startswith("/v1/") and not cluster.is_leader():
        leader = cluster.leader_url()
        if leader is None:
            raise ApiError(
                503, "no leader: an election is under way; retry shortly", "server_error", code="no_leader"
            )
        return await _forward(request, leader)
    return await handler(request)


async def _forward(request: web.Request, leader: str) -> web.StreamResponse:
    session = request.app[PROXY]
    headers = {
        k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type", "accept")
    }
    try:
        async with session.request(request.method, leader + request.path_qs, data=await request.read(),
                                   headers=headers) as upstream:  # fmt: skip
            response = web.StreamResponse(status=upstream.status)
            for key in ("Content-Type", "Retry-After", TERM_HEADER):
                if key in upstream.headers:
                    response.headers[key] = upstream.headers[key]
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except (aiohttp.ClientError, asyncio.TimeoutError):
        raise ApiError(503, f"the leader at {leader} did not answer; retry shortly", "server_error",
                       code="no_leader") from None  # fmt: skip


async def _add_term(request: web.Request, response: web.StreamResponse) -> None:
    cluster = request.app[CLUSTER]
    if request.path.startswith("/v1/") and cluster.is_leader():
        response.headers[TERM_HEADER] = str(cluster.term)


async def cluster_state(request: web.Request) -> web.Response:
    cluster, router = request.app[CLUSTER], request.app[ROUTER]
    state = cluster.describe()
    state["replicas"] = router.replica_rows() if cluster.role == "leader" else None
    return web.json_response(state)


async def control_generate(request: web.Request) -> web.StreamResponse:
    """A leader's request to run one sequence on this member's replica: JSON lines of token ids."""
    app = request.app
    cluster, loop = app[CLUSTER], app[ENGINE_LOOP]
    try:
        message = verified(await request.read(), request.headers.get(SIGNATURE), app[SIGNER], app[METRICS])
    except Forged as e:
        return web.json_response({"error": f"control message refused: {e.reason}"}, status=403)
    if not cluster.check_term(message):
        stale = f"stale term {message['term']} (this member is at {cluster.term})"
        return web.json_response({"error": stale}, status=409)
    if loop.fatal is not None or loop.draining:
        return web.json_response({"error": "this replica is not serving"}, status=503)
    try:
        params = SamplingParams(**message["params"])
        prompt, generated = message["prompt"], message["generated"] or None
        rid = str(message["request_id"])
    except (KeyError, TypeError) as e:
        return web.json_response({"error": f"malformed generate message: {e}"}, status=400)
    queue = loop.submit(rid, prompt, params, message.get("priority", 0), message.get("timeout_s"), generated)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    try:
        while True:
            item = await queue.get()
            if isinstance(item, RequestError):
                line = {"error": str(item), "kind": "request", "param": item.param}
            elif isinstance(item, Exception):
                line = {"error": str(item), "kind": "replica"}
            else:
                line = {"t": item.token_ids, "f": item.finish_reason, "lp": item.logprobs}
            await response.write(json.dumps(line).encode() + b"\n")
            if "error" in line or item.finish_reason is not None:
                break
    except ConnectionResetError:
        pass  # the leader went away or stopped the request
    finally:
        loop.cancel(rid)
    return response


SIGNER = web.AppKey("signer", Signer)


def _add_cluster(app: web.Application, engine: Engine, cluster: Cluster, signer: Signer) -> None:
    app[CLUSTER], app[SIGNER] = cluster, signer
    app[METRICS].update(cluster_metrics(app[METRICS]["registry"]))
    cluster.metrics = app[METRICS]
    loop = app[ENGINE_LOOP]

    def replica_state() -> dict:
        state = "failed" if loop.fatal is not None else "draining" if loop.draining else "ready"
        state = "stalled" if state == "ready" and loop.stalled() else state
        return {"state": state, "outstanding": loop.outstanding()}

    cluster.replica_state = replica_state
    router = Router(loop, cluster, signer, engine.tokenizer, engine.eos_ids, engine.max_len, app[METRICS])
    app[ROUTER] = app[FRONT] = router

    async def members(app: web.Application):
        app[PROXY] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=2))
        await router.start()
        await cluster.start()
        yield
        await cluster.stop()
        await router.stop()
        await app[PROXY].close()

    app.cleanup_ctx.append(members)
    app.on_response_prepare.append(_add_term)
    add_control_routes(app, cluster, signer, app[METRICS])
    app.router.add_post("/_control/generate", control_generate)
    app.router.add_get("/cluster", cluster_state)
