"""OpenAI completions and chat completions over a request front: the answer's shape, whole or
streamed (server-sent events), log-probabilities, usage.

``complete`` runs a request whose prompts are token ids; ``TEXT`` and ``CHAT`` are the two
renderings, one class each. A request's constraint (``response_format``, ``structured_outputs``,
or a chat request's ``tool_choice`` of ``required`` or a named function) becomes its grammar,
checked against the vocabulary before it is queued; a chat answer with tools is read for tool
calls (``server.tools``). Requests go to ``app[FRONT]`` (``server.engine_loop.RequestFront``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from dataclasses import dataclass

from aiohttp import web

from engine.errors import RequestError
from engine.request import SamplingParams, StepOutput, check_request
from engine.tokenizer import IncrementalDetokenizer
from server.engine_loop import ServerShutdown
from server.protocol import ProtocolError, check_fields, constraint, field_value, sampling
from server.router import NoReplica
from server.state import CONFIG, ENGINE, FRONT, METRICS, RESPONSE_CACHE, ApiError
from server.tools import ToolOutput, ToolRequest, parser_for, tool_request


@dataclass(frozen=True)
class Entry:
    """One generated token's log-probabilities, API-neutral."""

    name: str  # the token as shown (Logprobs.name)
    logprob: float
    bytes: list[int] | None
    offset: int  # where its text starts in the choice's text
    top: list[tuple[str, float, list[int] | None]]  # (name, log-probability, bytes)


class Logprobs:
    """A choice's log-probabilities, token by token.

    A token is shown as ``Tokenizer.token_text`` writes it (its text; ``bytes:\\xNN`` for bytes
    that are no whole character and for byte-fallback tokens; ``token_id:N`` past the vocabulary,
    and for every token with ``return_tokens_as_token_ids``), so that the entries of one position
    never collide (a collision that remains is shown as ``token_id:N``). ``bytes`` are the token's
    own bytes. The offset is where a token's text starts in the choice's text: a token whose
    character is completed by a later one contributes nothing and the later one the whole
    character, as the detokenizer hands the text out; offsets past a text cut by a stop string
    are that text's length."""

    def __init__(self, tokenizer, prompt: list[int], stop_ids, offset: int, as_ids: bool):
        self.tok, self.stop_ids, self.as_ids = tokenizer, stop_ids, as_ids
        self.detok = IncrementalDetokenizer(tokenizer, prompt)
        self.position = offset  # where the next token's text starts in the choice's text
        self.handed_out = offset  # characters of the choice's text sent so far (the echo included)

    def name(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.tok.token_text(token_id)

    def _bytes(self, token_id: int) -> list[int] | None:
        data = self.tok.token_bytes(token_id)
        return None if data is None else list(data)

    def _top(self, top) -> list[tuple[str, float, list[int] | None]]:
        seen, out = set(), []
        for t, v in top:
            name = self.name(t)
            name = f"token_id:{t}" if name in seen else name
            seen.add(name)
            out.append((name, v, self._bytes(t)))
        return out

    def entries(self, out: StepOutput) -> list[Entry] | None:
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
        return [
            Entry(self.name(token), lp, self._bytes(token), offset, self._top(top))
            for token, (lp, top), offset in zip(out.token_ids, out.logprobs, offsets)
        ]


class Rendering:
    """How one API shapes its answers."""

    prefix: str  # of the completion id
    object: str
    chunk_object: str
    chat: bool

    def normalise(self, body: dict) -> dict:
        return body

    def choice(self, index: int, text: str, reason: str | None, logprobs: dict | None) -> dict:
        raise NotImplementedError

    def delta(self, index: int, text: str, reason: str | None, first: bool, logprobs: dict | None) -> dict:
        raise NotImplementedError

    def logprobs(self, entries: list[Entry] | None) -> dict | None:
        raise NotImplementedError

    def merge_logprobs(self, parts: list[dict | None]) -> dict:
        raise NotImplementedError


class TextRendering(Rendering):
    """``/v1/completions``: text choices, the legacy log-probabilities layout."""

    prefix, object, chunk_object, chat = "cmpl", "text_completion", "text_completion", False
    KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")

    def choice(self, index, text, reason, logprobs):
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def delta(self, index, text, reason, first, logprobs):
        return self.choice(index, text, reason, logprobs)

    def logprobs(self, entries):
        if entries is None:
            return None
        return {
            "tokens": [e.name for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{name: v for name, v, _ in e.top} for e in entries],
            "text_offset": [e.offset for e in entries],
        }

    def merge_logprobs(self, parts):
        parts = [p for p in parts if p is not None]
        return {k: [v for p in parts for v in p[k]] for k in self.KEYS}


class ChatRendering(Rendering):
    """``/v1/chat/completions``: assistant messages, log-probabilities as a content list."""

    prefix, object, chunk_object, chat = "chatcmpl", "chat.completion", "chat.completion.chunk", True

    def normalise(self, body):
        if body.get("max_completion_tokens") is not None:
            return {**body, "max_tokens": body["max_completion_tokens"]}
        return body

    def choice(self, index, text, reason, logprobs):
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}

    def delta(self, index, text, reason, first, logprobs):
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

    def tool_choice(self, index, text, reason, logprobs, tools: ToolOutput) -> dict:
        """A choice whose text is read for tool calls: ``finish_reason`` "tool_calls" when it made
        some and ended by itself."""
        content, calls = tools.message(text)
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
            reason = "tool_calls" if reason == "stop" else reason
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}

    def tool_delta(self, index, text, reason, first, logprobs, tools: ToolOutput) -> dict:
        delta = tools.delta(text, reason is not None)
        if first:
            delta = {"role": "assistant", "content": delta.pop("content", ""), **delta}
        if reason == "stop" and tools.called:
            reason = "tool_calls"
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

    def logprobs(self, entries):
        if entries is None:
            return None
        content = [
            {
                "token": e.name,
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top_logprobs": [{"token": name, "logprob": v, "bytes": b} for name, v, b in e.top],
            }
            for e in entries
        ]
        return {"content": content}

    def merge_logprobs(self, parts):
        return {"content": [c for p in parts if p is not None for c in p["content"]]}


