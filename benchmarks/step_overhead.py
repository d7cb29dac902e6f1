"""What a compiled CPU decode step spends outside its kernels, with and without dynamo's guards on
the model's modules, side by side in one run.

The engine's compiled decoder (``engine.compiled.CompiledDecode``) checks no guard on the model's
modules before a step; with ``module_guards=True`` it checks them as dynamo does by default. Dynamo
keeps one cache of compiled code per function, so each variant runs in a process of its own, and
the processes alternate between the variants, ``--rounds`` of each. A process times a batch-1
decode step (generating N tokens less 1, over N - 1 steps; the median of three) and then profiles
one generation (``torch.profiler``) for the parts of a step: dynamo's cache lookup (its guards), the
bytecode before the graph (it gathers the graph's inputs), and the call of the compiled graph.
The figures are medians over the rounds; the step times come from the unprofiled generations.

``--pools 128,8192`` instead times compiled decode steps of the serving engine
(``engine.scheduler.Engine``, one request of 32 prompt tokens and 64 new ones at a time) over KV
pools of those many blocks, with glibc's thresholds raised for flex attention's scratch buffers
(``engine.compiled.keep_scratch_in_the_heap``, what the engine does) and without (that function
replaced by one that does nothing), each pool and variant in a process of its own, alternating.

``--kernels`` instead profiles one process of the engine's variant with inductor's kernel profile
on (``torch._inductor.config.cpp.enable_kernel_profile``, which adds a record per kernel call and
so slows the step) and prints each kind of generated kernel's time per step.

    python benchmarks/step_overhead.py --preset demo-150m
    python benchmarks/step_overhead.py --preset demo --rounds 5
    python benchmarks/step_overhead.py --preset demo-150m --kernels
    python benchmarks/step_overhead.py --preset demo --pools 128,8192
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.compiled import CompiledDecode  # noqa: E402
from engine.demo import default_demo_dir, ensure_demo  # noqa: E402
from engine.generate import Generator  # noqa: E402
from engine.request import SamplingParams  # noqa: E402

PARTS = {  # profiler event -> what it is
    "TorchDynamo Cache Lookup": "guards",
    "Pregraph bytecode": "inputs",
    "## Call CompiledFxGraph": "graph",
}


def profiled(gen: Generator, prompt: list[list[int]], params: SamplingParams):
    """The profiler's events of one generation, averaged by name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        gen.generate(prompt, params)
    return prof.key_averages()


def parts(gen: Generator, prompt: list[list[int]], params: SamplingParams) -> dict[str, float]:
    """Seconds per decode step in each of ``PARTS``, from one profiled generation."""
    out = dict.fromkeys(PARTS.values(), 0.0)
    for event in profiled(gen, prompt, params):
        for prefix, name in PARTS.items():
            if event.key.startswith(prefix):
                out[name] += event.self_cpu_time_total / 1e6 / (params.max_tokens - 1)
    return out


def kernels(gen: Generator, prompt: list[list[int]], params: SamplingParams) -> dict[str, float]:
    """Seconds per decode step in the generated kernels, by kind: flex attention, and the others
    (the products with what inductor fused into them), and their calls per step."""
    steps = params.max_tokens - 1
    out = {"flex attention": 0.0, "other kernels": 0.0, "flex calls": 0.0, "other calls": 0.0}
    for event in profiled(gen, prompt, params):
        if event.key.startswith("graph_") and "_cpp_" in event.key:
            kind = "flex" if "flex_attention" in event.key else "other"
            out["flex attention" if kind == "flex" else "other kernels"] += (
                event.self_cpu_time_total / 1e6 / steps
            )
            out[f"{kind} calls"] += event.count / steps
        elif event.key.startswith("## Call CompiledFxGraph"):
            out["graph"] = event.self_cpu_time_total / 1e6 / steps  # the wrapper's own time
    return out


