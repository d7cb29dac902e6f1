"""All-reduce topologies against the backend's own, side by side in one torchrun job.

For message sizes from 8 bytes to 64 MiB and every algorithm (native, star, tree, ring, hier,
hier-scatter, auto) it prints the median time, algbw = S / t and busbw = algbw * 2(n - 1) / n (the
nccl-tests definitions) and the cost model's prediction; fits the model's alpha and beta to the
measurements (written to topologies/fitted.json, which ``auto`` reads); writes a CSV and a PNG plot
of busbw and latency against size; and times decode steps of a tp = n model under each algorithm.

    python benchmarks/collectives.py --nproc 4            # starts torchrun itself
    python benchmarks/collectives.py --nproc 4 --per-node 2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from comm.cost import ALGORITHMS  # noqa: E402

SIZES = [8 << (2 * i) for i in range(12)] + [64 << 20]  # 8 B, 32 B, ..., 32 MiB, 64 MiB


def _time(x, algorithm, rank, ranks, per_node, ops, lead) -> list[float]:
    """Seconds each of ``ops`` back-to-back all-reduces took on this rank, from the return of one
    to the return of the next, after a barrier and ``lead`` untimed calls."""
    import torch.distributed as dist

    from comm.allreduce import all_reduce

    dist.barrier()
    for _ in range(lead):
        all_reduce(x, algorithm, rank, ranks, None, per_node)
    calls, t = [], time.perf_counter()
    for _ in range(ops):
        all_reduce(x, algorithm, rank, ranks, None, per_node)
        now = time.perf_counter()
        calls.append(now - t)
        t = now
    return calls


def _sweep(algorithms, n, rank, per_node, trials) -> list[dict]:
    """Every size, the algorithms interleaved in short timings, in a new order each trial (the
    same on every rank). Per (size, algorithm): the median of every timed call on each rank, and
    of those the slowest rank's.

    With more ranks than cores, how fast a run of calls goes depends on how the scheduler happens
    to place the ranks for a while, tens of milliseconds and more. Long timings of one algorithm
    (50 calls) then gave one algorithm measured twice medians 18% apart; timings of a few calls,
    interleaved, spread those spells over every algorithm alike, and the median call leaves out
    the calls that waited for a core."""
    import torch
    import torch.distributed as dist

    ranks = tuple(range(n))
    rows = []
    for size in SIZES:
        x = torch.zeros(max(1, size // 4), dtype=torch.float32)  # zeros: repeated sums stay finite
        ops = max(1, min(5, (32 << 20) // size))
        # a barrier lets the ranks go up to a few hundred microseconds apart: one untimed call
        # brings them into step, where a call takes under a few milliseconds
        lead = 1 if size < 1 << 20 else 0
        # large messages: each call is tens of milliseconds, and its time varies less
        rounds = trials if size < 1 << 20 else max(2, trials // 2)
        for algorithm in algorithms:
            _time(x, algorithm, rank, ranks, per_node, 1, 0)  # warm-up
        calls = {a: ([], []) for a in algorithms}  # the calls of even and of odd trials
        for trial in range(rounds):
            order = list(algorithms)
            random.Random(trial * 1000 + size).shuffle(order)
            for algorithm in order:
                calls[algorithm][trial % 2].extend(_time(x, algorithm, rank, ranks, per_node, ops, lead))
        medians = {
            a: {
                "seconds": statistics.median(even + odd),
                "even": statistics.median(even),
                "odd": statistics.median(odd),
            }
            for a, (even, odd) in calls.items()
        }
        everyone = [None] * n
        dist.all_gather_object(everyone, medians)
        for a in algorithms:
            rows.append(
                {"bytes": size, "algorithm": a, **{k: max(e[a][k] for e in everyone) for k in medians[a]}}
            )
    return rows


def fit_links(rows, algorithms, n, per_node, key) -> dict:
    """Each algorithm's link fitted to the times ``key`` of ``rows``."""
    from comm import cost
    from topologies.schedule import chunks_for

    links = {}
    for name in algorithms:
        fits = []
        for pipelined in (True, False) if name == "tree" else (True,):
            samples = []
            for r in rows:
                if r["algorithm"] == name:
                    chunks = chunks_for(name, r["bytes"], n)
                    a, b = cost.coefficients(name, n, per_node, chunks, pipelined)
                    samples.append((a, b, r[key], r["bytes"]))
            link = dataclasses.replace(cost.fit(samples), pipelined=pipelined)
            fits.append((max(cost.relative_errors(link, samples)), link))
        links[name] = min(fits, key=lambda f: f[0])[1]  # the tree's pieces overlap here, or not
    return links


