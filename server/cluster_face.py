"""What a member of a cluster adds to the HTTP front end: API calls served by every member with a
model (each is a front end: it routes its own requests over every replica), answers marked with the
member and its term, ``GET /cluster``, and ``POST /_control/generate`` (another member's request to
run one sequence on this member's replica), whose answer is a stream of JSON lines in the format of
``server.router``'s ``encode_line``/``decode_line``, the one pair both ends use.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from aiohttp import web

from engine.request import SamplingParams, StepOutput
from engine.scheduler import Engine
from server.cluster import (
    SIGNATURE,
    TERM_HEADER,
    Cluster,
    Forged,
    Refused,
    Signer,
    add_control_routes,
    cluster_metrics,
    verified,
)
from server.router import Router, encode_line
from server.routing import PrefixIndex
from server.state import CLUSTER, CONFIG, ENGINE_LOOP, FRONT, METRICS, ROUTER, SIGNER, ApiError

LEAVING = web.AppKey("leaving", asyncio.Task)
# how long a leaving member goes on taking requests after its /ready turned 503: a load balancer's
# health checks notice within this (HAProxy's ``inter 1s fall 2``, a Kubernetes readiness probe
# of period 1 s and failure threshold 2)
LEAVE_NOTICE_S = 3.0

MEMBER_HEADER = "X-Ringleader-Member"


@web.middleware
async def serving_middleware(request: web.Request, handler):
    """Every member with a model answers API calls itself, while it knows a leader with a
    majority or an election is under way (``Cluster.can_serve``); else 503."""
    cluster = request.app[CLUSTER]
    if request.path.startswith("/v1/") and not cluster.can_serve():
        raise ApiError(
            503, "no leader: this member has not heard from a leader with a majority; retry shortly",
            "server_error", code="no_leader",
        )  # fmt: skip
    return await handler(request)


async def _mark(request: web.Request, response: web.StreamResponse) -> None:
    """Answers to API calls name the member that served them and the term it knows."""
    if request.path.startswith("/v1/"):
        cluster = request.app[CLUSTER]
        response.headers[MEMBER_HEADER] = cluster.me
        response.headers[TERM_HEADER] = str(cluster.term)


async def cluster_state(request: web.Request) -> web.Response:
    cluster, router = request.app[CLUSTER], request.app[ROUTER]
    state = cluster.describe()
    state["replicas"] = router.replica_rows()
    return web.json_response(state)


async def control_generate(request: web.Request) -> web.StreamResponse:
    """A leader's request to run one sequence on this member's replica: JSON lines of token ids."""
    app = request.app
    cluster, loop = app[CLUSTER], app[ENGINE_LOOP]
    try:
        message = verified(await request.read(), request.headers.get(SIGNATURE), app[SIGNER], app[METRICS])
    except Forged as e:
        return web.json_response({"error": f"control message refused: {e.reason}"}, status=403)
    if not cluster.is_member(message):
        stranger = f"{message['from']!r} is not a member of this cluster with a replica"
        return web.json_response({"error": stranger}, status=409)
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


async def control_leave(request: web.Request) -> web.Response:
    """An operator's signed request (``python -m server.members leave``) that this member leave the
    cluster: it drains (refuses new requests, its replica reports draining, what it has in flight
    finishes), has the leader remove it from the configuration, and shuts down. 202 at once."""
    app = request.app
    try:
        verified(await request.read(), request.headers.get(SIGNATURE), app[SIGNER], app[METRICS])
    except Forged as e:
        return web.json_response({"error": f"control message refused: {e.reason}"}, status=403)
    cluster, router = app[CLUSTER], app[ROUTER]
    if app.get(LEAVING) is None:
        app[LEAVING] = asyncio.create_task(_leave(cluster, router, app[CONFIG].drain_timeout_s))
    return web.json_response({"leaving": cluster.me}, status=202)


async def _leave(cluster: Cluster, router: Router, drain_timeout_s: float) -> None:
    print(f"ringleader: member {cluster.me}: leaving: draining, then leaving the configuration",
          file=sys.stderr, flush=True)  # fmt: skip
    failed = await router.retire(LEAVE_NOTICE_S, drain_timeout_s)
    try:
        await cluster.leave()
    except Refused as e:
        print(f"ringleader: member {cluster.me}: could not leave: {e.reason}; shutting down anyway",
              file=sys.stderr, flush=True)  # fmt: skip
    print(f"ringleader: member {cluster.me}: left; {failed} requests failed the drain", file=sys.stderr,
          flush=True)  # fmt: skip
    _shut_down()


def _shut_down() -> None:
    """The shutdown a SIGTERM starts (drain, then exit), from inside."""
    os.kill(os.getpid(), signal.SIGTERM)


def _join_refused(cluster: Cluster, why: str) -> None:
    print(f"ringleader: error: member {cluster.me} could not join the cluster: {why}", file=sys.stderr,
          flush=True)  # fmt: skip
    os._exit(2)  # nothing was served yet: a member that is not in the cluster has no requests


def front_end_only(app: web.Application) -> None:
    """A member with no replica (``serve --no-replica``): its router never sends to its own engine,
    and it tells the others it has no replica, so that none sends there either."""
    app[ROUTER].replicas_of_own = False
    app[CLUSTER].replica_state = lambda: {"state": "none", "outstanding": 0}


def add_cluster(app: web.Application, engine: Engine, cluster: Cluster, signer: Signer) -> None:
    """Make ``app`` one member of ``cluster``: its control routes, the serving middleware, and the
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
    cluster.on_config = router.sync_replicas  # members join and leave
    cluster.on_removed = _shut_down
    cluster.on_join_refused = lambda why: _join_refused(cluster, why)

    async def members(app: web.Application):
        await router.start()
        await cluster.start()
        yield
        await cluster.stop()
        await router.stop()

    app.cleanup_ctx.append(members)
    app.on_response_prepare.append(_mark)
    add_control_routes(app, cluster, signer, app[METRICS])
    app.router.add_post("/_control/generate", control_generate)
    app.router.add_post("/_control/leave", control_leave)
    app.router.add_get("/cluster", cluster_state)
