"""Serving benchmark: latency and throughput of an OpenAI-compatible server under load, over HTTP.

A seeded workload of random token-id prompts goes out as streaming ``POST /v1/completions``
requests (greedy, EOS ignored, a set number of new tokens each). Per request the client measures
the time to the first streamed chunk with tokens (TTFT), every gap between such chunks (ITL), the
time per output token after the first (TPOT = (e2e - TTFT) / (output tokens - 1)) and the
end-to-end latency; it reports their mean, median and p99 with the request, output-token and
total-token throughput of the run. Output-token counts come from the stream's final usage chunk.

Requests arrive all at once (``--request-rate inf``, the default) or as a Poisson process at
``--request-rate`` per second (gamma-distributed gaps with ``--burstiness`` other than 1), and
``--max-concurrency`` caps how many are in flight. Prompt and output lengths are drawn uniformly
within ``--range-ratio`` of ``--input-len`` and ``--output-len``; prompt ids avoid 0-3 (special).

The script starts the server itself (``python -m server`` on a free local port, stopped with
SIGTERM at the end) unless ``--base-url`` names a running one. ``--compare`` runs one workload at
one concurrency three ways in one invocation: a server with continuous batching, a server with
static batching, and the engine's own step loop in a separate process with no HTTP (all requests
added at once, at most the concurrency running); it prints them side by side with the
continuous/static throughput ratio and the server's overhead against the bare engine.

``--gateway`` runs one workload against one server started with ``--grpc-port``, in one invocation:
through the server's own HTTP front end, then through the Shepherd Model Gateway (``smg launch
--backend vllm``, the test extra's ``smg``) over gRPC, side by side. The gateway takes only text
prompts: each prompt is decoded and encoded again without special tokens with the checkpoint's
tokenizer.json (converted from tokenizer.model into a linked copy of the checkpoint when it has
none), so that both front ends get exactly the same token ids (the usage chunk's prompt token count
is checked against them).

    python benchmarks/serving.py --compare --num-prompts 128 --max-concurrency 32 \\
        --input-len 64 --output-len 128 --range-ratio 0.9
    python benchmarks/serving.py --max-concurrency 8 --num-prompts 64 --result-json serving.json
    python benchmarks/serving.py --gateway --num-prompts 32 --max-concurrency 8 --input-len 64 --output-len 64
    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --request-rate 4 --burstiness 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIRST_ID = 4  # prompt ids are drawn from [FIRST_ID, vocab): 0-3 are the special ids
WARMUP_TOKENS = 16
OTHER_CPU_WARN = 5  # percent of the machine's CPU taken by other processes during a run


@dataclass
class Request:
    prompt: list[int]
    output_len: int
    text: str | None = None  # the same prompt as text, for a front end that takes only text (--gateway)


@dataclass
class Result:
    prompt_len: int
    output_len: int  # asked for
    ok: bool = False
    output_tokens: int = 0  # generated, as the usage chunk counts them
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    start: float = 0.0  # when it was sent, seconds after the run began
    error: str = ""
    token_ids: list[int] = field(default_factory=list)  # what it generated (with ``ids`` in send)


# workload


def sample_workload(
    num: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    vocab_size: int,
    seed: int,
    output_dist: str = "uniform",
) -> list[Request]:
    """``num`` prompts of random token ids; each length uniform in [len * (1 - r), len * (1 + r)],
    or, with ``output_dist`` "exponential", output lengths exponential with mean ``output_len``
    (at least 1, at most 4x the mean): the long tail of chat traffic, where a few answers run much
    longer than most."""
    if not 0 <= range_ratio < 1:
        raise SystemExit(f"--range-ratio must be in [0, 1), got {range_ratio}")
    if vocab_size <= FIRST_ID:
        raise SystemExit(f"vocabulary of {vocab_size} ids has none past the special ids 0-{FIRST_ID - 1}")
    rng = random.Random(seed)

    def length(mean: int) -> int:
        low = max(1, math.floor(mean * (1 - range_ratio)))
        return rng.randint(low, max(low, math.ceil(mean * (1 + range_ratio))))

    requests = []
    for _ in range(num):
        prompt_len, new = length(input_len), length(output_len)
        if output_dist == "exponential":
            new = min(4 * output_len, max(1, round(rng.expovariate(1 / output_len))))
        requests.append(Request([rng.randrange(FIRST_ID, vocab_size) for _ in range(prompt_len)], new))
    return requests


def shared_prefix_workload(
    groups: int,
    per_group: int,
    system_len: int,
    question_len: int,
    output_len: int,
    vocab_size: int,
    seed: int,
) -> list[Request]:
    """``groups`` long system prompts, each followed by ``per_group`` questions of its own (as
    SGLang's generated-shared-prefix benchmark builds them), in a seeded random order."""
    rng = random.Random(f"shared prefix {seed}")

    def ids(n):
        return [rng.randrange(FIRST_ID, vocab_size) for _ in range(n)]

    systems = [ids(system_len) for _ in range(groups)]
    requests = [
        Request(system + ids(question_len), output_len) for system in systems for _ in range(per_group)
    ]
    rng.shuffle(requests)
    return requests


def conversation_workload(
    conversations: int, turns: int, message_len: int, vocab_size: int, seed: int
) -> list[list[list[int]]]:
    """Each conversation's user messages, turn by turn (random ids)."""
    rng = random.Random(f"conversations {seed}")
    return [
        [[rng.randrange(FIRST_ID, vocab_size) for _ in range(message_len)] for _ in range(turns)]
        for _ in range(conversations)
    ]


def arrival_times(num: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times in seconds after the start: the first at 0, then gamma-distributed gaps with mean
    1 / rate (shape ``burstiness``; 1 is a Poisson process, smaller is burstier)."""
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(f"arrivals {seed}")
    times, t = [], 0.0
    for _ in range(num):
        times.append(t)
        t += rng.gammavariate(burstiness, 1 / (rate * burstiness))
    return times


def vocab_size_of(model_dir: str) -> int:
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    return int(raw.get("vocab_size") or raw["text_config"]["vocab_size"])


def cpu_snapshot(pids=()) -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process, its reaped
    children and the live processes ``pids``)."""
    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    own = sum(os.times()[:4])
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            c = psutil.Process(pid).cpu_times()
            own += c.user + c.system
    return busy, own


def other_cpu_percent(before: tuple[float, float], after: tuple[float, float], wall: float) -> float:
    """Percent of the machine's CPU time that processes other than the benchmark's took between two
    snapshots: on a shared machine, a sign that the figures are skewed."""
    other = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, 100 * other / (wall * (os.cpu_count() or 1)))


# the HTTP client


async def send(
    session,
    url: str,
    headers: dict,
    model: str,
    req: Request,
    ignore_eos: bool,
    text: bool = False,
    ids: bool = False,
) -> Result:
    """One streaming completion (the prompt as token ids, or with ``text`` as text); a chunk with
    choices in it is one that carries tokens. ``ids``: also collect the generated token ids (asked
    for as log-probability entries, ``return_tokens_as_token_ids``)."""
    import aiohttp

    body = {
        "model": model,
        "prompt": req.text if text else req.prompt,
        "max_tokens": req.output_len,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    if ids:
        body.update(logprobs=0, return_tokens_as_token_ids=True)
    res = Result(prompt_len=len(req.prompt), output_len=req.output_len)
    usage, last = None, None
    sent = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=headers) as response:
            if response.status != 200:
                res.error = f"HTTP {response.status}: {(await response.text())[:500]}"
                return res
            async for line in response.content:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if chunk.get("error"):
                    res.error = f"error in the stream: {chunk['error']}"
                    return res
                if chunk.get("choices"):
                    if ids:
                        tokens = (chunk["choices"][0].get("logprobs") or {}).get("tokens") or []
                        res.token_ids += [int(t.removeprefix("token_id:")) for t in tokens]
                    if last is None:
                        res.ttft = now - sent
                    else:
                        res.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    usage = chunk["usage"]
        res.e2e = time.perf_counter() - sent
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    if last is None:
        res.error = "the stream carried no tokens"
    elif usage is None or not isinstance(usage.get("completion_tokens"), int):
        res.error = "the stream ended without a usage chunk"
    elif usage.get("prompt_tokens", res.prompt_len) != res.prompt_len:  # a text prompt tokenized otherwise
        res.error = f"the server counted {usage['prompt_tokens']} prompt tokens, not {res.prompt_len}"
    else:
        res.output_tokens, res.ok = usage["completion_tokens"], True
    return res


def served_model(base_url: str, headers: dict) -> str:
    request = urllib.request.Request(base_url.rstrip("/") + "/v1/models", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)["data"][0]["id"]
    except (urllib.error.URLError, OSError, ValueError, LookupError) as e:
        raise SystemExit(f"GET {request.full_url} failed: {e}") from None


async def run_load(
    base_url: str,
    requests: list[Request],
    args,
    concurrency: int | None,
    server_pid: int | None = None,
    text: bool = False,
) -> tuple[list[Result], float, float | None]:
    """Send the workload; (one result per request, in order; seconds from the first send to the
    last response's end; percent of the machine's CPU that other processes took meanwhile, when
    the server is this script's ``server_pid``). One short request goes first, untimed, to warm
    the server up and to check that it takes requests of this shape."""
    import aiohttp

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = served_model(base_url, headers)
    url = base_url.rstrip("/") + "/v1/completions"
    gate = asyncio.Semaphore(concurrency) if concurrency else contextlib.nullcontext()
    times = arrival_times(len(requests), args.request_rate, args.burstiness, args.seed)
    connector = aiohttp.TCPConnector(limit=concurrency or 0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        first = requests[0]
        warm = Request(first.prompt, min(WARMUP_TOKENS, first.output_len))
        warm.text = first.text
        check = await send(session, url, headers, model, warm, args.ignore_eos, text)
        if not check.ok:
            raise SystemExit(f"the warm-up request to {url} failed: {check.error}")
        cpu = cpu_snapshot([server_pid] if server_pid else [])
        start = time.perf_counter()

        async def one(req: Request, at: float) -> Result:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            async with gate:
                sent = time.perf_counter() - start
                res = await send(session, url, headers, model, req, args.ignore_eos, text)
            res.start = sent
            return res

        results = await asyncio.gather(*(one(r, t) for r, t in zip(requests, times)))
        duration = time.perf_counter() - start
    other = other_cpu_percent(cpu, cpu_snapshot([server_pid]), duration) if server_pid else None
    return list(results), duration, other


# the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


@contextlib.contextmanager
def server(model_dir: str, args, batching: str | None, max_running: int | None, extra: tuple = ()):
    """Start ``python -m server`` on a free local port, yield its URL once /ready answers 200, then
    stop it with SIGTERM and wait for it to exit."""
    port = args.port or free_port()
    cmd = [sys.executable, "-m", "server", "--model", model_dir, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--threads", str(args.threads), "--kv-cache-mib", str(args.kv_cache_mib)]
    cmd += ["--block-size", str(args.block_size), "--max-batched-tokens", str(args.max_batched_tokens)]
    cmd += ["--max-queue", str(args.max_queue or max(256, args.num_prompts))]
    if max_running:
        cmd += ["--max-running", str(max_running)]
    if batching:
        cmd += ["--batching", batching]
    cmd += [*extra, *shlex.split(args.server_args)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT)

        def log_tail() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")[-3000:]

        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + args.server_timeout
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"the server exited with status {proc.returncode}:\n{log_tail()}")
                if time.monotonic() > deadline:
                    raise SystemExit(f"the server was not ready after {args.server_timeout} s:\n{log_tail()}")
                try:
                    with urllib.request.urlopen(url + "/ready", timeout=5) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                time.sleep(0.25)
            print(f"  server ready: {shlex.join(cmd[1:])}", flush=True)
            yield url, proc.pid
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# the gateway (--gateway)


def gateway_model_dir(model_dir: str, tmp: str) -> str:
    """``model_dir`` when it has a tokenizer.json (the gateway tokenizes with it); else a copy in
    ``tmp`` (its files linked) with the tokenizer.json that transformers converts from the
    sentencepiece tokenizer.model, as the demo checkpoint has only that."""
    if (Path(model_dir) / "tokenizer.json").is_file():
        return model_dir
    from transformers import AutoTokenizer

    copy = Path(tmp) / Path(model_dir).name
    copy.mkdir()
    for f in Path(model_dir).iterdir():
        (copy / f.name).symlink_to(f.resolve())
    AutoTokenizer.from_pretrained(model_dir, use_fast=True).backend_tokenizer.save(
        str(copy / "tokenizer.json")
    )
    return str(copy)


def as_text(model_dir: str, requests: list[Request]) -> list[Request]:
    """The workload for a front end that takes only text: each prompt decoded, then encoded again
    without special tokens as the gateway encodes it (with the same tokenizer.json), so that the
    token-id requests sent to the replica's own HTTP front end are exactly what the gateway sends."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    out = []
    for r in requests:
        text = tok.decode(r.prompt, skip_special_tokens=True)
        out.append(Request(tok.encode(text, add_special_tokens=False).ids, r.output_len, text))
    return out


@contextlib.contextmanager
def gateway(model_dir: str, grpc_port: int, args):
    """``smg launch --backend vllm`` in front of the replica's gRPC port, on free local ports (the
    router's and its Prometheus exporter's: the only ones it opens here); yields its URL once
    ``GET /workers`` lists the worker, then kills it."""
    smg = Path(sys.executable).with_name("smg")
    if not smg.exists():
        raise SystemExit(f"--gateway needs the smg gateway ({smg} is missing): pip install 'smg>=1.13'")
    port = free_port()
    cmd = [str(smg), "launch", "--backend", "vllm", "--worker-urls", f"grpc://127.0.0.1:{grpc_port}"]
    cmd += ["--model-path", model_dir, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()), "--log-level", "warn"]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + args.server_timeout
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-3000:]
                    raise SystemExit(f"the gateway did not come up (status {proc.poll()}):\n{tail}")
                try:
                    with urllib.request.urlopen(url + "/workers", timeout=5) as response:
                        if json.load(response).get("workers"):
                            break
                except (urllib.error.URLError, OSError, ValueError):
                    pass
                time.sleep(0.25)
            print(f"  gateway ready: smg {shlex.join(cmd[1:])}", flush=True)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def gateway_compare(args, model_dir: str, requests: list[Request], info: dict) -> dict:
    """One replica with ``--grpc-port``; the workload through its own HTTP front end (token ids),
    then through the gateway over gRPC (the same prompts as text, which the gateway tokenizes to
    the same ids)."""
    runs, detail = {}, {}
    grpc_port = free_port()
    with server(model_dir, args, args.batching, args.max_running, ("--grpc-port", str(grpc_port))) as (
        url,
        pid,
    ):
        for name, base, text in (("http", url, False), ("gateway (gRPC)", None, True)):
            print(f"{name} ...", flush=True)
            with gateway(model_dir, grpc_port, args) if base is None else contextlib.nullcontext(base) as b:
                results, duration, other = asyncio.run(
                    run_load(b, requests, args, args.max_concurrency, pid, text=text)
                )
            runs[name], detail[name] = summarize(results, duration, other), results
            report_line(name, runs[name])
    http, gw = runs["http"], runs["gateway (gRPC)"]
    print()
    print(table(runs))
    print()
    if http["output_throughput"]:
        print(f"gateway / http output throughput: {gw['output_throughput'] / http['output_throughput']:.2f}x")
    print(
        f"TTFT mean: http {fmt_ms(http['mean_ttft_ms'])}, gateway {fmt_ms(gw['mean_ttft_ms'])}; "
        f"ITL mean: http {fmt_ms(http['mean_itl_ms'])}, gateway {fmt_ms(gw['mean_itl_ms'])}"
    )
    return {**info, "runs": runs, "_detail": detail}


# the bare engine, in its own process


def run_engine(model_dir: str, requests: list[Request], args, max_running: int) -> dict:
    """The workload through ``Engine.step`` in a fresh process (this script with ``--role engine``):
    what ``engine_worker`` prints, with its results as ``Result``s."""
    with tempfile.TemporaryDirectory() as tmp:
        workload = Path(tmp) / "workload.json"
        workload.write_text(json.dumps([asdict(r) for r in requests]))
        cmd = [sys.executable, __file__, "--role", "engine", "--workload", str(workload)]
        cmd += ["--model", model_dir, "--ignore-eos" if args.ignore_eos else "--no-ignore-eos"]
        cmd += ["--threads", str(args.threads), "--max-running", str(max_running)]
        cmd += ["--kv-cache-mib", str(args.kv_cache_mib), "--block-size", str(args.block_size)]
        cmd += ["--max-batched-tokens", str(args.max_batched_tokens)]
        out = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise SystemExit(f"the engine run failed (status {out.returncode}):\n{out.stderr[-3000:]}")
    record = json.loads(lines[-1])
    record["results"] = [Result(**r) for r in record["results"]]
    return record


def engine_worker(args) -> None:
    """Add every request at once, step until done, print one JSON line. Times count from each
    request's admission to the running batch (what a client holding at most max_running requests
    in flight would see), or from the start where the engine does not record admissions."""
    import torch

    from engine.request import SamplingParams
    from engine.scheduler import Engine

    torch.set_num_threads(args.threads)
    requests = [Request(**r) for r in json.loads(Path(args.workload).read_text())]
    engine = Engine.from_pretrained(
        args.model,
        kv_cache_mib=args.kv_cache_mib,
        block_size=args.block_size,
        max_running=args.max_running,
        max_batched_tokens=args.max_batched_tokens,
        batching="continuous",
    )

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0, ignore_eos=args.ignore_eos)

    engine.add_request("warm-up", requests[0].prompt, params(min(WARMUP_TOKENS, requests[0].output_len)))
    while engine.has_work():
        engine.step()
    results = {
        str(i): Result(prompt_len=len(r.prompt), output_len=r.output_len) for i, r in enumerate(requests)
    }
    first, last = {}, {}
    cpu = cpu_snapshot()
    start = time.monotonic()
    for i, r in enumerate(requests):
        engine.add_request(str(i), r.prompt, params(r.output_len))
    while engine.has_work():
        outputs = engine.step()
        now = time.monotonic()
        for out in outputs:
            res = results[out.request_id]
            if out.token_ids:
                if out.request_id in last:
                    res.itl.append(now - last[out.request_id])
                else:
                    first[out.request_id] = now
                last[out.request_id] = now
                res.output_tokens += len(out.token_ids)
            if out.finish_reason is not None:
                res.e2e = now
                res.ok = out.finish_reason != "abort" and out.request_id in first
                res.error = "" if res.ok else f"finished {out.finish_reason!r}"
    duration = time.monotonic() - start
    other = other_cpu_percent(cpu, cpu_snapshot(), duration)
    admitted = getattr(engine, "admitted", {})
    for rid, res in results.items():
        origin = admitted.get(rid, start)
        res.start = origin - start
        res.ttft = first.get(rid, origin) - origin
        res.e2e = max(0.0, res.e2e - origin)
    out = {
        "duration": duration,
        "other_cpu_pct": other,
        "from_admission": any(rid in admitted for rid in results),
        "results": [asdict(r) for r in results.values()],
    }
    print(json.dumps(out))


# metrics and reports


def summarize(results: list[Result], duration: float, other_cpu_pct: float | None = None) -> dict:
    import numpy as np

    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    input_tokens = sum(r.prompt_len for r in done)
    m = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "short": sum(r.output_tokens != r.output_len for r in done),  # fewer or more tokens than asked
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "other_cpu_pct": other_cpu_pct,
    }
    series = {
        "ttft": [r.ttft for r in done],
        "tpot": [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1],
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.e2e for r in done],
    }
    for name, values in series.items():
        ms = np.asarray(values) * 1000
        m[f"mean_{name}_ms"] = float(ms.mean()) if len(ms) else None
        m[f"median_{name}_ms"] = float(np.median(ms)) if len(ms) else None
        m[f"p99_{name}_ms"] = float(np.percentile(ms, 99)) if len(ms) else None
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        m["errors"] = errors[:5]
    return m


ROWS = [
    ("completed", "completed", "{:d}"),
    ("failed", "failed", "{:d}"),
    ("duration (s)", "duration_s", "{:.2f}"),
    ("input tokens", "total_input_tokens", "{:d}"),
    ("output tokens", "total_output_tokens", "{:d}"),
    ("request throughput (req/s)", "request_throughput", "{:.2f}"),
    ("output throughput (tok/s)", "output_throughput", "{:.1f}"),
    ("total throughput (tok/s)", "total_token_throughput", "{:.1f}"),
    ("other processes' CPU (% of machine)", "other_cpu_pct", "{:.1f}"),
    ("prefix cache hit rate", "prefix_hit_rate", "{:.3f}"),
] + [
    (f"{stat} {label} (ms)", f"{stat}_{name}_ms", "{:.1f}")
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency"))
    for stat in ("mean", "median", "p99")
]


def table(columns: dict[str, dict]) -> str:
    """A Markdown table: one row per metric, one column per run."""
    cells = [["metric", *columns]]
    for label, key, fmt in ROWS:
        cells.append([label, *("-" if m.get(key) is None else fmt.format(m[key]) for m in columns.values())])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]

    def line(row: list[str]) -> str:
        padded = [row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))]
        return "| " + " | ".join(padded) + " |"

    rule = [":" + "-" * (widths[0] - 1), *("-" * (w - 1) + ":" for w in widths[1:])]
    return "\n".join(line(row) for row in [cells[0], rule, *cells[1:]])


def machine() -> dict:
    import psutil

    from engine.hardware import gpus

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    devices, _ = gpus()
    return {
        "host": platform.node(),
        "system": f"{platform.system()} {platform.machine()}",
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": [d["name"] for d in devices],
        "python": platform.python_version(),
        "torch": version("torch"),
        "aiohttp": version("aiohttp"),
        "load_average_1m": os.getloadavg()[0],  # other work on the machine skews every figure
    }


def preamble(args, model_dir: str, requests: list[Request], concurrency: int | None) -> dict:
    """What the results need beside them: command, date, machine, model and workload."""
    command = shlex.join(["python", os.path.relpath(__file__, Path.cwd()), *sys.argv[1:]])
    host = machine()
    gpu = ", ".join(host["gpus"]) or "no GPU"
    ins, outs = [len(r.prompt) for r in requests], [r.output_len for r in requests]
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g} req/s"
    if not math.isinf(args.request_rate) and args.burstiness != 1:
        rate += f" (gamma, burstiness {args.burstiness:g})"
    info = {
        "command": command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": host,
        "model": model_dir,
        "base_url": args.base_url,
        "workload": {
            "num_prompts": len(requests),
            "input_len": [min(ins), sum(ins) / len(ins), max(ins)],
            "output_len": [min(outs), sum(outs) / len(outs), max(outs)],
            "range_ratio": args.range_ratio,
            "output_dist": args.output_dist,
            "seed": args.seed,
            "request_rate": args.request_rate if not math.isinf(args.request_rate) else "inf",
            "burstiness": args.burstiness,
            "max_concurrency": concurrency,
            "ignore_eos": args.ignore_eos,
        },
        "threads": None if args.base_url else args.threads,
    }
    print(f"command: {command}")
    print(f"date: {info['date']}")
    print(
        f"machine: {host['host']}, {host['system']}, {host['cpu_cores']} cores, {host['memory_gib']} GiB, "
        f"{gpu}; Python {host['python']}, torch {host['torch']}, aiohttp {host['aiohttp']}; "
        f"load average {host['load_average_1m']:.2f} at the start"
    )
    if args.base_url:
        print(f"server: {args.base_url}")
    else:
        threads = f"{args.threads} thread{'s' if args.threads != 1 else ''}"
        print(f"model: {model_dir}; the servers and the engine get {threads} each")
    print(
        f"workload: {len(requests)} prompts, seed {args.seed}; prompt tokens {min(ins)}-{max(ins)} "
        f"(mean {sum(ins) / len(ins):.1f}), output tokens {min(outs)}-{max(outs)} "
        f"(mean {sum(outs) / len(outs):.1f}); arrivals {rate}, concurrency {concurrency or 'unlimited'}"
    )
    return info


def report_line(name: str, m: dict) -> None:
    print(
        f"  {name}: {m['completed']} completed, {m['failed']} failed in {m['duration_s']:.1f} s, "
        f"{m['output_throughput']:.1f} output tok/s",
        flush=True,
    )
    for error in m.get("errors", []):
        print(f"    error: {error}")
    if m["short"]:
        print(f"    {m['short']} requests got a different number of tokens than they asked for")
    if m["other_cpu_pct"] is not None and m["other_cpu_pct"] > OTHER_CPU_WARN:
        print(f"    warning: other processes took {m['other_cpu_pct']:.0f}% of the machine's CPU meanwhile")


def fmt_ms(v) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def compare(args, model_dir: str, requests: list[Request], info: dict) -> dict:
    concurrency = args.max_concurrency
    max_running = args.max_running or concurrency
    runs, detail, pairs = {}, {}, []
    # the continuous server and the bare engine alternate (--repeats pairs), so that a drift of the
    # machine's speed hits both alike; the overhead is that of the summed throughputs
    for repeat in range(args.repeats):
        suffix = f" #{repeat + 1}" if args.repeats > 1 else ""
        print(f"continuous batching server{suffix} ...", flush=True)
        with server(model_dir, args, "continuous", max_running) as (url, pid):
            results, duration, other = asyncio.run(run_load(url, requests, args, concurrency, pid))
        name = "continuous" + suffix
        runs[name], detail[name] = summarize(results, duration, other), results
        report_line(name, runs[name])
        print(f"bare engine, no HTTP{suffix} ...", flush=True)
        bare = run_engine(model_dir, requests, args, max_running)
        name = "engine" + suffix
        runs[name] = summarize(bare["results"], bare["duration"], bare["other_cpu_pct"])
        detail[name] = bare["results"]
        report_line(name, runs[name])
        pairs.append((runs["continuous" + suffix], runs[name]))
    if not args.no_static:
        print("static batching server ...", flush=True)
        with server(model_dir, args, "static", max_running) as (url, pid):
            results, duration, other = asyncio.run(run_load(url, requests, args, concurrency, pid))
        runs["static"], detail["static"] = summarize(results, duration, other), results
        report_line("static", runs["static"])

    origin = "admission to the running batch" if bare["from_admission"] else "the start"
    cont, bare = pairs[0]
    static = runs.get("static")
    ratio = (
        cont["output_throughput"] / static["output_throughput"]
        if static and static["output_throughput"]
        else None
    )
    served = sum(c["output_throughput"] for c, _ in pairs)
    alone = sum(b["output_throughput"] for _, b in pairs)
    overhead = 1 - served / alone if alone else None
    print()
    print(table(runs))
    print()
    if ratio is not None:
        verdict = "met" if ratio >= 2 else "missed"
        print(f"continuous / static output throughput: {ratio:.2f}x (target >= 2x: {verdict})")
    print(
        f"p99 TTFT: continuous {fmt_ms(cont['p99_ttft_ms'])}, "
        + (f"static {fmt_ms(static['p99_ttft_ms'])}, " if static else "")
        + f"engine {fmt_ms(bare['p99_ttft_ms'])} (engine times count from {origin})"
    )
    if overhead is not None:
        verdict = "met" if overhead <= 0.1 else "missed"
        each = ", ".join(f"{1 - c['output_throughput'] / b['output_throughput']:.1%}" for c, b in pairs)
        print(
            f"server overhead, 1 - continuous server / bare engine output tok/s: {overhead:.1%} "
            f"(target <= 10%: {verdict})" + (f"; pair by pair: {each}" if len(pairs) > 1 else "")
        )
    if not math.isinf(args.request_rate):
        print("note: the bare engine gets every request at once; the servers got them at --request-rate")
    busy = [name for name, m in runs.items() if (m["other_cpu_pct"] or 0) > OTHER_CPU_WARN]
    if busy:
        print(f"warning: other processes were busy during {', '.join(busy)}: rerun on a quiet machine")
    return {
        **info,
        "max_running": max_running,
        "runs": runs,
        "comparison": {
            "continuous_over_static_output_throughput": ratio,
            "p99_ttft_ms": {name: m["p99_ttft_ms"] for name, m in runs.items()},
            "server_overhead": overhead,
        },
        "_detail": detail,
    }


# prefix caching (--prefix-cache)


def prefix_counters(base_url: str) -> tuple[float, float]:
    """The server's prefix-cache (queries, hits), in tokens, from /metrics."""
    import re

    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as response:
        text = response.read().decode()

    def value(name):
        found = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    return value("ringleader_prefix_cache_queries_total"), value("ringleader_prefix_cache_hits_total")


