"""The gRPC worker service that a gateway routes to: ``vllm.grpc.engine.VllmEngine`` from the
``smg-grpc-proto`` package, over the same request front as HTTP, in the same asyncio loop.

The gateway (SMG) tokenizes, renders chat templates and detokenizes; this service takes token ids
and streams token ids back. A ``GenerateRequest`` becomes ``engine.request.SamplingParams``,
checked by ``check_request`` and submitted to ``app[FRONT]`` (``server.engine_loop``), exactly as
an HTTP request is, so both front ends share one engine loop. Every field the engine cannot honour
is refused with INVALID_ARGUMENT naming it (``sampling_params.min_p``, ``mm_inputs``, ...); none is
ignored. Stop strings are honoured as HTTP honours them (``engine.request.Sequence`` decodes the
output and stops at the first one; the token ids are not cut, as in vLLM, and the match the
sequence records, ``StepOutput.stop_reason``, is reported as ``matched_stop_str`` or
``matched_token_id``). A client that cancels its call, and ``Abort``, cancel the
request at once: its cache blocks are free before the next step.

Streaming: one ``chunk`` per engine step with that step's tokens (``completion_tokens``: how many,
as vLLM's servicer counts them), then a ``complete`` per choice with the finish reason, the usage
totals and no tokens of its own. Without streaming: one ``complete`` per choice with all its tokens.

Besides Generate: Abort, HealthCheck, GetModelInfo, GetServerInfo, GetLoads (``engine.stats()``),
GetTokenizer (the checkpoint's tokenizer files as one zip, in chunks, the last with its SHA-256),
FlushCache (empties the prefix cache, as ``POST /reset_prefix_cache``). SubscribeKvEvents publishes
the prefix cache (``KvEventPublisher``): every full block stored, evicted or cleared, by the chained
hash the engine keys it by (``engine.kv_cache.block_hash``), its parent's and its token ids; a new
subscriber first gets a snapshot of the live blocks, a returning one the batches after its cursor;
every batch carries the engine's load, and while nothing happens a load_only heartbeat does each
second. With prefix caching off it answers FAILED_PRECONDITION. Embed and the profiler answer
UNIMPLEMENTED. The standard health service (``grpc.health.v1``) reports SERVING while the engine
loop runs and NOT_SERVING once it drains or fails; server reflection lists the services.
``add_grpc(app, host, port)`` serves all of it for as long as the aiohttp application runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import sys
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from smg_grpc_proto import vllm_engine_pb2 as pb
from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2

from engine.errors import RequestError, RingleaderError
from engine.request import SamplingParams, StepOutput, check_request
from server.engine_loop import ServerShutdown
from server.kv_events import KvEventPublisher, Refused
from server.protocol import stops
from server.router import NoReplica
from server.state import CONFIG, ENGINE, ENGINE_LOOP, FRONT, METRICS, STARTED

SERVICE = pb.DESCRIPTOR.services_by_name["VllmEngine"].full_name  # "vllm.grpc.engine.VllmEngine"
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "generation_config.json", "config.json")  # fmt: skip
CHUNK_BYTES = 512 * 1024
DEFAULT_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")  # default_sampling_params_json

# the fields of a GenerateRequest and its SamplingParams that this service reads; any other field
# that is set is refused, so that nothing a client asks for is silently dropped
REQUEST_FIELDS = {"request_id", "tokenized", "text", "sampling_params", "stream", "data_parallel_rank"}
SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "frequency_penalty", "presence_penalty",
                   "repetition_penalty", "max_tokens", "stop", "stop_token_ids", "skip_special_tokens",
                   "spaces_between_special_tokens", "ignore_eos", "n", "logprobs", "seed",
                   "include_stop_str_in_output"}  # fmt: skip
MAX_N = 16


def _invalid(field_name: str, message: str) -> Refused:
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, field_name, message)


def _proto_field(param: str | None) -> str | None:
    """The proto field an ``engine`` refusal's parameter stands for."""
    if param is None:
        return None
    return "tokenized.input_ids" if param == "prompt" else f"sampling_params.{param}"


@dataclass
class Parsed:
    prompt: list[int]
    params: SamplingParams
    n: int
    stream: bool


