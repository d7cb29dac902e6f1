"""Servers for end-to-end tests: ``./launch.sh serve`` in a subprocess (``server.testing.processes``)
and an app in a thread of this process, on free loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import urllib.error
import urllib.request

from server.testing.processes import LaunchedServer, free_port  # noqa: F401 (the tests import them here)


@contextlib.contextmanager
def app_in_thread(app, port: int | None = None):
    """An aiohttp application (``server.app.create_app``'s) on ``port`` (default: a free loopback
    port), its event loop in a thread, once ``/health`` answers; yields (base URL, event loop)."""
    from aiohttp import web

    port = port or free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)

    def serve():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.05)
    try:
        yield base, loop
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def post_json(base: str, path: str, body) -> tuple[int, dict]:
    """POST ``body`` as JSON to ``base + path``, no retries: (status, the JSON answer)."""
    import json

    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