async def run_conversations(
    base_url: str, conversations: list[list[list[int]]], args, concurrency: int | None, server_pid=None
) -> tuple[list[Result], float, float | None]:
    """Multi-turn chats: each turn's prompt is the conversation so far (every earlier message and
    answer, as token ids) plus the next message; a conversation sends its next turn when the
    answer to the last one has arrived; at most ``concurrency`` turns are in flight at once, so
    with more conversations than that, a turn waits for a slot while others' turns run."""
    import aiohttp

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = served_model(base_url, headers)
    url = base_url.rstrip("/") + "/v1/completions"
    gate = asyncio.Semaphore(concurrency) if concurrency else contextlib.nullcontext()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        warm = await send(session, url, headers, model, Request([FIRST_ID] * 8, 4), args.ignore_eos, ids=True)
        if not warm.ok:
            raise SystemExit(f"the warm-up request to {url} failed: {warm.error}")
        cpu = cpu_snapshot([server_pid] if server_pid else [])
        start = time.perf_counter()

        async def chat(messages: list[list[int]]) -> list[Result]:
            history, results = [], []
            for message in messages:
                req = Request(history + message, args.output_len)
                async with gate:  # a turn waits for a free slot: other conversations' turns come between
                    res = await send(session, url, headers, model, req, args.ignore_eos, ids=True)
                res.start = time.perf_counter() - start
                results.append(res)
                if not res.ok or len(res.token_ids) != res.output_tokens:
                    res.ok, res.error = False, res.error or "the answer's token ids did not all arrive"
                    break
                history = req.prompt + res.token_ids
            return results

        done = await asyncio.gather(*(chat(c) for c in conversations))
        duration = time.perf_counter() - start
    other = other_cpu_percent(cpu, cpu_snapshot([server_pid]), duration) if server_pid else None
    return [r for results in done for r in results], duration, other


