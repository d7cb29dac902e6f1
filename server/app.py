"""OpenAI-compatible HTTP front end over a continuous-batching engine (aiohttp): the routes and
the application factory.

``create_app(engine, config)`` builds the application: ``server.engine_loop.EngineLoop`` drives
the engine, ``server.protocol`` parses requests, ``server.serving`` answers them, and with a
cluster ``server.cluster_face`` adds the member's routes. A client that disconnects cancels its
request, whose cache blocks are free before the next step.

Routes: POST /v1/completions and /v1/chat/completions (streaming as server-sent events),
GET /v1/models, POST /tokenize and /detokenize, POST /reset_prefix_cache, GET /health,
GET /ready, GET /metrics (Prometheus). Every error is one JSON shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine.errors import RequestError
from engine.hardware import gpus
from engine.scheduler import Engine
from server import protocol
from server.chat import ChatFormatter
from server.cluster import Cluster, Signer
from server.cluster_face import add_cluster, serving_middleware
from server.engine_loop import EngineLoop, ServerShutdown
from server.metrics import make_metrics
from server.serving import CHAT, TEXT, complete
from server.state import (
    CHAT_FORMATTER,
    CLUSTER,
    CONFIG,
    ENGINE,
    ENGINE_LOOP,
    FRONT,
    METRICS,
    ROUTER,
    STARTED,
    ApiError,
    ServerConfig,
)


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
    except RequestError as e:  # the protocol's, the chat template's and the engine's refusals
        if getattr(e, "kind", None) == "not_found":
            return _error_body(404, str(e), "not_found_error", e.param, getattr(e, "code", None))
        return _error_body(400, str(e), "invalid_request_error", e.param, getattr(e, "code", None))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}
        return _error_body(e.status, e.reason or "error", kind.get(e.status, "invalid_request_error"))


def _check_auth(request: web.Request) -> None:
    key = request.app[CONFIG].api_key
    if key and request.headers.get("Authorization") != f"Bearer {key}":
        raise ApiError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")


async def _json_body(request: web.Request) -> dict:
    """The request's JSON object, its model checked, after the API key."""
    _check_auth(request)
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
    protocol.check_model(body, request.app[CONFIG].model_name)
    return body


async def completions(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    return await complete(request, body, protocol.prompts(body, request.app[ENGINE].tokenizer), TEXT)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    prompt = request.app[CHAT_FORMATTER].prompt_ids(body.get("messages"), **protocol.template_fields(body))
    return await complete(request, body, [prompt], CHAT)


async def models(request: web.Request) -> web.Response:
    _check_auth(request)
    model = {
        "id": request.app[CONFIG].model_name,
        "object": "model",
        "created": request.app[STARTED],
        "owned_by": "ringleader",
        "max_model_len": request.app[ENGINE].max_len,
    }
    return web.json_response({"object": "list", "data": [model]})


async def tokenize(request: web.Request) -> web.Response:
    """vLLM's ``POST /tokenize``: the token ids of a prompt, or of chat messages rendered with the
    chat template."""
    body = await _json_body(request)
    engine = request.app[ENGINE]
    text, special = protocol.tokenize_request(body, request.app[CHAT_FORMATTER])
    tokens = await asyncio.to_thread(engine.tokenizer.encode, text, special)
    return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_len})


async def detokenize(request: web.Request) -> web.Response:
    """vLLM's ``POST /detokenize``: the text of token ids (special tokens left out)."""
    body = await _json_body(request)
    tokenizer = request.app[ENGINE].tokenizer
    return web.json_response(
        {"prompt": tokenizer.decode(protocol.detokenize_request(body, tokenizer.vocab_size))}
    )


async def health(request: web.Request) -> web.Response:
    task = request.app[ENGINE_LOOP].task
    alive = task is not None and not task.done()
    return web.json_response(
        {"status": "ok" if alive else "engine loop stopped"}, status=200 if alive else 503
    )


async def ready(request: web.Request) -> web.Response:
    loop = request.app[ENGINE_LOOP]
    cluster = request.app.get(CLUSTER)
    if cluster is not None and not cluster.can_serve():
        raise ApiError(503, "not ready: no leader with a majority heard from (an election or a partition)",
                       "server_error")  # fmt: skip
    if cluster is not None and not request.app[ROUTER].any_routable():
        raise ApiError(503, "not ready: no replica of the cluster can take requests", "server_error")
    if cluster is None and loop.fatal is not None:
        raise ApiError(503, f"not ready: the replica failed ({loop.fatal})", "server_error")
    if loop.draining:
        raise ApiError(503, "not ready: the server is shutting down", "server_error")
    if loop.task is None or loop.task.done():
        raise ApiError(503, "not ready: the engine loop is not running", "server_error")
    return web.json_response({"status": "ready"})


async def reset_prefix_cache(request: web.Request) -> web.Response:
    """Forget every prefix this member's replica has cached; refused (409) while requests run on
    cached blocks, as the reset could not take those back."""
    if not request.app[ENGINE].prefix_caching:
        raise ApiError(400, "prefix caching is off (--no-prefix-caching): there is no cache to reset")
    try:
        dropped = await request.app[ENGINE_LOOP].between_steps(lambda engine: engine.reset_prefix_cache())
    except ServerShutdown as e:
        raise ApiError(503, str(e), "server_error") from None
    if dropped is None:
        raise ApiError(
            409, "requests are running on cached blocks; reset the prefix cache when they have finished",
            "conflict_error", code="requests_running",
        )  # fmt: skip
    return web.json_response({"reset": True, "cached_blocks_dropped": dropped})


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    stats = request.app[ENGINE].stats()
    m["running"].set(stats.running)
    m["waiting"].set(stats.waiting)
    m["free_blocks"].set(stats.free_blocks)
    m["cached_free_blocks"].set(stats.cached_free_blocks)
    m["kv_usage"].set(stats.kv_usage)
    m["in_flight"].set(request.app[FRONT].outstanding())
    accepted = m["registry"].get_sample_value("ringleader_requests_total") or 0.0
    m["request_rate"].set(m["rate_window"].update(accepted))
    seen = m["engine_totals"]  # the engine counts from its start; the counters move by the difference
    for name in ("prefix_cache_queries", "prefix_cache_hits"):
        m[name].inc(getattr(stats, name) - seen.get(name, 0))
        seen[name] = getattr(stats, name)
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
    middlewares = [errors_middleware] + ([serving_middleware] if cluster is not None else [])
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body_bytes)
    app[METRICS] = make_metrics()
    app[CONFIG], app[ENGINE], app[STARTED] = config, engine, int(time.time())
    app[ENGINE_LOOP] = app[FRONT] = EngineLoop(engine, app[METRICS])
    if cluster is not None:
        add_cluster(app, engine, cluster, signer)

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
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    return app
