"""``python -m server.witness`` (``./launch.sh witness``): a cluster member with no model.

    ./launch.sh witness --cluster a=http://h1:8000,b=http://h2:8000,w=http://h3:8100#witness \\
                        --name w --port 8100 --cluster-secret S

A two-node cluster cannot keep a majority when either node is lost: with two members a majority
is both. A witness is a third member that votes and acknowledges heartbeats but never leads and
holds no replica, so it needs no GPU and almost no memory and can run on any third host (a login
node, a small VM). With it, either node can fail and the other still leads, with the witness's
vote. The trade-off: the witness is a third failure domain to place and keep up, and losing the
witness and one node together stops the cluster (as it would with three full nodes); what it does
not give is capacity: only the two nodes serve.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from server.cluster import (
    Cluster,
    ConfigError,
    Signer,
    add_cluster_flags,
    add_control_routes,
    cluster_from_flags,
    cluster_metrics,
    parse_members,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ringleader witness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    add_cluster_flags(parser, required=True)
    args = parser.parse_args(argv)
    try:
        members = {m.name: m for m in parse_members(args.cluster)}
        if args.name not in members or not members[args.name].witness:
            raise ConfigError(f"--name {args.name!r} must be a member marked #witness in --cluster")
        registry = CollectorRegistry()
        metrics = cluster_metrics(registry)
        cluster, signer = cluster_from_flags(args, metrics)
    except ConfigError as e:
        print(f"ringleader: error: {e}", file=sys.stderr)
        return 2
    asyncio.run(_serve(cluster, signer, metrics, registry, args.host, args.port))
    return 0


async def _serve(cluster: Cluster, signer: Signer, metrics: dict, registry, host: str, port: int) -> None:
    app = web.Application()
    add_control_routes(app, cluster, signer, metrics)

    async def state(request: web.Request) -> web.Response:
        return web.json_response(cluster.describe())

    async def not_ready(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": {"message": "a witness never serves", "type": "server_error"}}, status=503
        )

    async def exposition(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/cluster", state)
    app.router.add_get("/ready", not_ready)
    app.router.add_get("/health", lambda request: web.json_response({"status": "ok"}))
    app.router.add_get("/metrics", exposition)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    await cluster.start()
    print(f"ringleader: witness {cluster.me!r} at http://{host}:{port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await cluster.stop()
    await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
