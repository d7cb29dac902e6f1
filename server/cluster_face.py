"""What a member of a cluster adds to the HTTP front end: API calls forwarded to the leader,
the leader's term on its answers, ``GET /cluster``, and ``POST /_control/generate`` (a leader's
request to run one sequence on this member's replica), whose answer is a stream of JSON lines in
the format of ``server.router``'s ``encode_line``/``decode_line``, the one pair both ends use.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from engine.request import SamplingParams, StepOutput
from engine.scheduler import Engine
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
from server.response_cache import CACHE_HEADER
from server.router import Router, encode_line
from server.routing import PrefixIndex
from server.state import CLUSTER, CONFIG, ENGINE_LOOP, FRONT, METRICS, PROXY, ROUTER, SIGNER, ApiError


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
    session, cluster = request.app[PROXY], request.app[CLUSTER]
    headers = {
        k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type", "accept")
    }
    body = await request.read()
    response = None
    try:
        sent = session.request(request.method, leader + request.path_qs, data=body, headers=headers)
        async with await _while_leader_heard(cluster, sent) as upstream:
            response = web.StreamResponse(status=upstream.status)
            for key in ("Content-Type", "Retry-After", TERM_HEADER, CACHE_HEADER):
                if key in upstream.headers:
                    response.headers[key] = upstream.headers[key]
            await response.prepare(request)
            while chunk := await _while_leader_heard(cluster, upstream.content.readany()):
                await response.write(chunk)
            await response.write_eof()
            return response
    except (aiohttp.ClientError, asyncio.TimeoutError):
        if response is not None and response.prepared:
            # the answer has begun: cut it, as a leader that lost its lease cuts its own
            if request.transport is not None:
                request.transport.abort()
            return response
        raise ApiError(503, f"the leader at {leader} did not answer; retry shortly", "server_error",
                       code="no_leader") from None  # fmt: skip


async def _while_leader_heard(cluster: Cluster, awaitable):
    """``awaitable``'s result, unless this member stops hearing from the leader first
    (asyncio.TimeoutError): a paused leader still accepts connections (the kernel does) but
    answers nothing."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=cluster.heartbeat_s)
            if done:
                return task.result()
            if cluster.leader_url() is None:
                raise asyncio.TimeoutError
    finally:
        if not task.done():
            task.cancel()


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
            await response.write(encode_line(item))
            if not isinstance(item, StepOutput) or item.finish_reason is not None:
                break
    except ConnectionResetError:
        pass  # the leader went away or stopped the request
    finally:
        loop.cancel(rid)
    return response


def add_cluster(app: web.Application, engine: Engine, cluster: Cluster, signer: Signer) -> None:
    """Make ``app`` one member of ``cluster``: its control routes, the leader middleware, and the
    router over every replica as the app's request front."""
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
    router.policy = app[CONFIG].routing
    # the index of each replica forgets about as fast as a cache of this replica's size evicts
    router.block_size, router.index = engine.block_size, PrefixIndex(engine.num_blocks - 1)
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
