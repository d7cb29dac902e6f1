"""Front-end capacity: how many streamed tokens and requests one cluster front end relays, and two.

A front end (``./launch.sh serve --no-replica``: a cluster member that serves the API and routes
every request to other members' replicas) is driven to saturation with no model in the way: the
replicas are simulated members (this script's ``replica`` mode, one process each) that take part
in the cluster as any member does (heartbeats, votes, signed messages: the same ``server.cluster``
code) and answer ``POST /_control/generate`` with the control stream a real replica sends, one
token id per line every ``--interval-ms`` for each sequence. So the front end does all of its real
work per token (it reads the control stream, appends the token to the sequence, detokenizes
incrementally, checks stop strings, writes the SSE chunk) and none of a model's.

The load is raw streaming ``POST /v1/completions`` requests from a separate process (aiohttp, to
keep the client's cost per token low) at ``--concurrency`` streams, spread evenly over the front
ends; it counts the tokens streamed back (each SSE chunk with text is one token) and the requests
completed. For each front end the script samples its process's CPU time, so it reports tokens/s
per front-end core as well as in total; every process's CPU share is printed, since on a small
machine the front ends, the simulated replicas and the client share the cores.

    python benchmarks/frontend.py                         # 1 and 2 front ends, 2 replicas
    python benchmarks/frontend.py --front-ends 1 --concurrency 64,128 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECRET = "front-end-benchmark"


# --- the simulated replica: a cluster member whose replica streams token ids without a model


def replica_main(args) -> int:
    from aiohttp import web

    from engine.request import StepOutput
    from server.cluster import SIGNATURE, Cluster, Forged, Signer, add_control_routes, parse_members, verified
    from server.router import encode_line

    signer = Signer(SECRET)
    running: dict[str, int] = {}
    cluster = Cluster(args.name, parse_members(args.cluster), signer,
                      replica_state=lambda: {"state": "ready", "outstanding": len(running)})  # fmt: skip
    metrics: dict = {}
    tokens = [int(t) for t in args.tokens.split(",")]
    interval = args.interval_ms / 1000

    async def generate(request: web.Request) -> web.StreamResponse:
        try:
            message = verified(await request.read(), request.headers.get(SIGNATURE), signer, metrics)
        except Forged as e:
            return web.json_response({"error": f"control message refused: {e.reason}"}, status=403)
        rid, params = str(message["request_id"]), message["params"]
        done = len(message.get("generated") or [])
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        running[rid] = 1
        try:
            for i in range(done, params["max_tokens"]):
                await asyncio.sleep(interval)
                last = i == params["max_tokens"] - 1
                out = StepOutput(rid, [tokens[i % len(tokens)]], "", "length" if last else None, None,
                                 cached_tokens=0 if i == done else None)  # fmt: skip
                await response.write(encode_line(out))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            running.pop(rid, None)
        return response

    async def main() -> None:
        app = web.Application()
        add_control_routes(app, cluster, signer, metrics)
        app.router.add_post("/_control/generate", generate)
        app.router.add_get("/cluster", lambda r: web.json_response(cluster.describe()))
        app.router.add_get("/health", lambda r: web.json_response({"status": "ok"}))
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.port).start()
        await cluster.start()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await cluster.stop()
        await runner.cleanup()

    asyncio.run(main())
    return 0


# --- the load: raw streaming requests, counted


def _is_token(line: bytes) -> bool:
    """An SSE chunk that carries a token's text (not the final one or [DONE])."""
    return line.startswith(b'data: {"id"') and b'"text": ""' not in line


def load_main(args) -> int:
    import aiohttp

    bases = args.bases.split(",")
    body = json.dumps({"model": "tiny", "prompt": "relay", "max_tokens": args.max_tokens, "stream": True,
                       "temperature": 0, "ignore_eos": True}).encode()  # fmt: skip
    counts = {"tokens": 0, "requests": 0, "errors": 0}
    measuring = {"on": False}

    async def stream(session, base: str, until: float) -> None:
        while time.monotonic() < until:
            try:
                async with session.post(base + "/v1/completions", data=body,
                                        headers={"Content-Type": "application/json"}) as r:  # fmt: skip
                    if r.status != 200:
                        counts["errors"] += 1
                        await asyncio.sleep(0.1)
                        continue
                    buffer = b""
                    async for chunk in r.content.iter_any():
                        buffer += chunk
                        *lines, buffer = buffer.split(b"\n\n")
                        if measuring["on"]:
                            counts["tokens"] += sum(_is_token(line) for line in lines)
                if measuring["on"]:
                    counts["requests"] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError):
                counts["errors"] += 1

    async def main() -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as s:
            start = time.monotonic()
            until = start + args.warmup + args.duration
            tasks = [
                asyncio.ensure_future(stream(s, bases[i % len(bases)], until))
                for i in range(args.concurrency)
            ]
            await asyncio.sleep(args.warmup)
            measuring["on"] = True
            t0 = time.monotonic()
            await asyncio.sleep(args.duration)
            measuring["on"] = False
            elapsed = time.monotonic() - t0
            snapshot = dict(counts)
            await asyncio.gather(*tasks)
        print(json.dumps({**snapshot, "seconds": elapsed}), flush=True)

    asyncio.run(main())
    return 0


# --- the run


