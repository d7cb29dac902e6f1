"""Tensor- and pipeline-parallel figures on one host, each layout in its own torchrun job.

1. Resident parameter bytes per rank for tp = 1, 2, 4, against the whole checkpoint.
2. Decode throughput of a pp = 2 replica with one micro-batch in flight (the stages take turns)
   against pp micro-batches in flight (both stages busy), same batch, same run.

    python benchmarks/parallel.py --preset demo
    python benchmarks/parallel.py --model DIR --batch 8 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _torchrun(nproc: int, *args: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += [__file__, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"torchrun {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def driver(args) -> None:
    from engine.demo import default_demo_dir, ensure_demo
    from engine.loader import Checkpoint

    if args.model:
        model_dir = args.model
    else:
        model_dir = str(ensure_demo(default_demo_dir(args.preset), args.preset))
    total = Checkpoint(model_dir).nbytes()
    print(f"model {model_dir}: checkpoint {total} bytes ({total / 2**20:.1f} MiB)")
    print(f"{'tp':>3} {'rank':>4} {'parameter bytes':>16} {'share':>6} {'RSS MiB':>8}")
    for tp in (1, 2, 4):
        for r in _torchrun(tp, "--role", "bytes", "--model", model_dir, "--tp", str(tp)):
            share = r["param_bytes"] / total
            print(f"{tp:>3} {r['rank']:>4} {r['param_bytes']:>16} {share:>6.3f} {r['rss_mib']:>8.1f}")
    (r,) = _torchrun(
        2,
        "--role",
        "pipeline",
        "--model",
        model_dir,
        "--batch",
        str(args.batch),
        "--new-tokens",
        str(args.new_tokens),
        "--repeats",
        str(args.repeats),
    )
    print(
        f"pp=2, batch {args.batch}, {args.new_tokens} new tokens, 1 thread per rank: "
        f"1 micro-batch {r['tok_s'][0]:.1f} tok/s, 2 micro-batches {r['tok_s'][1]:.1f} tok/s, "
        f"speed-up {r['tok_s'][1] / r['tok_s'][0]:.2f}x"
    )


def worker(args) -> None:
    import psutil
    import torch
    import torch.distributed as dist

    from comm.dist import init
    from comm.layout import ParallelLayout
    from engine.replica import load_stage, make_groups
    from engine.request import SamplingParams

    env, device = init(timeout_s=120)
    layout = ParallelLayout(tp=args.tp, pp=2 if args.role == "pipeline" else 1)
    tp = make_groups(layout, env.rank, 120)
    replica = load_stage(args.model, layout, env, tp, device, progress=False)
    if args.role == "bytes":
        record = {
            "rank": env.rank,
            "param_bytes": replica.param_bytes,
            "rss_mib": psutil.Process().memory_info().rss / 2**20,
        }
        records = [record]
        if env.world_size > 1:
            records = [None] * env.world_size
            dist.all_gather_object(records, record)
        if env.rank == 0:
            for r in records:
                print(json.dumps(r))
    elif replica.is_head:
        gen = replica.generator()
        gen.min_micro_batch_rows = 1  # split however small the batch: the comparison is the point
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, replica.model.config.vocab_size, (args.batch, 16), generator=g).tolist()
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
        times = {1: [], 2: []}
        for _ in range(args.repeats + 1):  # the first round warms up
            for mb in (1, 2):
                gen.micro_batches = mb
                t = time.perf_counter()
                gen.generate(prompts, params)
                times[mb].append(time.perf_counter() - t)
        gen.close()
        tokens = args.batch * args.new_tokens
        print(json.dumps({"tok_s": [tokens / statistics.median(times[m][1:]) for m in (1, 2)]}))
    else:
        replica.follow()
    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the demo preset below)")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--role", choices=["bytes", "pipeline"], help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
