"""The planner's model of time against measured decode steps of every layout this host can run.

For each model, the host is measured first (``engine.planner.measure_host``: one thread's weight
bandwidth and matmul rates, host work beyond the matmuls on two random models of the model's shape
(``host_layers``), the gloo links of topologies/fitted.json, and ``calibrate_allreduce``:
all-reduces interleaved with matmuls of a layer's size and its host work, with 2 and 4 ranks and
with waiting ranks), then every layout (tp = 1, 2, 4; pp = 2; tp 2 x pp 2) runs as its own torchrun
job with one thread per rank and ``--allreduce auto``, timing decode steps at each batch size
(``time_decode_step``: the time of 20 generated tokens less that of 4, over the 16 steps between).
Beside each measurement it prints what ``engine.planner.decode_step`` predicts for it, the code path
of ``python -m engine.planner --gpu cpu``, with its parts. A layout of tp ranks alone (pp = 1) also
times its all-reduces in a step in its own tp group (``engine.planner.time_in_step``, the loops of
the host's calibration) just before and just after its steps, and is predicted with the mean of
those; the prediction with the host's calibration of minutes before is printed beside it
("host-calibrated").

    python benchmarks/plan_check.py
    python benchmarks/plan_check.py --presets demo --batches 1,16 --json out.json
    python benchmarks/plan_check.py --presets demo --passes 3

``--passes N`` measures every layout N times, the layouts in turn in each pass (a layout's step
time on this host moves by more than the 30% target between runs minutes apart), and compares each
prediction with the median of its passes, printing the fastest and the slowest beside it; a tp
layout is then predicted with the mean of its in-step fits from every pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import planner  # noqa: E402

LAYOUTS = ((1, 1), (2, 1), (4, 1), (1, 2), (2, 2))
PROMPT = 8
SHORT, LONG = 4, 20
CONTEXT = PROMPT + (SHORT + LONG) / 2  # cached tokens of the steps timed, on average


def predictions(shape: planner.ModelShape, device: planner.Device, tp: int, pp: int, batch: int, micro: int):
    """What the planner predicts for one measured case (float32 weights, as the demo models)."""
    return planner.decode_step(shape, tp, pp, "float32", device, batch, CONTEXT, micro)


def with_in_step(device: planner.Device, tp: int, fits: list[planner.InStep]) -> planner.Device:
    """``device`` with the in-step all-reduce of ``tp`` ranks alone on the host replaced by the mean
    of ``fits``, measured in the layout's own tp group beside its steps (the host's calibration
    runs minutes earlier, and what an all-reduce costs in a step moves on this host from minute to
    minute: BENCHMARKS.md)."""
    mean = planner.InStep(tp, tp, *(sum(getattr(f, k) for f in fits) / len(fits) for k in ("alpha", "beta")))
    kept = tuple(c for c in device.network.in_step if (c.n, c.procs) != (tp, tp))
    return dataclasses.replace(device, network=dataclasses.replace(device.network, in_step=(*kept, mean)))


def _torchrun(nproc: int, *args: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*cmd, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"torchrun {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def worker(args) -> None:
    import torch.distributed as dist

    from comm.dist import init
    from comm.layout import ParallelLayout
    from engine.generate import Generator
    from engine.replica import load_stage, make_groups

    env, device = init(timeout_s=300)
    layout = ParallelLayout(tp=args.tp, pp=args.pp)
    if layout.world_size == 1:  # the model in this process, as python -m engine.cli generate runs it
        gen, replica = Generator.from_pretrained(args.model, with_tokenizer=False), None
    else:
        tp = make_groups(layout, env.rank, 300, algorithm="auto")
        replica = load_stage(args.model, layout, env, tp, device, progress=False)
        gen = replica.generator() if replica.is_head else None
    beside = args.pp == 1 and args.tp > 1  # the tp group's all-reduces timed before and after its steps
    shape = planner.ModelShape.from_path(args.model) if beside else None
    host, op_s = (0.0, 0.0), None
    if args.host_work:  # a tp rank's host work per layer, and a small op's time, from the driver
        layer_s, layer_row_s, op_s = (float(v) for v in args.host_work.split(","))
        host = (layer_s, layer_row_s)
    calibrations = [planner.time_in_step(tp, shape, host, op_s)] if beside else []
    if gen is not None:
        for batch in [int(b) for b in args.batches.split(",")]:
            micro = max(1, min(gen.micro_batches, batch // max(1, gen.min_micro_batch_rows)))
            seconds = planner.time_decode_step(gen, batch, PROMPT, args.repeats, SHORT, LONG)
            print(json.dumps({"batch": batch, "micro_batches": micro, "seconds": seconds}), flush=True)
        gen.close()
    else:
        replica.follow()
    if beside:
        calibrations.append(planner.time_in_step(tp, shape, host, op_s))
        if env.rank == 0:
            print(json.dumps({"in_step": [{**c, "procs": args.tp} for c in calibrations]}), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


def driver(args) -> int:
    import statistics

    from engine.demo import default_demo_dir, ensure_demo

    rows = []
    head = (
        f"{'model':>10} {'tp':>3} {'pp':>3} {'batch':>5} {'mb':>3} {'predicted ms':>12} {'measured ms':>11}"
    )
    spread = f" {'passes (ms)':>21}" if args.passes > 1 else ""
    print(
        head + f" {'error':>7}{spread}   compute dispatch all-reduce gather hand-off (ms)  algorithm  "
        "host-calibrated"
    )
    for preset in args.presets.split(","):
        model_dir = str(ensure_demo(default_demo_dir(preset), preset))
        shape = planner.ModelShape.from_path(model_dir)
        device = planner.measure_host(shape=shape)
        print(f"# {preset}: " + "; ".join(f"{k} {v}" for k, v in device.figures.items()), flush=True)
        measured: dict[tuple[int, int], list[list[dict]]] = {layout: [] for layout in LAYOUTS}
        for n in range(args.passes):  # each pass runs every layout once, so the passes interleave
            for tp, pp in LAYOUTS:
                job = ["--role", "worker", "--model", model_dir, "--tp", str(tp), "--pp", str(pp)]
                work = (*device.host_work(tp)[:2], planner.small_op_seconds())
                job += ["--host-work", ",".join(map(str, work))]
                got = _torchrun(tp * pp, *job, "--batches", args.batches, "--repeats", str(args.repeats))
                measured[(tp, pp)].append(got)
                if args.passes > 1:
                    steps = ", ".join(f"{r['seconds'] * 1e3:.2f}" for r in got if "batch" in r)
                    print(f"# {preset} pass {n + 1}, tp {tp} x pp {pp}: {steps} ms", flush=True)
        for tp, pp in LAYOUTS:
            passes = measured[(tp, pp)]
            fits = [
                planner.in_step_fit(c, shape) for got in passes for r in got for c in r.get("in_step", [])
            ]
            used = with_in_step(device, tp, fits) if fits else device
            if fits:
                host = device.network.allreduce(0, tp, tp)[0]
                print(f"# {preset} tp {tp}: an all-reduce in a step, measured before and after the steps: "
                      + ", ".join(f"{f.at(0) * 1e3:.3f} ms + {f.beta * 1e9:.2f} ns/byte" for f in fits)
                      + f" (the host's calibration: {host * 1e3:.3f} ms)", flush=True)  # fmt: skip
            for r in (r for r in passes[0] if "batch" in r):
                each = [x["seconds"] for got in passes for x in got if x.get("batch") == r["batch"]]
                r = {**r, "seconds": statistics.median(each), "passes": each}
                p = predictions(shape, used, tp, pp, r["batch"], r["micro_batches"])
                err = p.seconds / r["seconds"] - 1
                host_err = (
                    predictions(shape, device, tp, pp, r["batch"], r["micro_batches"]).seconds / r["seconds"]
                    - 1
                )
                parts = {k: getattr(p, k) for k in ("compute", "dispatch", "allreduce", "gather", "handoff")}
                extra = {
                    "in_step_beside": [dataclasses.asdict(f) for f in fits],
                    "host_calibrated_error": host_err,
                }
                rows.append({"model": preset, "tp": tp, "pp": pp, **r, "predicted": p.seconds, "error": err,
                             "parts": parts, **extra})  # fmt: skip
                ranged = f" {min(each) * 1e3:>10.2f} to {max(each) * 1e3:>7.2f}" if args.passes > 1 else ""
                print(
                    f"{preset:>10} {tp:>3} {pp:>3} {r['batch']:>5} {r['micro_batches']:>3} "
                    f"{p.seconds * 1e3:>12.2f} {r['seconds'] * 1e3:>11.2f} {err * 100:>+6.1f}%{ranged}   "
                    f"{p.compute * 1e3:7.2f} {p.dispatch * 1e3:8.2f} {p.allreduce * 1e3:10.2f} "
                    f"{p.gather * 1e3:6.2f} {p.handoff * 1e3:8.2f}       {p.algorithm or '-':>9} "
                    f"{host_err * 100:>+15.1f}%",
                    flush=True,
                )
    worst = max(abs(r["error"]) for r in rows)
    within = sum(abs(r["error"]) <= 0.30 for r in rows)
    what = f"the median of {args.passes} passes" if args.passes > 1 else "the measurement"
    print(f"{within} of {len(rows)} cases within 30% of {what}; worst {worst * 100:.1f}%")
    if args.passes > 1:
        inside = sum(min(r["passes"]) <= r["predicted"] <= max(r["passes"]) for r in rows)
        print(f"{inside} of {len(rows)} predictions between the fastest and the slowest pass")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="demo,demo-150m")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--passes", type=int, default=1, help="measure every layout this many times, the layouts in turn"
    )
    parser.add_argument("--json", help="also write every case here")
    parser.add_argument("--role", choices=["worker"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    # a tp rank's host work per layer (seconds, seconds per row) and a small op's seconds
    parser.add_argument("--host-work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