TEXT = TextRendering()
CHAT = ChatRendering()


@dataclass
class Choice:
    request_id: str
    prompt: list[int]
    queue: asyncio.Queue
    echo: str  # text put before the completion (the prompt, with echo)
    logprobs: Logprobs | None
    prompt_index: int  # which prompt of the request (n choices share one)
    cached: int = 0  # prompt tokens found in the prefix cache
    tools: ToolOutput | None = None  # a chat answer read for tool calls

    def took(self, item: StepOutput) -> None:
        """Note what an output says of the choice (its first admission's cached prompt tokens)."""
        if item.cached_tokens is not None and not self.cached:
            self.cached = item.cached_tokens


async def complete(
    request: web.Request, body: dict, prompts: list[list[int]], shape: Rendering
) -> web.StreamResponse:
    """Run a completions or chat request's prompts (``n`` choices each) and answer it, whole or
    streamed as server-sent events; every choice is cancelled when the answer ends, so a client
    that went away frees its blocks."""
    app = request.app
    engine, loop, config = app[ENGINE], app[FRONT], app[CONFIG]
    check_fields(body, shape.object)
    if loop.draining:
        raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
    body = shape.normalise(body)
    params, n = sampling(body, shape.chat, engine.tokenizer, config.sampling_defaults)
    stream = field_value(body, "stream", bool, False, None, "a boolean")
    echo = field_value(body, "echo", bool, False, None, "a boolean")
    if echo and params.logprobs is not None:
        raise ProtocolError(
            "'echo' with 'logprobs' (prompt log-probabilities) is not supported", param="echo"
        )
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    priority = field_value(body, "priority", int, 0, None, "an integer")
    as_ids = field_value(body, "return_tokens_as_token_ids", bool, False, None, "a boolean")
    tools = tool_request(body, parser_for(config.tool_call_parser, engine.tokenizer)) if shape.chat else None
    params = await _constrain(engine, body, params, tools)
    for prompt in prompts:
        check_request(prompt, params, engine.config.vocab_size, engine.max_len)
    if app.get(RESPONSE_CACHE) is not None:  # a hit replays a stored answer, a miss is recorded for it
        loop = await app[RESPONSE_CACHE].front(request, loop, prompts, params, n)
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
            lp = Logprobs(engine.tokenizer, prompt, stop_ids, len(prefix), as_ids)
        reader = ToolOutput(tools) if tools is not None and tools.parses else None
        choices.append(Choice(rid, prompt, queue, prefix, lp, i // n, tools=reader))
    app[METRICS]["requests"].inc()
    head = {"id": completion_id, "created": created, "model": config.model_name}
    try:
        if stream:
            return await _stream(request, head, shape, choices, include_usage)
        return await _collect(head, shape, choices, config.request_timeout_s)
    finally:
        for c in choices:
            loop.cancel(c.request_id)  # no-op for finished ones; a disconnected client's work stops here


async def _constrain(engine, body: dict, params: SamplingParams, tools: ToolRequest | None) -> SamplingParams:
    """``params`` with the request's grammar, checked against the vocabulary (off the event loop:
    the first one builds the grammar library's view of the vocabulary)."""
    found = constraint(body)
    forced = tools.grammar() if tools is not None else None
    if forced is not None and found is not None:
        raise ProtocolError(
            f"'tool_choice' {json.dumps(tools.choice)} constrains the output to tool calls; it cannot go "
            f"with {found[1].split('.')[0]!r}",
            param="tool_choice",
        )
    grammar, where = found or (forced, "tool_choice")
    if grammar is None:
        return params
    await asyncio.to_thread(engine.structured.check, grammar, where)
    return SamplingParams(**{**params.__dict__, "grammar": grammar})


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
    if item.finish_reason == "error":
        return ApiError(500, f"generation failed: {item.stop_reason}", "server_error")
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
    """OpenAI's usage: each prompt counted once, however many choices (n) it has; of its tokens,
    those its first choice found in the prefix cache."""
    firsts = {c.prompt_index: c for c in reversed(choices)}.values()
    prompt_tokens = sum(len(c.prompt) for c in firsts)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": sum(counts),
        "total_tokens": prompt_tokens + sum(counts),
        "prompt_tokens_details": {"cached_tokens": sum(c.cached for c in firsts)},
    }


async def _collect(head, shape: Rendering, choices: list[Choice], timeout: float | None) -> web.Response:
    out, counts = [], []
    for index, c in enumerate(choices):
        text, count, reason, logprobs = [c.echo], 0, None, []
        while reason is None:
            item = await _next(c.queue, timeout)
            c.took(item)
            text.append(item.text)
            count += len(item.token_ids)
            reason = item.finish_reason
            if c.logprobs is not None:
                logprobs.append(shape.logprobs(c.logprobs.entries(item)))
        counts.append(count)
        merged = shape.merge_logprobs(logprobs) if c.logprobs is not None else None
        if c.tools is not None:
            out.append(shape.tool_choice(index, "".join(text), reason, merged, c.tools))
        else:
            out.append(shape.choice(index, "".join(text), reason, merged))
    return web.json_response(
        {**head, "object": shape.object, "choices": out, "usage": _usage(choices, counts)}
    )


async def _stream(
    request, head, shape: Rendering, choices: list[Choice], include_usage
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    # the events made at one wake-up go out in one write: when tokens arrive faster than they are
    # relayed (a busy front end), several share a send; when not, each goes out as it comes
    events: list[bytes] = []

    async def send(payload) -> None:
        events.append(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())

    async def flush() -> None:
        if events:
            data = b"".join(events)
            events.clear()
            await response.write(data)

    async def chunk(choice_list, **extra) -> None:
        await send({**head, "object": shape.chunk_object, "choices": choice_list, **extra})

    timeout = request.app[CONFIG].request_timeout_s
    pending = {i: asyncio.ensure_future(choices[i].queue.get()) for i in range(len(choices))}
    counts = [0] * len(choices)
    started = [False] * len(choices)
    try:
        while pending:
            await flush()
            done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
            ready = [(i, pending.pop(i).result()) for i in [i for i, f in pending.items() if f in done]]
            while ready:
                index, item = ready.pop(0)
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
                    await flush()
                    await response.write(b"data: [DONE]\n\n")
                    return response
                c = choices[index]
                c.took(item)
                counts[index] += len(item.token_ids)
                logprobs = shape.logprobs(c.logprobs.entries(item)) if c.logprobs is not None else None
                text = (c.echo + item.text) if not started[index] else item.text
                first, reason = not started[index], item.finish_reason
                if c.tools is not None:
                    part = shape.tool_delta(index, text, reason, first, logprobs, c.tools)
                    if part["delta"] or reason or logprobs:
                        await chunk([part])
                        started[index] = True
                elif text or reason or first or logprobs:
                    await chunk([shape.delta(index, text, reason, first, logprobs)])
                    started[index] = True
                if item.finish_reason is None:
                    if not c.queue.empty():  # already there: no wait, no task
                        ready.append((index, c.queue.get_nowait()))
                    else:
                        pending[index] = asyncio.ensure_future(c.queue.get())
        if include_usage:
            await chunk([], usage=_usage(choices, counts))
        await flush()
        await response.write(b"data: [DONE]\n\n")
    except ConnectionResetError:
        pass  # the client went away; the caller cancels its requests
    finally:
        for f in pending.values():
            f.cancel()
    return response
