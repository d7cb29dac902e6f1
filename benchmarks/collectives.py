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
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ALGORITHMS = ["native", "star", "tree", "ring", "hier", "hier-scatter", "auto"]
SIZES = [8 << (2 * i) for i in range(12)] + [64 << 20]  # 8 B, 32 B, ..., 32 MiB, 64 MiB


def measure(args) -> None:
    import torch
    import torch.distributed as dist

    from comm.allreduce import all_reduce, tree_chunks
    from comm.cost import choose, coefficients, fit, load

    env, _ = __import__("comm.dist", fromlist=["init"]).init(timeout_s=300)
    n, rank, ranks = env.world_size, env.rank, tuple(range(env.world_size))
    torch.set_num_threads(1)
    rows = []
    for size in SIZES:
        x = torch.ones(max(1, size // 4), dtype=torch.float32)
        reps = max(5, min(50, (1 << 24) // size))
        for algorithm in ALGORITHMS:
            times = []
            for _ in range(reps + 2):
                y = x.clone()
                dist.barrier()
                t = time.perf_counter()
                all_reduce(y, algorithm, rank, ranks, None, args.per_node)
                times.append(time.perf_counter() - t)
            local = statistics.median(times[2:])
            slowest = [None] * n
            dist.all_gather_object(slowest, local)
            rows.append({"bytes": size, "algorithm": algorithm, "seconds": max(slowest)})
    if rank == 0:
        # fit one link for the hand-written topologies and one for native, from sizes >= 64 KiB up
        # and from the smallest sizes, so that both alpha and beta are pinned down
        samples = {"topologies": [], "native": []}
        for r in rows:
            name = r["algorithm"]
            if name == "auto":
                continue
            chunks = tree_chunks(r["bytes"]) if name == "tree" else 1
            a, b = coefficients(name, n, args.per_node, chunks)
            samples["native" if name == "native" else "topologies"].append((a, b * r["bytes"], r["seconds"]))
        fitted = {key: vars(fit(value)) for key, value in samples.items()}
        Path(args.fitted).write_text(
            json.dumps({**fitted, "ranks": n, "per_node": args.per_node}, indent=2) + "\n"
        )
        model = load(Path(args.fitted))
        for r in rows:
            name = r["algorithm"] if r["algorithm"] != "auto" else choose(r["bytes"], n, args.per_node, model)
            link = model.native if name == "native" else model.topologies
            chunks = tree_chunks(r["bytes"]) if name == "tree" else 1
            a, b = coefficients(name, n, args.per_node, chunks)
            r["predicted"] = a * link.alpha + b * r["bytes"] * link.beta
            r["auto_picks"] = name if r["algorithm"] == "auto" else ""
        print(json.dumps({"rows": rows, "fitted": fitted}))
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
    import dataclasses

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


def report(args, rows, fitted, decode) -> None:
    n = args.nproc
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "collectives.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["bytes", "algorithm", "seconds", "predicted", "auto_picks"])
        w.writeheader()
        w.writerows(rows)
    by = {(r["bytes"], r["algorithm"]): r for r in rows}
    print(f"{n} ranks, {args.per_node} per node (hier), gloo, float32; time in microseconds (predicted)")
    print(f"fitted: topologies alpha {fitted['topologies']['alpha'] * 1e6:.1f} us, beta "
          f"{fitted['topologies']['beta'] * 1e9:.3f} ns/B; native alpha {fitted['native']['alpha'] * 1e6:.1f} us, "
          f"beta {fitted['native']['beta'] * 1e9:.3f} ns/B")  # fmt: skip
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
        f"  cost model error at >= 64 KiB: median {statistics.median(errors):.0%}, worst {max(errors):.0%} (target <= 30%)"
    )
    if decode:
        print("\ndecode, tp = %d, batch 1, %d tokens: " % (n, args.decode_tokens) + ", ".join(
            f"{a} {t:.1f} tok/s" for a, t in decode.items()))  # fmt: skip
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
    cmd += ["--decode-tokens", str(args.decode_tokens), "--fitted", args.fitted]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"torchrun failed:\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    measured = next(r for r in records if "rows" in r)
    decode = next((r["decode"] for r in records if "decode" in r), None)
    report(args, measured["rows"], measured["fitted"], decode)


if __name__ == "__main__":
    main()