def measure(args) -> None:
    import torch
    import torch.distributed as dist

    from comm import cost
    from comm.dist import init
    from topologies.schedule import chunks_for

    env, _ = init(timeout_s=300)
    n, rank = env.world_size, env.rank
    torch.set_num_threads(1)
    fixed = [a for a in ALGORITHMS if a != "auto"]
    rows = _sweep(fixed, n, rank, args.per_node, args.trials)

    links = fit_links(rows, fixed, n, args.per_node, "seconds")
    fitted = cost.Fitted(links, "this run")
    cost.use(fitted)  # every rank computed the same fit from the same gathered times
    # a second sweep, every algorithm and auto interleaved: these are the figures reported, and
    # the predictions of the fit to the first sweep are printed beside them. The model itself is
    # checked within this sweep, fitted to its even trials against its odd ones: in the minutes
    # between the sweeps the machine may change (an algorithm's time halving for a while as the
    # scheduler places the ranks otherwise), which no cost model foresees
    rows = _sweep(ALGORITHMS, n, rank, args.per_node, args.trials)
    check = fit_links(rows, fixed, n, args.per_node, "even")
    for r in rows:
        name = (
            r["algorithm"] if r["algorithm"] != "auto" else cost.choose(r["bytes"], n, args.per_node, fitted)
        )
        chunks = chunks_for(name, r["bytes"], n)
        r["predicted"] = cost.predict(name, n, r["bytes"], links[name], args.per_node, chunks)
        r["check_predicted"] = cost.predict(name, n, r["bytes"], check[name], args.per_node, chunks)
        r["auto_picks"] = name if r["algorithm"] == "auto" else ""
    if rank == 0:
        record = {"links": {k: vars(v) for k, v in links.items()}, "ranks": n, "per_node": args.per_node}
        Path(args.fitted).write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps({"rows": rows, "links": record["links"]}))
    decode = decode_steps(args, env) if args.model else None
    if rank == 0 and decode:
        print(json.dumps({"decode": decode}))
    dist.barrier()
    dist.destroy_process_group()


def decode_steps(args, env) -> dict:
    """Tokens/s of greedy batch-1 decoding on a tp = n replica under each algorithm: the median of
    ``args.decode_rounds`` timings, the algorithms interleaved round by round in a new order each
    round (the same on every rank), as the all-reduce sweeps are."""
    import torch

    from comm.layout import ParallelLayout
    from engine.replica import load_stage, make_groups
    from engine.request import SamplingParams

    layout = ParallelLayout(tp=env.world_size)
    base = make_groups(layout, env.rank, 300, "native", args.per_node)
    replicas = {}
    for algorithm in ALGORITHMS:
        tp = dataclasses.replace(base, algorithm=algorithm)
        replicas[algorithm] = load_stage(args.model, layout, env, tp, torch.device("cpu"), progress=False)
        replicas[algorithm].tokenizer = None
    params = SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True)
    warm = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    rates = {a: [] for a in ALGORITHMS}
    for round_ in range(args.decode_rounds):
        order = list(ALGORITHMS)
        random.Random(round_).shuffle(order)
        for algorithm in order:
            replica = replicas[algorithm]
            if not replica.is_head:
                replica.follow()  # until the head closes this round's generator
                continue
            gen = replica.generator()
            gen.generate([[1, 2, 3, 4]], warm)
            t = time.perf_counter()
            gen.generate([[1, 2, 3, 4]], params)
            rates[algorithm].append(args.decode_tokens / (time.perf_counter() - t))
            gen.close()
    return {a: statistics.median(r) for a, r in rates.items() if r}