def prefix_compare(args, model_dir: str, workload, info: dict) -> dict:
    """One workload against a server without prefix caching, then one with it (the default), in
    one invocation: TTFT, throughput and the hit rate side by side."""
    concurrency = args.max_concurrency
    runs, detail = {}, {}
    for name, extra in (("no caching", ("--no-prefix-caching",)), ("prefix caching", ())):
        print(f"server with {name} ...", flush=True)
        with server(model_dir, args, args.batching, args.max_running, extra) as (url, pid):
            before = prefix_counters(url)
            if args.dataset == "multi-turn":
                results, duration, other = asyncio.run(
                    run_conversations(url, workload, args, concurrency, pid)
                )
            else:
                results, duration, other = asyncio.run(run_load(url, workload, args, concurrency, pid))
            after = prefix_counters(url)
        m = summarize(results, duration, other)
        queries, hits = after[0] - before[0], after[1] - before[1]
        m["prefix_cache_queries"], m["prefix_cache_hits"] = queries, hits
        m["prefix_hit_rate"] = hits / queries if queries else None
        runs[name], detail[name] = m, results
        report_line(name, m)
    off, on = runs["no caching"], runs["prefix caching"]
    print()
    print(table(runs))
    print()
    speedup = off["median_ttft_ms"] / on["median_ttft_ms"] if on["median_ttft_ms"] else None
    gain = on["output_throughput"] / off["output_throughput"] if off["output_throughput"] else None
    if speedup is not None:
        print(
            f"TTFT p50: {off['median_ttft_ms']:.1f} ms without caching, {on['median_ttft_ms']:.1f} ms "
            f"with: {speedup:.2f}x lower"
        )
    if gain is not None:
        print(f"output throughput: {gain:.2f}x with caching")
    if on["prefix_hit_rate"] is not None:
        print(f"prefix cache hit rate (tokens found / tokens looked up): {on['prefix_hit_rate']:.1%}")
    busy = [name for name, m in runs.items() if (m["other_cpu_pct"] or 0) > OTHER_CPU_WARN]
    if busy:
        print(f"warning: other processes were busy during {', '.join(busy)}: rerun on a quiet machine")
    return {
        **info,
        "runs": runs,
        "comparison": {"ttft_p50_speedup": speedup, "output_throughput_gain": gain},
        "_detail": detail,
    }