def _free_ports(n: int) -> list[int]:
    from server.testing.processes import free_port

    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def _wait_http(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not answer 200 within {timeout:g} s")
        time.sleep(0.2)


def run(model: Path, front_ends: int, replicas: int, concurrency: int, args) -> dict:
    import psutil

    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    ids = tok.encode(
        " the quick brown fox jumps over the lazy dog and runs far away", add_special_tokens=False
    )
    names = [f"fe{i + 1}" for i in range(front_ends)] + [f"r{i + 1}" for i in range(replicas)]
    ports = dict(zip(names, _free_ports(len(names))))
    spec = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in ports.items())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RINGLEADER_CLUSTER_SECRET": SECRET}
    procs: dict[str, subprocess.Popen] = {}
    logs = tempfile.TemporaryDirectory()
    try:
        for n in names:
            log = open(Path(logs.name) / f"{n}.log", "w")
            if n.startswith("r"):
                cmd = [sys.executable, __file__, "replica", "--name", n, "--port", str(ports[n]),
                       "--cluster", spec, "--interval-ms", str(args.interval_ms),
                       "--tokens", ",".join(map(str, ids))]  # fmt: skip
            else:
                cmd = [sys.executable, "-m", "server", "--model", str(model), "--no-replica",
                       "--threads", "1", "--cluster", spec, "--name", n, "--port", str(ports[n]),
                       "--max-queue", "100000", "--state-dir", str(Path(logs.name) / n)]  # fmt: skip
            procs[n] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        fronts = [n for n in names if n.startswith("fe")]
        for n in fronts:
            _wait_http(f"http://127.0.0.1:{ports[n]}/ready", 120)
        handles = {n: psutil.Process(p.pid) for n, p in procs.items()}
        bases = ",".join(f"http://127.0.0.1:{ports[n]}" for n in fronts)
        loader = subprocess.Popen([sys.executable, __file__, "load", "--bases", bases, "--concurrency",
                                   str(concurrency), "--max-tokens", str(args.max_tokens), "--duration",
                                   str(args.duration), "--warmup", str(args.warmup)],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)  # fmt: skip
        handles["client"] = psutil.Process(loader.pid)
        time.sleep(args.warmup)
        before = {n: sum(h.cpu_times()[:2]) for n, h in handles.items()}
        t0 = time.monotonic()
        time.sleep(args.duration)
        cpu = {n: (sum(h.cpu_times()[:2]) - before[n]) / (time.monotonic() - t0) for n, h in handles.items()}
        out, _ = loader.communicate(timeout=args.duration + 120)
        figures = json.loads(out.strip().splitlines()[-1])
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        logs.cleanup()
    tok_s = figures["tokens"] / figures["seconds"]
    fe_cores = sum(cpu[n] for n in fronts)
    return {
        "front_ends": front_ends,
        "replicas": replicas,
        "concurrency": concurrency,
        "tokens_per_s": round(tok_s),
        "requests_per_s": round(figures["requests"] / figures["seconds"], 1),
        "errors": figures["errors"],
        "front_end_cores": round(fe_cores, 2),
        "tokens_per_s_per_front_end_core": round(tok_s / fe_cores) if fe_cores else None,
        "cpu_share": {n: round(c, 2) for n, c in cpu.items()},
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("replica", "load"):
        mode = sys.argv.pop(1)
        p = argparse.ArgumentParser()
        if mode == "replica":
            p.add_argument("--name", required=True)
            p.add_argument("--port", type=int, required=True)
            p.add_argument("--cluster", required=True)
            p.add_argument("--interval-ms", type=float, required=True)
            p.add_argument("--tokens", required=True)
            return replica_main(p.parse_args())
        p.add_argument("--bases", required=True)
        p.add_argument("--concurrency", type=int, required=True)
        p.add_argument("--max-tokens", type=int, required=True)
        p.add_argument("--duration", type=float, required=True)
        p.add_argument("--warmup", type=float, required=True)
        return load_main(p.parse_args())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--front-ends", default="1,2", help="numbers of front ends to measure")
    parser.add_argument("--replicas", type=int, default=2, help="simulated replicas")
    parser.add_argument("--concurrency", default="128", help="streams in flight, comma-separated values")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per request")
    parser.add_argument("--interval-ms", type=float, default=5.0, help="time between a sequence's tokens")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds measured per point")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--model", default=None, help="checkpoint for the tokenizer (default: the tiny demo)")
    parser.add_argument("--result-json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else None
        if model is None:
            from engine.demo import build_demo

            model = build_demo(Path(tmp) / "tiny", preset="tiny")
        results = []
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            for n in [int(f) for f in args.front_ends.split(",")]:
                r = run(model, n, args.replicas, concurrency, args)
                print(json.dumps(r), flush=True)
                results.append(r)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    print(f"\n{command}\n{datetime.date.today()}, {os.cpu_count()} CPUs; each sequence streams a token "
          f"every {args.interval_ms:g} ms from {args.replicas} simulated replicas\n")  # fmt: skip
    print("| front ends | streams | tokens/s | requests/s | errors | front-end cores "
          "| tokens/s per front-end core | CPU share (cores) |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        share = ", ".join(f"{k} {v}" for k, v in r["cpu_share"].items())
        print(
            f"| {r['front_ends']} | {r['concurrency']} | {r['tokens_per_s']} | {r['requests_per_s']} | "
            f"{r['errors']} | {r['front_end_cores']} | {r['tokens_per_s_per_front_end_core']} | {share} |"
        )
    by = {(r["concurrency"], r["front_ends"]): r for r in results}
    for c in sorted({r["concurrency"] for r in results}):
        if (c, 1) in by and (c, 2) in by:
            gain = by[(c, 2)]["tokens_per_s"] / max(1, by[(c, 1)]["tokens_per_s"])
            print(f"\n{c} streams: 2 front ends relay {gain:.2f}x the tokens/s of one (target >= 1.6x)")
    if args.result_json:
        Path(args.result_json).write_text(json.dumps({"command": command, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