def report(args, rows, links, decode) -> None:
    n = args.nproc
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "collectives.csv", "w", newline="") as f:
        w = csv.DictWriter(
            f,
            fieldnames=[
                "bytes",
                "algorithm",
                "seconds",
                "even",
                "odd",
                "predicted",
                "check_predicted",
                "auto_picks",
            ],
        )
        w.writeheader()
        w.writerows(rows)
    by = {(r["bytes"], r["algorithm"]): r for r in rows}
    print(f"{n} ranks, {args.per_node} per node (hier), gloo, float32; time in microseconds (predicted)")
    for name, link in links.items():
        overlap = "" if name != "tree" else f", pieces overlap: {link['pipelined']}"
        regimes = [
            f"alpha {a * 1e6:.1f} us, beta {b * 1e9:.3f} ns/B under {below >> 10} KiB"
            for below, a, b in link["regimes"]
        ]
        regimes.append(f"alpha {link['alpha'] * 1e6:.1f} us, beta {link['beta'] * 1e9:.3f} ns/B above")
        print(f"fitted {name:>12}: " + "; ".join(regimes) + overlap)
    header = f"{'bytes':>9} " + " ".join(f"{a:>17}" for a in ALGORITHMS) + "  auto picks"
    print(header)
    for size in SIZES:
        cells = [
            f"{by[(size, a)]['seconds'] * 1e6:8.0f} ({by[(size, a)]['predicted'] * 1e6:6.0f})"
            for a in ALGORITHMS
        ]
        print(f"{size:>9} " + " ".join(cells) + f"  {by[(size, 'auto')]['auto_picks']}")
    print("\nbusbw GB/s (algbw x 2(n-1)/n)")
    print(f"{'bytes':>9} " + " ".join(f"{a:>12}" for a in ALGORITHMS))
    for size in SIZES:
        bus = [size / by[(size, a)]["seconds"] * 2 * (n - 1) / n / 1e9 for a in ALGORITHMS]
        print(f"{size:>9} " + " ".join(f"{b:12.4f}" for b in bus))
    print("\ntargets:")
    big = [s for s in SIZES if s >= 16 << 20]
    ratio = min(by[(s, "native")]["seconds"] / by[(s, "ring")]["seconds"] for s in big)
    print(f"  ring busbw / native busbw at >= 16 MiB (worst size): {ratio:.2f} (target >= 0.9)")
    hand = ["star", "tree", "ring", "hier", "hier-scatter"]
    small = [s for s in SIZES if s <= 64 << 10]
    wins = sum(min(by[(s, a)]["seconds"] for a in hand) < by[(s, "native")]["seconds"] for s in small)
    print(f"  best hand-written topology beats native at {wins} of {len(small)} sizes <= 64 KiB")
    worst_best = max(
        by[(s, "auto")]["seconds"] / min(by[(s, a)]["seconds"] for a in ALGORITHMS[:-1]) for s in SIZES
    )
    worst_native = min(by[(s, "native")]["seconds"] / by[(s, "auto")]["seconds"] for s in SIZES)
    print(f"  auto time / best time, worst size: {worst_best:.2f} (target <= 1.10)")
    print(f"  auto speed vs native, worst size: {worst_native:.2f}x (target >= 0.95)")
    big = [r for r in rows if r["bytes"] >= 64 << 10 and r["algorithm"] != "auto"]
    _errors(
        "cost model error at >= 64 KiB, fitted to this sweep's even trials, against its odd ones",
        [(r["check_predicted"], r["odd"], r) for r in big],
        " (target <= 30%)",
    )
    _errors(
        "the first sweep's fit (in brackets above) against this sweep",
        [(r["predicted"], r["seconds"], r) for r in big],
    )
    if decode:
        rates = ", ".join(f"{a} {t:.1f} tok/s" for a, t in decode.items())
        print(
            f"\ndecode, tp = {n}, batch 1, {args.decode_tokens} tokens, median of {args.decode_rounds} "
            f"interleaved rounds: {rates}"
        )
    plot(rows, n, out / "collectives.png")
    print(f"\nwrote {out / 'collectives.csv'}, {out / 'collectives.png'}, {args.fitted}")


def _errors(label, cases, target="") -> None:
    """Print the median and worst |predicted - measured| / measured of (predicted, measured, row)
    cases, and the three largest."""
    errors = sorted((abs(p - t) / t, r["algorithm"], r["bytes"]) for p, t, r in cases)
    median = statistics.median(e for e, *_ in errors)
    print(f"  {label}: median {median:.0%}, worst {errors[-1][0]:.0%}{target}")
    print("    largest: " + ", ".join(f"{a} at {b} B {e:.0%}" for e, a, b in reversed(errors[-3:])))


def plot(rows, n, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bus_ax, lat_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for algorithm in ALGORITHMS:
        pts = sorted((r["bytes"], r["seconds"]) for r in rows if r["algorithm"] == algorithm)
        sizes = [s for s, _ in pts]
        bus_ax.plot(sizes, [s / t * 2 * (n - 1) / n / 1e9 for s, t in pts], marker="o", label=algorithm)
        lat_ax.plot(sizes, [t * 1e6 for _, t in pts], marker="o", label=algorithm)
    for ax, label in ((bus_ax, "busbw (GB/s)"), (lat_ax, "time (us)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    lat_ax.set_yscale("log")
    bus_ax.legend()
    fig.suptitle(f"all-reduce on {n} ranks (gloo)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--per-node", type=int, default=2, help="ranks per emulated node (hier)")
    parser.add_argument("--model", default=None, help="checkpoint for the decode timing (default: demo)")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--decode-rounds", type=int, default=5, help="timings of each algorithm's decoding")
    parser.add_argument("--trials", type=int, default=105, help="timings per algorithm and size")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--fitted", default=str(ROOT / "topologies" / "fitted.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trials < 2:
        parser.error(
            "--trials must be at least 2 (the cost model is checked on odd trials against even ones)"
        )
    if args.decode_rounds < 1:
        parser.error("--decode-rounds must be at least 1")
    if args.worker:
        measure(args)
        return
    if args.model is None:
        from engine.demo import default_demo_dir, ensure_demo

        args.model = str(ensure_demo(default_demo_dir()))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)]
    cmd += [__file__, "--worker", "--per-node", str(args.per_node), "--model", args.model]
    cmd += ["--decode-tokens", str(args.decode_tokens), "--decode-rounds", str(args.decode_rounds)]
    cmd += ["--fitted", args.fitted, "--trials", str(args.trials)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"torchrun failed:\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    measured = next(r for r in records if "rows" in r)
    decode = next((r["decode"] for r in records if "decode" in r), None)
    report(args, measured["rows"], measured["links"], decode)


if __name__ == "__main__":
    main()