def cluster_compare(args, model_dir: str, workload, info: dict) -> dict:
    """One workload against one replica, then an emulated ``--cluster N``-member cluster on loopback
    routing cache-aware, then one routing least-loaded (prefix caching on everywhere; requests go to
    the leader): the hit rate of each, summed over its replicas, and the clusters' against the
    single replica's."""
    from server.testing.cluster import Cluster

    concurrency = args.max_concurrency
    flags = ["--kv-cache-mib", str(args.kv_cache_mib), "--block-size", str(args.block_size),
             "--max-batched-tokens", str(args.max_batched_tokens), "--max-queue", "1024",
             *shlex.split(args.server_args)]  # fmt: skip

    def load(url, pid=None):
        if args.dataset == "multi-turn":
            return asyncio.run(run_conversations(url, workload, args, concurrency, pid))
        return asyncio.run(run_load(url, workload, args, concurrency, pid))

    def measure(name, urls, run):
        before = [prefix_counters(u) for u in urls]
        results, duration, other = run()
        after = [prefix_counters(u) for u in urls]
        m = summarize(results, duration, other)
        queries = sum(a[0] - b[0] for a, b in zip(after, before))
        hits = sum(a[1] - b[1] for a, b in zip(after, before))
        m["prefix_cache_queries"], m["prefix_cache_hits"] = queries, hits
        m["prefix_hit_rate"] = hits / queries if queries else None
        report_line(name, m)
        return m, results

    runs, detail = {}, {}
    print("one replica ...", flush=True)
    with server(model_dir, args, args.batching, args.max_running) as (url, pid):
        runs["one replica"], detail["one replica"] = measure("one replica", [url], lambda: load(url, pid))
    for routing in ("cache-aware", "least-loaded"):
        name = f"{args.cluster} replicas, {routing}"
        print(f"cluster of {args.cluster} members on loopback, --routing {routing} ...", flush=True)
        names = tuple(f"n{i + 1}" for i in range(args.cluster))
        cluster = Cluster(model_dir, names, ("--threads", "1", *flags, "--routing", routing))
        try:
            leader = cluster.leader(timeout=60)
            urls = [cluster.url(n) for n in names]
            runs[name], detail[name] = measure(name, urls, lambda: load(cluster.url(leader)))  # noqa: B023
        finally:
            cluster.stop()
    print()
    print(table(runs))
    print()
    single_rate = runs["one replica"]["prefix_hit_rate"] or 0
    ratios = {}
    for name, m in runs.items():
        if name != "one replica" and m["prefix_hit_rate"] is not None and single_rate:
            ratios[name] = m["prefix_hit_rate"] / single_rate
            print(f"hit rate, {name}: {m['prefix_hit_rate']:.1%} = {ratios[name]:.2f}x one replica's "
                  f"{single_rate:.1%}")  # fmt: skip
    return {**info, "runs": runs, "comparison": {"hit_rate_over_one_replica": ratios}, "_detail": detail}