def one(model_dir: str, module_guards: bool, new_tokens: int, with_kernels: bool = False) -> dict[str, float]:
    """This process's figures for one variant."""
    if with_kernels:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
        inductor_config.force_disable_caches = True  # a cached graph would have no kernel records
    gen = Generator.from_pretrained(model_dir, with_tokenizer=False, decode_mode="compiled")
    prompt = torch.randint(3, gen.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    prompt = prompt.tolist()
    full = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    first = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    gen.generate(prompt, first)  # allocates the cache and the engine's decoder
    ex = gen.executor
    if module_guards:
        ex.compiled = CompiledDecode(
            gen.model, ex.cache, gen.model.rotary.max_len, gen.device, module_guards=True
        )
    gen.generate(prompt, full)  # compiles
    steps = []
    for _ in range(3):
        t = time.perf_counter()
        gen.generate(prompt, full)
        t_full = time.perf_counter() - t
        t = time.perf_counter()
        gen.generate(prompt, first)
        steps.append((t_full - (time.perf_counter() - t)) / (new_tokens - 1))
    if with_kernels:
        return {"step": statistics.median(steps), **kernels(gen, prompt, full)}
    return {"step": statistics.median(steps), **parts(gen, prompt, full)}


def pool_step(model_dir: str, blocks: int, heap: bool) -> dict[str, float]:
    """The median compiled step of the serving engine over a pool of ``blocks`` blocks."""
    import engine.compiled
    from engine.scheduler import Engine

    if not heap:
        engine.compiled.keep_scratch_in_the_heap = lambda nbytes: False
    gen = Generator.from_pretrained(model_dir, with_tokenizer=False)
    eng = Engine.for_model(gen.model, blocks, 16, decode_mode="compiled", max_running=4)
    eng.warm_up()
    params = SamplingParams(max_tokens=65, temperature=0, ignore_eos=True)
    medians = []
    for r in range(4):
        eng.add_request(str(r), list(range(3, 35)), params)
        steps = []
        while eng.has_work():
            t = time.perf_counter()
            eng.step()
            steps.append(time.perf_counter() - t)
        medians.append(statistics.median(steps[2:]))  # the decode steps, not the prefill
    return {"step": statistics.median(medians)}


def child(*args: str) -> dict:
    """The figures this script prints as its last line when run with ``args`` in a new process."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the demo preset below)")
    parser.add_argument("--preset", default="demo-150m")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--kernels", action="store_true", help="time the generated kernels by kind")
    parser.add_argument("--pools", help="time the serving engine's compiled steps over pools of these blocks")
    parser.add_argument("--one-pool", help=argparse.SUPPRESS)
    parser.add_argument("--one", choices=("with", "without"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or str(ensure_demo(default_demo_dir(args.preset), args.preset))
    if args.one:
        print(json.dumps(one(model_dir, args.one == "with", args.new_tokens)))
        return 0
    if args.one_pool:
        blocks, heap = args.one_pool.split(":")
        print(json.dumps(pool_step(model_dir, int(blocks), heap == "heap")))
        return 0
    if args.pools:
        variants = {"heap": "thresholds raised (the engine)", "mmap": "glibc's defaults"}
        found: dict[tuple[int, str], list[float]] = {}
        for _ in range(args.rounds):
            for blocks in [int(b) for b in args.pools.split(",")]:
                for variant in variants:
                    row = child("--model", model_dir, "--one-pool", f"{blocks}:{variant}", "--threads",
                                str(args.threads))  # fmt: skip
                    found.setdefault((blocks, variant), []).append(row["step"])
        print(
            f"model {model_dir}, {args.threads} threads, serving engine, compiled steps, {args.rounds} rounds"
        )
        print(f"{'pool blocks':>11} {'allocator':<32} {'step ms (median of rounds)':>27}  rounds")
        for (blocks, variant), steps in found.items():
            each = ", ".join(f"{t * 1e3:.2f}" for t in steps)
            print(f"{blocks:>11} {variants[variant]:<32} {statistics.median(steps) * 1e3:>27.2f}  {each}")
        return 0
    if args.kernels:
        k = one(model_dir, False, args.new_tokens, with_kernels=True)
        print(f"model {model_dir}, {args.threads} threads, batch 1, the engine's decoder, kernel profile on")
        print(f"step {k['step'] * 1e3:.2f} ms (slowed by the kernel records)")
        for kind in ("flex attention", "other kernels"):
            calls = k["flex calls" if kind == "flex attention" else "other calls"]
            print(f"  {kind}: {k[kind] * 1e3:.2f} ms a step in {calls:.0f} calls")
        print(f"  the graph's wrapper, between its kernels: {k.get('graph', 0.0) * 1e3:.2f} ms a step")
        return 0
    names = {"without": "without module guards (the engine)", "with": "with module guards (dynamo's default)"}
    rows: dict[str, list[dict[str, float]]] = {v: [] for v in names}
    for _ in range(args.rounds):
        for variant in names:
            rows[variant].append(child("--model", model_dir, "--one", variant, "--new-tokens",
                                       str(args.new_tokens), "--threads", str(args.threads)))  # fmt: skip
    print(
        f"model {model_dir}, {args.threads} threads, torch {torch.__version__}, batch 1, {args.rounds} rounds"
    )
    print(f"{'decoder':<40} {'step ms':>8} {'guards ms':>10} {'inputs ms':>10} {'graph ms':>9}")
    for variant, name in names.items():
        m = {k: statistics.median(r[k] for r in rows[variant]) * 1e3 for k in ("step", *PARTS.values())}
        print(f"{name:<40} {m['step']:>8.2f} {m['guards']:>10.3f} {m['inputs']:>10.3f} {m['graph']:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