def parse_request(request: pb.GenerateRequest, engine, defaults: dict) -> Parsed:
    """The prompt, sampling parameters, n and streaming of a ``GenerateRequest``; a ``Refused``
    naming the field for anything this engine cannot do or that is out of range."""
    for desc, value in request.ListFields():
        if desc.name == "data_parallel_rank" and value == 0:
            continue  # the only rank there is
        if desc.name not in REQUEST_FIELDS or desc.name == "data_parallel_rank":
            raise _invalid(desc.name, "is not supported by this server")
    sp = request.sampling_params
    for desc, _ in sp.ListFields():
        if desc.name not in SAMPLING_FIELDS:
            raise _invalid(f"sampling_params.{desc.name}", "is not supported by this server")
    tokenizer = engine.tokenizer
    kind = request.WhichOneof("input")
    if kind == "tokenized":
        prompt = list(request.tokenized.input_ids)
    elif kind == "text":
        if tokenizer is None:
            raise _invalid("text", "this server has no tokenizer; send tokenized.input_ids")
        prompt = tokenizer.encode(request.text)
    else:
        raise _invalid("tokenized", "the request has no prompt (tokenized or text)")
    if not prompt:
        raise _invalid("tokenized.input_ids", "the prompt is empty")
    if sp.stop and not sp.skip_special_tokens:
        raise _invalid(
            "sampling_params.skip_special_tokens",
            "stop strings are matched in text decoded without special tokens; set it to true",
        )
    if sp.HasField("logprobs") and sp.logprobs < 0:
        raise _invalid("sampling_params.logprobs", f"must be in [0, 20], got {sp.logprobs}")
    if not 0 <= sp.n <= MAX_N:
        raise _invalid("sampling_params.n", f"must be in [1, {MAX_N}] (0: 1), got {sp.n}")
    try:
        stop, stop_ids = stops({"stop": list(sp.stop), "stop_token_ids": list(sp.stop_token_ids)}, tokenizer)
    except RequestError as e:
        raise _invalid(f"sampling_params.{e.param}", str(e)) from None
    if sp.HasField("max_tokens"):
        max_tokens = sp.max_tokens
    else:  # as vLLM: the rest of the context (and of the cache)
        room = min(engine.max_len, (engine.num_blocks - 1) * engine.block_size)
        max_tokens = max(room - len(prompt), 1)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=sp.temperature if sp.HasField("temperature") else defaults.get("temperature", 1.0),
        top_p=sp.top_p if sp.top_p != 0 else defaults.get("top_p", 1.0),
        top_k=sp.top_k,  # 0: off, as in vLLM
        seed=sp.seed if sp.HasField("seed") else None,
        stop=stop,
        stop_token_ids=stop_ids,
        ignore_eos=sp.ignore_eos,
        presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty,
        repetition_penalty=(
            sp.repetition_penalty if sp.repetition_penalty != 0 else defaults.get("repetition_penalty", 1.0)
        ),
        logprobs=sp.logprobs if sp.HasField("logprobs") else None,
    )
    try:
        check_request(prompt, params, engine.config.vocab_size, engine.max_len)
    except RequestError as e:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, _proto_field(e.param), str(e)) from None
    return Parsed(prompt, params, sp.n or 1, request.stream)


@dataclass
class Choice:
    """One of a request's n samples under generation."""

    engine_id: str
    index: int
    params: SamplingParams
    queue: asyncio.Queue
    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    cached: int = 0  # prompt tokens found in the prefix cache


def _output_logprobs(tokens: list[int], logprobs, top: int) -> pb.OutputLogProbs:
    out = pb.OutputLogProbs()
    for token, (lp, alternatives) in zip(tokens, logprobs):
        out.token_ids.append(token)
        out.token_logprobs.append(lp)
        if top > 0:
            out.top_logprobs.append(
                pb.TopLogProbs(values=[v for _, v in alternatives], token_ids=[t for t, _ in alternatives])
            )
    return out


def _failure(item, timeout_s) -> Refused | None:
    """The gRPC error a queue item stands for, if it is not a normal output."""
    if isinstance(item, RequestError):
        return Refused(grpc.StatusCode.INVALID_ARGUMENT, _proto_field(item.param), str(item))
    if isinstance(item, (ServerShutdown, NoReplica)):
        return Refused(grpc.StatusCode.UNAVAILABLE, None, str(item))
    if isinstance(item, Exception):
        return Refused(grpc.StatusCode.INTERNAL, None, f"generation failed: {item}")
    if item.finish_reason == "timeout":
        return Refused(
            grpc.StatusCode.DEADLINE_EXCEEDED, None, f"the request did not finish within {timeout_s:g} s"
        )
    return None