def single(args, model_dir: str | None, requests: list[Request], info: dict) -> dict:
    concurrency = args.max_concurrency
    name = args.batching or "server"
    if args.base_url:
        results, duration, other = asyncio.run(run_load(args.base_url, requests, args, concurrency))
    else:
        with server(model_dir, args, args.batching, args.max_running) as (url, pid):
            results, duration, other = asyncio.run(run_load(url, requests, args, concurrency, pid))
    m = summarize(results, duration, other)
    report_line(name, m)
    print()
    print(table({name: m}))
    return {**info, "runs": {name: m}, "_detail": {name: results}}


def main() -> int:
    from engine.scheduler import BATCHING

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the demo checkpoint)")
    parser.add_argument("--base-url", help="benchmark this running server instead of starting one")
    parser.add_argument("--api-key", default=os.environ.get("RINGLEADER_API_KEY"))
    parser.add_argument(
        "--vocab-size", type=int, help="prompt ids come from [4, this) (default: the model's)"
    )
    parser.add_argument("--compare", action="store_true", help="continuous vs static server vs bare engine")
    parser.add_argument(
        "--repeats", type=int, default=1, help="--compare: continuous server / bare engine pairs, alternated"
    )
    parser.add_argument("--no-static", action="store_true", help="--compare without the static server")
    parser.add_argument(
        "--gateway",
        action="store_true",
        help="one server: its own HTTP front end vs the smg gateway over gRPC (the model needs "
        "tokenizer.json, "
        "or one is converted from tokenizer.model)",
    )
    parser.add_argument(
        "--prefix-cache", action="store_true", help="a server without prefix caching vs one with it"
    )
    parser.add_argument(
        "--dataset",
        choices=["random", "shared-prefix", "multi-turn"],
        default="random",
        help="random prompts; groups sharing a long system prompt; or multi-turn conversations",
    )
    parser.add_argument("--num-groups", type=int, default=4, help="shared-prefix: system prompts")
    parser.add_argument("--prompts-per-group", type=int, default=8, help="shared-prefix: questions per group")
    parser.add_argument("--system-prompt-len", type=int, default=1900, help="shared-prefix: tokens")
    parser.add_argument("--question-len", type=int, default=100, help="shared-prefix: tokens")
    parser.add_argument("--num-conversations", type=int, default=8, help="multi-turn: conversations")
    parser.add_argument(
        "--cluster",
        type=int,
        default=0,
        help="with --prefix-cache: one replica vs a loopback cluster of N members routing cache-aware "
        "vs least-loaded (hit rates)",
    )
    parser.add_argument(
        "--turns", type=int, default=6, help="multi-turn: turns each (messages of --input-len tokens)"
    )
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform within this fraction")
    parser.add_argument(
        "--output-dist",
        choices=["uniform", "exponential"],
        default="uniform",
        help="output lengths: uniform (--range-ratio) or exponential with mean --output-len, capped at 4x",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-rate", type=float, default=math.inf, help="requests per second (inf)")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
    parser.add_argument(
        "--max-concurrency", type=int, default=None, help="requests in flight at most (--compare: 32)"
    )
    parser.add_argument(
        "--ignore-eos", action=argparse.BooleanOptionalAction, default=True, help="send ignore_eos: true"
    )
    parser.add_argument("--result-json", help="write the summary (and the command, date, machine) here")
    parser.add_argument("--save-detailed", action="store_true", help="put every request's times in the JSON")
    server_flags = parser.add_argument_group("the servers this script starts (and the bare engine)")
    server_flags.add_argument("--threads", type=int, default=os.cpu_count())
    server_flags.add_argument("--batching", choices=BATCHING, help="server default if unset")
    server_flags.add_argument("--port", type=int, default=None, help="default: a free one")
    server_flags.add_argument("--kv-cache-mib", type=int, default=512)
    server_flags.add_argument("--block-size", type=int, default=16)
    server_flags.add_argument(
        "--max-running", type=int, default=None, help="default: the server's; --compare: the concurrency"
    )
    server_flags.add_argument("--max-batched-tokens", type=int, default=512)
    server_flags.add_argument("--max-queue", type=int, default=None, help="default: max(256, --num-prompts)")
    server_flags.add_argument("--server-args", default="", help="more server flags, one shell-quoted string")
    server_flags.add_argument("--server-timeout", type=float, default=600, help="seconds to wait for /ready")
    parser.add_argument("--role", choices=["engine"], help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "engine":
        engine_worker(args)
        return 0
    if (args.compare or args.gateway) and args.base_url:
        parser.error("--compare and --gateway start their own servers; they do not take --base-url")
    if sum((args.compare, args.gateway, args.prefix_cache)) > 1:
        parser.error("--compare, --gateway and --prefix-cache are different runs")
    if args.prefix_cache and args.base_url:
        parser.error("--prefix-cache starts its own servers; it does not take --base-url")
    if args.cluster and (not args.prefix_cache or args.cluster < 2):
        parser.error("--cluster N (N >= 2) runs with --prefix-cache")
    if args.dataset == "multi-turn" and not args.prefix_cache:
        parser.error("--dataset multi-turn runs with --prefix-cache")
    if args.compare and args.max_concurrency is None:
        args.max_concurrency = 32
    if args.request_rate <= 0 or args.burstiness <= 0:
        parser.error("--request-rate and --burstiness must be > 0")
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        parser.error("--num-prompts, --input-len and --output-len must be >= 1")

    model_dir = args.model
    if model_dir is None and not (args.base_url and args.vocab_size):
        from engine.demo import ensure_demo

        model_dir = str(ensure_demo())
    vocab = args.vocab_size or vocab_size_of(model_dir)
    conversations = None
    if args.dataset == "shared-prefix":
        requests = shared_prefix_workload(
            args.num_groups,
            args.prompts_per_group,
            args.system_prompt_len,
            args.question_len,
            args.output_len,
            vocab,
            args.seed,
        )
    elif args.dataset == "multi-turn":
        conversations = conversation_workload(
            args.num_conversations, args.turns, args.input_len, vocab, args.seed
        )
        requests = [Request(m, args.output_len) for c in conversations for m in c]  # the messages alone
    else:
        requests = sample_workload(
            args.num_prompts,
            args.input_len,
            args.output_len,
            args.range_ratio,
            vocab,
            args.seed,
            args.output_dist,
        )
    with tempfile.TemporaryDirectory() as tmp:
        if args.gateway:
            model_dir = gateway_model_dir(model_dir, tmp)
            requests = as_text(model_dir, requests)
        info = preamble(args, model_dir, requests, args.max_concurrency)
        if conversations is not None:
            print(
                f"multi-turn: {len(conversations)} conversations of {args.turns} turns; each turn sends the "
                f"conversation so far plus a {args.input_len}-token message and gets {args.output_len} tokens"
            )
        if args.gateway:
            record = gateway_compare(args, model_dir, requests, info)
        elif args.prefix_cache and args.cluster:
            record = cluster_compare(args, model_dir, conversations or requests, info)
        elif args.prefix_cache:
            record = prefix_compare(args, model_dir, conversations or requests, info)
        elif args.compare:
            record = compare(args, model_dir, requests, info)
        else:
            record = single(args, model_dir, requests, info)
    detail = record.pop("_detail")
    record["load_average_1m_end"] = os.getloadavg()[0]
    print(f"load average {record['load_average_1m_end']:.2f} at the end")
    if args.result_json:
        if args.save_detailed:
            for name, results in detail.items():
                record["runs"][name]["requests"] = [asdict(r) for r in results]
        Path(args.result_json).write_text(json.dumps(record, indent=2))
        print(f"wrote {args.result_json}")
    return 0 if all(m["failed"] == 0 for m in record["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
