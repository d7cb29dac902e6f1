"""Where the ranks of a tp x pp replica spend a decode step: each rank's time in its stage's
forward pass, its tp all-reduces and the work between them, and its waits for the plan, the
activations and the sampled ids, per generated token.

It runs as a torchrun job, one thread per rank (as benchmarks/plan_check.py measures the layouts),
with timers around the functions of ``engine.executor`` and ``comm.collectives.all_reduce`` as the
model calls it. The head generates ``--tokens`` tokens at ``--batch`` rows after a warm-up; every
rank counts only what ran between the start and the end of that generation (the clocks of one
host's processes agree). Figures are per generated token (one decode step of the whole batch, all
its micro-batches), except the all-reduces and the gaps between them (the work of a rank between
two all-reduces), which are per call.

    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/step_phases.py --pp 2
    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/step_phases.py --tp 2
    python -m torch.distributed.run --standalone --nproc-per-node 4 benchmarks/step_phases.py \
        --tp 2 --pp 2 --batch 64

``--between 0,0.1,0.2,0.5`` instead runs the planner's calibration loops (``engine.planner._loop``)
on a tp group of every rank: a batch-1 all-reduce of the model's hidden size after that many
milliseconds of one thread's small ops on each rank (their time measured on rank 0 alone),
against the same work without the all-reduces, and prints what an all-reduce costs in such a loop
for each amount of work between two.

    python -m torch.distributed.run --standalone --nproc-per-node 4 benchmarks/step_phases.py \
        --tp 4 --between 0,0.05,0.1,0.2,0.5
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine.model  # noqa: E402
from comm.dist import init  # noqa: E402
from comm.layout import ParallelLayout  # noqa: E402
from engine import executor  # noqa: E402
from engine.demo import default_demo_dir, ensure_demo  # noqa: E402
from engine.replica import load_stage, make_groups  # noqa: E402
from engine.request import SamplingParams  # noqa: E402

TAGS = {executor.TAG_PLAN: "wait for the plan", executor.TAG_HIDDEN: "wait for activations",
        executor.TAG_IDS: "wait for the sampled ids"}  # fmt: skip
SPANS: list[tuple[str, float, float]] = []  # (what, start, end) on this rank


def timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPANS.append((name, start, time.perf_counter()))

    return wrapper


def instrument() -> None:
    """Timers around the executor's stage, its receives and the model's all-reduces."""
    executor.forward = timed("forward pass (its all-reduces in it)", executor.forward)
    executor.DistributedExecutor._broadcast = timed("send the plan", executor.DistributedExecutor._broadcast)
    recv = dist.recv

    def tagged(tensor, src=None, group=None, tag=0):
        start = time.perf_counter()
        try:
            return recv(tensor, src, group, tag)
        finally:
            SPANS.append((TAGS.get(tag, f"receive, tag {tag}"), start, time.perf_counter()))

    executor.dist.recv = tagged
    engine.model.all_reduce = timed("all-reduce", engine.model.all_reduce)


def summary(rank: int, start: float, end: float, tokens: int, tp: int) -> list[str]:
    inside = [(n, s, e) for n, s, e in SPANS if s >= start and e <= end and (tp > 1 or n != "all-reduce")]
    totals: dict[str, float] = collections.defaultdict(float)
    for n, s, e in inside:
        totals[n] += e - s
    lines = [
        f"rank {rank}: " + ", ".join(f"{n} {t / tokens * 1e3:.2f} ms" for n, t in sorted(totals.items()))
    ]
    calls = [(s, e) for n, s, e in inside if n == "all-reduce"]
    if calls:
        each = [e - s for s, e in calls]
        gaps = [b[0] - a[1] for a, b in zip(calls, calls[1:]) if b[0] - a[1] < 0.05]  # within a step
        q = lambda v, p: sorted(v)[int(p * (len(v) - 1))] * 1e3  # noqa: E731
        lines.append(
            f"rank {rank}: {len(each) / tokens:.0f} all-reduces a token, each median {q(each, 0.5):.3f} ms, "
            f"mean {statistics.mean(each) * 1e3:.3f}, p90 {q(each, 0.9):.3f}; the work between two: "
            f"median {q(gaps, 0.5):.3f} ms, mean {statistics.mean(gaps) * 1e3:.3f}, p90 {q(gaps, 0.9):.3f}"
        )
    return lines


def between(tp, hidden: int, works_ms: list[float], rank: int) -> None:
    """The cost of an all-reduce in the calibration's loops, for each amount of work between two."""
    from engine import planner

    x, w, buf = torch.randn(1, 8), torch.randn(8, 8), torch.zeros(1, hidden)
    # a small op's time, measured by one rank while the others wait at the barrier after it
    op_s = [planner.small_op_seconds() if rank == 0 else 0.0]
    dist.broadcast_object_list(op_s, src=0)
    found: dict[float, list[tuple[float, float]]] = {ms: [] for ms in works_ms}
    for _ in range(3):
        for ms in works_ms:
            ops = planner.small_ops_for(ms / 1e3, op_s[0])
            both = planner._loop(x, w, buf, tp, True, True, ops)
            alone = planner._loop(x, w, buf, tp, True, False, ops)
            found[ms].append((both - alone, alone))
    if rank == 0:
        for ms, rounds in found.items():
            cost = statistics.median(c for c, _ in rounds) * 1e3
            work = statistics.median(a for _, a in rounds) * 1e3
            print(f"{ms:.2f} ms of small ops asked ({work:.3f} ms a loop without all-reduces): "
                  f"an all-reduce costs {cost:.3f} ms", flush=True)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the demo preset below)")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=41)
    parser.add_argument("--between", help="milliseconds of work between all-reduces: the calibration's loops")
    args = parser.parse_args()
    env, device = init(timeout_s=300)
    layout = ParallelLayout(tp=args.tp, pp=args.pp)
    if layout.world_size != env.world_size:
        sys.exit(
            f"tp {args.tp} x pp {args.pp} needs {layout.world_size} ranks; torchrun started {env.world_size}"
        )
    model_dir = args.model or str(default_demo_dir(args.preset))
    if env.rank == 0:
        ensure_demo(model_dir, args.preset)
    dist.barrier()
    tp = make_groups(layout, env.rank, 300, algorithm="auto")
    if args.between:
        from engine.config import ModelConfig

        hidden = ModelConfig.from_hf(model_dir).hidden_size
        between(tp, hidden, [float(v) for v in args.between.split(",")], env.rank)
        dist.destroy_process_group()
        return 0
    replica = load_stage(model_dir, layout, env, tp, device, progress=False)
    instrument()
    window = [0.0, 0.0]
    if replica.is_head:
        gen = replica.generator()
        prompts = torch.randint(
            3, gen.config.vocab_size, (args.batch, 8), generator=torch.Generator().manual_seed(0)
        )
        prompts = prompts.tolist()
        for _ in range(2):
            gen.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        params = SamplingParams(max_tokens=args.tokens + 1, temperature=0, ignore_eos=True)
        # the prefill's plans go out first: the window opens at the first decode step's
        start = time.perf_counter()
        gen.generate(prompts, params)
        end = time.perf_counter()
        plans = [s for n, s, _ in SPANS if n == "send the plan" and s >= start]
        micro = max(1, len(plans) // (args.tokens + 1))  # a plan per micro-batch and step
        window = [plans[micro] if len(plans) > micro else start, end]
        print(
            f"tp {args.tp} x pp {args.pp}, batch {args.batch} ({micro} micro-batches), {args.tokens} decode "
            f"steps: {(end - window[0]) / args.tokens * 1e3:.2f} ms a token on the head",
            flush=True,
        )
        gen.close()
    else:
        replica.follow()
    shared = [window]
    dist.broadcast_object_list(shared, src=0)
    start, end = shared[0]
    lines = summary(env.rank, start, end, args.tokens, args.tp)
    every: list = [None] * env.world_size
    dist.all_gather_object(every, lines)
    if env.rank == 0:
        print("\n".join(line for rank_lines in every for line in rank_lines), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