class VllmEngineService(pb_grpc.VllmEngineServicer):
    """``vllm.grpc.engine.VllmEngine`` over an aiohttp application's engine and request front."""

    def __init__(self, app: web.Application, model_dir: str | Path | None = None):
        self.app = app
        self.engine, self.config = app[ENGINE], app[CONFIG]
        tok = self.engine.tokenizer
        self.model_dir = Path(model_dir) if model_dir else (tok.path.parent if tok is not None else None)
        self.active: dict[str, list[str]] = {}  # gateway request id -> the engine ids of its choices
        self.kv_events = KvEventPublisher(self.engine, app[ENGINE_LOOP])
        self.last_receive = 0.0
        self._bundle: tuple[bytes, str] | None = None

    def _hf_config(self) -> dict:
        path = self.model_dir / "config.json" if self.model_dir else None
        if path is None or not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        self.last_receive = time.time()
        front, engine, config = self.app[FRONT], self.engine, self.config
        request_id = request.request_id or uuid.uuid4().hex
        try:
            if front.draining:
                raise Refused(grpc.StatusCode.UNAVAILABLE, None, "the server is shutting down")
            if request_id in self.active:
                raise Refused(
                    grpc.StatusCode.ALREADY_EXISTS, "request_id", f"{request_id!r} is already running"
                )
            parsed = parse_request(request, engine, config.sampling_defaults)
            if front.outstanding() + parsed.n > config.max_queue:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, None, "the server's queue is full")
        except Refused as e:
            await context.abort(e.code, str(e))
        choices = []
        self.active[request_id] = []
        try:
            for i in range(parsed.n):
                p = parsed.params
                if p.seed is not None and parsed.n > 1:  # seeded samples differ per choice, as HTTP's
                    p = SamplingParams(**{**p.__dict__, "seed": p.seed + i})
                engine_id = f"grpc-{request_id}-{i}"
                self.active[request_id].append(engine_id)
                queue = front.submit(engine_id, parsed.prompt, p, 0, config.request_timeout_s)
                choices.append(Choice(engine_id, i, p, queue))
            self.app[METRICS]["requests"].inc()
            async with contextlib.aclosing(self._outputs(choices)) as outputs:
                async for choice, item in outputs:
                    error = _failure(item, config.request_timeout_s)
                    if error is not None:
                        await context.abort(error.code, str(error))
                    for message in self._answer(choice, item, parsed):
                        yield message
        finally:
            for c in choices:
                front.cancel(c.engine_id)  # a no-op for finished ones; a cancelled call's work stops here
            self.active.pop(request_id, None)

    @staticmethod
    async def _outputs(choices: list[Choice]):
        """(choice, queue item) as they arrive, every choice until it finishes."""
        pending = {c.index: asyncio.ensure_future(c.queue.get()) for c in choices}
        try:
            while pending:
                done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
                for index in sorted(i for i, f in pending.items() if f in done):
                    item = pending.pop(index).result()
                    yield choices[index], item
                    if isinstance(item, StepOutput) and item.finish_reason is None:
                        pending[index] = asyncio.ensure_future(choices[index].queue.get())
        finally:
            for f in pending.values():
                f.cancel()

    def _answer(self, c: Choice, out: StepOutput, parsed: Parsed) -> list[pb.GenerateResponse]:
        c.tokens.extend(out.token_ids)
        if out.cached_tokens is not None and not c.cached:
            c.cached = out.cached_tokens
        if out.logprobs:
            c.logprobs.extend(out.logprobs)
        top = c.params.logprobs or 0
        prompt_tokens = len(parsed.prompt)
        messages = []
        if parsed.stream and out.token_ids:
            chunk = pb.GenerateStreamChunk(
                token_ids=out.token_ids,
                prompt_tokens=prompt_tokens,
                completion_tokens=len(out.token_ids),
                cached_tokens=c.cached,
                index=c.index,
            )
            if c.params.logprobs is not None and out.logprobs:
                chunk.output_logprobs.CopyFrom(_output_logprobs(out.token_ids, out.logprobs, top))
            messages.append(pb.GenerateResponse(chunk=chunk))
        if out.finish_reason is not None:
            complete = pb.GenerateComplete(
                output_ids=[] if parsed.stream else c.tokens,
                finish_reason=out.finish_reason,
                prompt_tokens=prompt_tokens,
                completion_tokens=len(c.tokens),
                cached_tokens=c.cached,
                index=c.index,
            )
            if c.params.logprobs is not None and not parsed.stream:
                complete.output_logprobs.CopyFrom(_output_logprobs(c.tokens, c.logprobs, top))
            if isinstance(out.stop_reason, int):  # the engine's Sequence says what stopped it
                complete.matched_token_id = out.stop_reason
            elif isinstance(out.stop_reason, str):
                complete.matched_stop_str = out.stop_reason
            messages.append(pb.GenerateResponse(complete=complete))
        return messages

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        """Cancel requests by the gateway's ids (unknown ones: nothing to do); their streams end
        with finish reason "abort" and their blocks are free before the next step."""
        front = self.app[FRONT]
        for request_id in request.request_ids:
            for engine_id in self.active.get(request_id, ()):
                front.cancel(engine_id)
        return pb.AbortResponse()

    def _serving(self) -> tuple[bool, str]:
        loop = self.app[ENGINE_LOOP]
        if loop.fatal is not None:
            return False, f"the replica failed: {loop.fatal}"
        if loop.draining:
            return False, "the server is shutting down"
        if loop.task is None or loop.task.done():
            return False, "the engine loop is not running"
        return True, "ok"

    async def HealthCheck(self, request, context) -> pb.HealthCheckResponse:
        healthy, message = self._serving()
        return pb.HealthCheckResponse(healthy=healthy, message=message)

    async def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        engine, hf, tok = self.engine, self._hf_config(), self.engine.tokenizer
        defaults = {k: v for k, v in self.config.sampling_defaults.items() if k in DEFAULT_KEYS}
        bos = engine.config.bos_token_id if engine.config.bos_token_id is not None else None
        if bos is None and tok is not None:
            bos = tok.bos_id
        return pb.GetModelInfoResponse(
            model_path=str(self.model_dir or ""),
            is_generation=True,
            max_context_length=engine.max_len,
            vocab_size=engine.config.vocab_size,
            supports_vision=False,
            served_model_name=self.config.model_name,
            tokenizer_path=str(self.model_dir or ""),
            model_type=hf.get("model_type") or "",
            architectures=hf.get("architectures") or [engine.config.architecture],
            eos_token_ids=sorted(engine.eos_ids),
            pad_token_id=hf.get("pad_token_id") if isinstance(hf.get("pad_token_id"), int) else 0,
            bos_token_id=bos or 0,
            max_req_input_len=engine.max_len - 1,
            default_sampling_params_json=json.dumps(defaults, separators=(",", ":")) if defaults else "",
        )

    async def GetServerInfo(self, request, context) -> pb.GetServerInfoResponse:
        engine = self.engine
        return pb.GetServerInfoResponse(
            active_requests=self.app[FRONT].outstanding(),
            is_paused=self.app[ENGINE_LOOP].draining,
            last_receive_timestamp=self.last_receive,
            uptime_seconds=time.time() - self.app[STARTED],
            server_type="vllm-grpc",
            data_parallel_size=1,
            kv_cache_dtype="auto",
            block_size=engine.block_size,
            model_dtype=str(engine.config.dtype),
            max_num_seqs=engine.max_running,
        )

    async def GetLoads(self, request: pb.GetLoadsRequest, context) -> pb.GetLoadsResponse:
        if request.HasField("dp_rank") and request.dp_rank != 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"dp_rank: this server has rank 0 only, got {request.dp_rank}",
            )
        engine = self.engine
        stats = engine.stats()
        load = pb.SchedulerLoad(
            dp_rank=0,
            num_running_reqs=stats.running,
            num_waiting_reqs=stats.waiting,
            num_total_reqs=stats.running + stats.waiting,
            num_used_tokens=(stats.usable_blocks - stats.free_blocks) * engine.block_size,
            max_total_num_tokens=stats.usable_blocks * engine.block_size,
            token_usage=stats.kv_usage,
            max_running_requests=engine.max_running,
        )
        return pb.GetLoadsResponse(
            timestamp=datetime.now(timezone.utc).isoformat(),
            version=_version(),
            dp_rank_count=1,
            loads=[load],
        )

    def _tokenizer_bundle(self) -> tuple[bytes, str]:
        """The tokenizer files as one zip (fixed timestamps: the same files, the same hash)."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name in TOKENIZER_FILES:
                path = self.model_dir / name
                if path.is_file():
                    zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), path.read_bytes())
        data = buf.getvalue()
        return data, hashlib.sha256(data).hexdigest()

    async def GetTokenizer(self, request, context):
        if self.model_dir is None or self.engine.tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this server has no tokenizer")
        if self._bundle is None:
            self._bundle = await asyncio.to_thread(self._tokenizer_bundle)
        data, digest = self._bundle
        for start in range(0, len(data), CHUNK_BYTES):
            end = min(start + CHUNK_BYTES, len(data))
            yield common_pb2.GetTokenizerChunk(
                data=data[start:end], sha256=digest if end == len(data) else ""
            )

    async def FlushCache(self, request, context) -> common_pb2.FlushCacheResponse:
        """Empty the prefix cache (``POST /reset_prefix_cache``), waiting up to ``timeout_s`` for the
        requests running on cached blocks to finish (0: only if none runs now)."""
        if not self.engine.prefix_caching:
            return common_pb2.FlushCacheResponse(success=False, message="prefix caching is off")
        loop = self.app[ENGINE_LOOP]
        deadline = time.monotonic() + max(0.0, request.timeout_s)
        while True:
            try:
                dropped = await loop.between_steps(lambda engine: engine.reset_prefix_cache())
            except ServerShutdown as e:
                return common_pb2.FlushCacheResponse(success=False, message=str(e))
            if dropped is not None:
                return common_pb2.FlushCacheResponse(success=True, message=f"dropped {dropped} cached blocks")
            if time.monotonic() >= deadline:
                return common_pb2.FlushCacheResponse(
                    success=False, message="requests are running on cached blocks; nothing was flushed"
                )
            await asyncio.sleep(0.05)

    async def SubscribeKvEvents(self, request: common_pb2.SubscribeKvEventsRequest, context):
        """The prefix cache's changes and the engine's load (``KvEventPublisher``)."""
        if not self.engine.prefix_caching:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "prefix caching is off (--no-prefix-caching): there are no KV cache events to publish",
            )
        serving, message = self._serving()
        if not serving:
            await context.abort(grpc.StatusCode.UNAVAILABLE, message)
        start, early = request.start_sequence_number, request.load_records_before_first_batch
        batches = self.kv_events.stream(start, early)
        try:
            async with contextlib.aclosing(batches):
                async for batch in batches:
                    yield batch
        except Refused as e:
            await context.abort(e.code, str(e))
        except ServerShutdown as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    async def Embed(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server generates; it computes no embeddings")

    async def StartProfile(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "profiling over gRPC is not supported")

    async def StopProfile(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "profiling over gRPC is not supported")


def _version() -> str:
    try:
        return f"ringleader {version('ringleader')}"
    except PackageNotFoundError:
        return "ringleader"


class GrpcServer:
    """The VllmEngine service, the health service and reflection on ``host:port`` (grpc.aio, in
    the running event loop)."""

    def __init__(self, app: web.Application, host: str, port: int, model_dir=None):
        self.app, self.host, self.port = app, host, port
        self.service = VllmEngineService(app, model_dir)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        server = grpc.aio.server()
        pb_grpc.add_VllmEngineServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            server.add_insecure_port(address)
        except RuntimeError as e:
            raise RingleaderError(f"cannot listen on {address} for gRPC ({e})") from None
        await server.start()
        self.server = server
        await self._report()
        self._watch = asyncio.create_task(self._watching())

    async def _report(self) -> None:
        serving, _ = self.service._serving()
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def _watching(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            await self._report()

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.service.kv_events.close()
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.server is not None:
            await self.server.stop(grace_s)


GRPC_SERVER = web.AppKey("grpc_server", GrpcServer)


def add_grpc(app: web.Application, host: str, port: int, model_dir=None, log=True) -> None:
    """Serve the gRPC service on ``host:port`` while ``app`` runs (started after the engine loop,
    stopped before it); ``app[GRPC_SERVER]`` is the server."""
    server = app[GRPC_SERVER] = GrpcServer(app, host, port, model_dir)

    async def grpc_task(app: web.Application):
        await server.start()
        if log:
            print(f"ringleader: gRPC ({SERVICE}) at {host}:{port}", file=sys.stderr, flush=True)
        yield
        await server.stop()

    app.cleanup_ctx.append(grpc_task)
