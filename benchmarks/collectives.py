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

ALGORITHMS = ["native", "star", "tree", "ring", "hier", "hier-scatter", "auto"]
SIZES = [8 << (2 * i) for i in range(12)] + [64 << 20]  # 8 B, 32 B, ..., 32 MiB, 64 MiB


def _time(x, algorithm, rank, ranks, per_node, ops) -> float:
    """Seconds per all-reduce over ``ops`` back-to-back calls, started together (a barrier)."""
    import torch.distributed as dist

    from comm.allreduce import all_reduce

    dist.barrier()
    t = time.perf_counter()
    for _ in range(ops):
        all_reduce(x, algorithm, rank, ranks, None, per_node)
    return (time.perf_counter() - t) / ops


def _sweep(algorithms, n, rank, per_node, trials) -> list[dict]:
    """Every size, the algorithms interleaved trial by trial, in a new order each trial (the same
    on every rank), so that none always follows the same one; per (size, algorithm) the median
    over trials of the slowest rank's time."""
    import torch
    import torch.distributed as dist

    ranks = tuple(range(n))
    rows = []
    for size in SIZES:
        x = torch.zeros(max(1, size // 4), dtype=torch.float32)  # zeros: repeated sums stay finite
        # enough back-to-back calls that one timing is tens of milliseconds or more: the spread
        # of a single 64 MiB all-reduce on shared cores is larger than the targets' margins
        ops = max(3, min(50, (32 << 20) // size))
        for algorithm in algorithms:
            _time(x, algorithm, rank, ranks, per_node, 1)  # warm-up
        times = {a: [] for a in algorithms}
        for trial in range(trials):
            order = list(algorithms)
            random.Random(trial * 1000 + size).shuffle(order)
            for algorithm in order:
                local = _time(x, algorithm, rank, ranks, per_node, ops)
                everyone = [None] * n
                dist.all_gather_object(everyone, local)
                times[algorithm].append(max(everyone))
        rows += [{"bytes": size, "algorithm": a, "seconds": statistics.median(times[a])} for a in algorithms]
    return rows


def measure(args) -> None:
    import torch
    import torch.distributed as dist

    from comm import cost
    from comm.allreduce import chunks_for
    from comm.dist import init

    env, _ = init(timeout_s=300)
    n, rank = env.world_size, env.rank
    torch.set_num_threads(1)
    fixed = [a for a in ALGORITHMS if a != "auto"]
    rows = _sweep(fixed, n, rank, args.per_node, args.trials)

    links = {}
    for name in fixed:
        fits = []
        for pipelined in (True, False) if name == "tree" else (True,):
            samples = []
            for r in rows:
                if r["algorithm"] == name:
                    chunks = chunks_for(name, r["bytes"], n)
                    a, b = cost.coefficients(name, n, args.per_node, chunks, pipelined)
                    samples.append((a, b, r["seconds"], r["bytes"]))
            link = dataclasses.replace(cost.fit(samples), pipelined=pipelined)
            fits.append((max(cost.relative_errors(link, samples)), link))
        links[name] = min(fits, key=lambda f: f[0])[1]  # the tree's pieces overlap here, or not
    fitted = cost.Fitted(links, "this run")
    cost.use(fitted)  # every rank computed the same fit from the same gathered times
    # a second sweep, every algorithm and auto interleaved: these are the figures reported, and
    # the predictions of the fit to the first sweep are checked against them
    rows = _sweep(ALGORITHMS, n, rank, args.per_node, args.trials)
    for r in rows:
        name = (
            r["algorithm"] if r["algorithm"] != "auto" else cost.choose(r["bytes"], n, args.per_node, fitted)
        )
        r["predicted"] = cost.predict(
            name, n, r["bytes"], links[name], args.per_node, chunks_for(name, r["bytes"], n)
        )
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
    """Tokens/s of greedy batch-1 decoding on a tp = n replica under each algorithm."""
    import torch

    from comm.layout import ParallelLayout
    from engine.generate import SamplingParams
    from engine.replica import load_stage, make_groups

    layout = ParallelLayout(tp=env.world_size)
    out = {}
    base = make_groups(layout, env.rank, 300, "native", args.per_node)
    for algorithm in ALGORITHMS:
        tp = dataclasses.replace(base, algorithm=algorithm)
        replica = load_stage(args.model, layout, env, tp, torch.device("cpu"), progress=False)
        if replica.is_head:
            replica.tokenizer = None
            gen = replica.generator()
            params = SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True)
            gen.generate([[1, 2, 3, 4]], params)  # warm-up
            t = time.perf_counter()
            gen.generate([[1, 2, 3, 4]], params)
            out[algorithm] = args.decode_tokens / (time.perf_counter() - t)
            gen.close()
        else:
            replica.follow()
    return out


def report(args, rows, links, decode) -> None:
    n = args.nproc
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "collectives.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["bytes", "algorithm", "seconds", "predicted", "auto_picks"])
        w.writeheader()
        w.writerows(rows)
    by = {(r["bytes"], r["algorithm"]): r for r in rows}
    print(f"{n} ranks, {args.per_node} per node (hier), gloo, float32; time in microseconds (predicted)")
    for name, link in links.items():
        overlap = "" if name != "tree" else f", pieces overlap: {link['pipelined']}"
        alpha, beta = link["alpha"] * 1e6, link["beta"] * 1e9
        small = ""
        if link.get("small_alpha") is not None:
            small = f" (under {link['large_from'] >> 10} KiB: alpha {link['small_alpha'] * 1e6:.1f} us)"
        print(f"fitted {name:>12}: alpha {alpha:9.1f} us, beta {beta:7.3f} ns/B{small}{overlap}")
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
    errors = [
        abs(r["predicted"] - r["seconds"]) / r["seconds"]
        for r in rows
        if r["bytes"] >= 64 << 10 and r["algorithm"] != "auto"
    ]
    print(
        f"  cost model error at >= 64 KiB: median {statistics.median(errors):.0%}, "
        f"worst {max(errors):.0%} (target <= 30%)"
    )
    worst = sorted(
        (abs(r["predicted"] - r["seconds"]) / r["seconds"], r["algorithm"], r["bytes"])
        for r in rows
        if r["bytes"] >= 64 << 10 and r["algorithm"] != "auto"
    )[-3:]
    print("  largest errors: " + ", ".join(f"{a} at {b} B {e:.0%}" for e, a, b in reversed(worst)))
    if decode:
        rates = ", ".join(f"{a} {t:.1f} tok/s" for a, t in decode.items())
        print(f"\ndecode, tp = {n}, batch 1, {args.decode_tokens} tokens: {rates}")
    plot(rows, n, out / "collectives.png")
    print(f"\nwrote {out / 'collectives.csv'}, {out / 'collectives.png'}, {args.fitted}")


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
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--fitted", default=str(ROOT / "topologies" / "fitted.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        measure(args)
        return
    if args.model is None:
        from engine.demo import default_demo_dir, ensure_demo

        args.model = str(ensure_demo(default_demo_dir()))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)]
    cmd += [__file__, "--worker", "--per-node", str(args.per_node), "--model", args.model]
    cmd += ["--decode-tokens", str(args.decode_tokens), "--fitted", args.fitted, "--trials", str(args.trials)]
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
