"""Decode throughput of the engine against transformers' generate, side by side in one run.

Both load the same checkpoint, run with the same thread count, prompts and greedy settings, and
generate the same number of new tokens (EOS ignored). For each batch size the script prints
tokens/s for both and their ratio, the weight bytes a decode step reads over the engine's step time
(its achieved bandwidth), the machine's copy bandwidth, and the peak resident memory added by
loading the checkpoint.
With ``--quantize int8`` it also times the engine with weight-only int8 weights.

It also states the floor of a batch-1 decode step: the bytes of the weights a step reads over the
machine's read bandwidth (a 512 MB ``torch.sum``, which only reads; measured in every round of
timings, beside the steps, since it moves by a third within minutes on a shared host, and taken
as the median of those rounds), beside the engine's step time
(the time of generating N tokens less that of generating 1, over N - 1 steps: no prefill in it),
and the fraction of the floor reached. For the demo presets it prints each target of the project
(``TARGETS``) beside the measured figure and whether it holds; ``--check`` exits 1 when one misses.
``--compiled`` also times the engine with compiled decode steps (``decode_mode="compiled"``),
prints how long compiling each batch size took, and checks the targets for both modes (eager is
what the generation CLI and the CPU server run by default).

    python benchmarks/decode.py --preset demo --batch-sizes 1,16
    python benchmarks/decode.py --preset demo-150m --quantize int8
    python benchmarks/decode.py --preset demo-150m --batch-sizes 1,16
    python benchmarks/decode.py --model DIR
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

from engine.demo import default_demo_dir, ensure_demo  # noqa: E402
from engine.generate import Generator  # noqa: E402
from engine.loader import Checkpoint  # noqa: E402
from engine.quant import MODES as QUANT_MODES  # noqa: E402
from engine.request import SamplingParams  # noqa: E402

HELD_OUT = (
    "The operators of a small cluster keep one replica of the model on every node. When a node stops "
    "answering its heartbeats, the leader moves the requests it was running to the others, which "
    "prefill what was already generated and carry on from there, so that nobody notices."
)


@torch.inference_mode()
def perplexity(gen: Generator, ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ``ids`` under the model, in one forward pass."""
    from engine.kv_cache import ContiguousKVCache, make_step

    model, cfg = gen.model, gen.config
    tokens = torch.tensor([ids])
    dtype = next(model.parameters()).dtype
    cache = ContiguousKVCache(model.layer_ids, 1, len(ids), model.kv_heads, cfg.head_dim, dtype)
    step = make_step(tokens, [0], [0], gen.windows, torch.arange(len(ids)))
    logits = model.gather_logits(model(tokens, step, cache)).view(len(ids), -1)
    return torch.nn.functional.cross_entropy(logits[:-1], tokens[0, 1:]).exp().item()


# preset -> (batch -> engine / transformers tok/s at least, fraction of the batch-1 floor at least)
TARGETS: dict[str, tuple[dict[int, float], float | None]] = {
    "demo": ({1: 1.5, 16: 1.2}, None),
    "demo-150m": ({1: 1.2}, 0.9),
}


def read_bandwidth(src: torch.Tensor, repeats: int = 5) -> float:
    """Bytes read per second by a sum over ``src``, a tensor far larger than the caches (best of
    ``repeats``)."""
    src.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        src.sum()
        times.append(time.perf_counter() - t)
    return src.numel() * src.element_size() / min(times)


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes moved per second by a large tensor copy (each byte read once and written once)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / min(times)


def load_peak_rss(model_dir: str) -> tuple[int, int]:
    """(peak RSS added while loading, checkpoint bytes), measured in a fresh process."""
    # Linux: writing 5 to clear_refs resets the peak (VmHWM) to the current RSS
    code = (
        "import psutil\n"
        "from engine.generate import Generator\n"
        "def hwm():\n"
        "    line = next(x for x in open('/proc/self/status') if x.startswith('VmHWM'))\n"
        "    return int(line.split()[1]) * 1024\n"
        "base = psutil.Process().memory_info().rss\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "assert hwm() <= base * 1.02, 'peak RSS was not reset'\n"
        f"Generator.from_pretrained({model_dir!r}, with_tokenizer=False)\n"
        "print(hwm() - base)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip()), Checkpoint(model_dir).nbytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the demo preset below)")
    parser.add_argument("--preset", default="demo", help="demo preset to build when --model is not given")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--quantize", choices=QUANT_MODES, help="also time the engine with weight-only int8")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target of the preset misses")
    parser.add_argument("--compiled", action="store_true", help="also time compiled decode steps")
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the step time is that of N tokens less 1)")

    import transformers

    torch.set_num_threads(args.threads)
    if args.model:
        model_dir = args.model
    else:
        model_dir = str(ensure_demo(default_demo_dir(args.preset), args.preset))

    gen = Generator.from_pretrained(model_dir, with_tokenizer=False)
    quantized = (
        Generator.from_pretrained(model_dir, with_tokenizer=False, quantize=args.quantize)
        if args.quantize
        else None
    )
    # a model of its own: a compiled CPU decoder stores its layers' weights by rows (engine.model.Linear)
    compiled = (
        Generator.from_pretrained(model_dir, with_tokenizer=False, decode_mode="compiled")
        if args.compiled
        else None
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    params = sum(p.numel() for p in gen.model.parameters())
    # bytes a decode step reads: every weight but the embedding table, of which it gathers B rows
    weights_read = sum(
        p.numel() * p.element_size() for n, p in gen.model.named_parameters() if "embed_tokens" not in n
    )
    if gen.model.ties_embeddings:
        weights_read += gen.model.lm_head.weight.numel() * gen.model.lm_head.weight.element_size()
    read_src = torch.ones((512 << 20) // 4)  # 512 MB, read again beside every round of the steps
    copy_bw, read_bw = copy_bandwidth(), read_bandwidth(read_src)
    rss, ckpt_bytes = load_peak_rss(model_dir)
    ratio_targets, floor_target = (None, None) if args.model else TARGETS.get(args.preset, (None, None))

    print(f"model {model_dir}: {params / 1e6:.1f}M parameters, {ckpt_bytes / 2**20:.1f} MiB checkpoint")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads")
    print(
        f"machine copy bandwidth: {copy_bw / 1e9:.2f} GB/s (read + write), "
        f"read bandwidth {read_bw / 1e9:.2f} GB/s (at the start; it moves, so the floor is taken from "
        f"the read bandwidth measured beside the steps)"
    )
    print(f"a decode step reads {weights_read / 1e6:.1f} MB of weights")
    print(f"peak RSS added by loading: {rss / 2**20:.1f} MiB = {rss / ckpt_bytes:.2f}x the checkpoint")
    header = f"{'batch':>5} {'engine tok/s':>13} {'transformers tok/s':>19} {'ratio':>6} "
    header += f"{'engine weight GB/s':>19} {'engine ms/step':>15}"
    if quantized is not None:
        header += f" {args.quantize + ' tok/s':>11} {args.quantize + '/float':>11}"
    if compiled is not None:
        header += f" {'compiled tok/s':>15} {'compiled/tf':>11} {'compiled ms/step':>17}"
    if quantized is not None:
        from engine.tokenizer import load_tokenizer

        ids = load_tokenizer(model_dir).encode(HELD_OUT)
        p_float, p_quant = perplexity(gen, ids), perplexity(quantized, ids)
        print(
            f"perplexity of a held-out paragraph ({len(ids)} tokens): float {p_float:.3f}, "
            f"{args.quantize} {p_quant:.3f} ({(p_quant / p_float - 1) * 100:+.2f}%)"
        )
    print(header)

    results = []
    read_bws = []  # the read bandwidth, measured in every round of every batch size
    g = torch.Generator().manual_seed(0)
    vocab = gen.config.vocab_size
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = torch.randint(3, vocab, (batch, args.prompt_len), generator=g)
        sp = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)

        one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

        def full(engine, prompts=prompts, sp=sp):
            def run():
                out = engine.generate(prompts.tolist(), sp)
                assert all(len(o.token_ids) == args.new_tokens for o in out)

            return run

        def prefill(engine, prompts=prompts, one=one):
            return lambda: engine.generate(prompts.tolist(), one)

        def run_hf(prompts=prompts):
            with torch.inference_mode():
                out = hf.generate(
                    prompts,
                    attention_mask=torch.ones_like(prompts),
                    max_new_tokens=args.new_tokens,
                    do_sample=False,
                )
            assert out.shape[1] == args.prompt_len + args.new_tokens

        # "<name>1" generates one token: its time less that of "<name>" is the decode steps'
        runs = [("engine", full(gen)), ("engine1", prefill(gen)), ("hf", run_hf)]
        runs += [("quant", full(quantized))] if quantized else []
        if compiled is not None:
            runs += [("compiled", full(compiled)), ("compiled1", prefill(compiled))]
        times = {name: [] for name, _ in runs}
        warm = {}
        for name, fn in runs:
            t = time.perf_counter()
            fn()  # warm-up (compiled: compiles this batch size's decode step)
            warm[name] = time.perf_counter() - t
        for _ in range(args.repeats):
            for name, fn in runs:
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
            read_bws.append(read_bandwidth(read_src, repeats=3))
        tokens = batch * args.new_tokens
        ours = tokens / statistics.median(times["engine"])
        theirs = tokens / statistics.median(times["hf"])

        def step_seconds(name: str, times=times) -> float:
            return (statistics.median(times[name]) - statistics.median(times[name + "1"])) / (
                args.new_tokens - 1
            )

        step_s = step_seconds("engine")
        bw = weights_read / step_s
        line = f"{batch:>5} {ours:>13.1f} {theirs:>19.1f} {ours / theirs:>5.2f}x {bw / 1e9:>19.2f}"
        line += f" {step_s * 1e3:>15.2f}"
        result = {
            "batch": batch,
            "engine_tok_s": ours,
            "transformers_tok_s": theirs,
            "engine_step_ms": step_s * 1e3,
            "weight_read_gb_s": bw / 1e9,
        }
        if quantized is not None:
            q = tokens / statistics.median(times["quant"])
            line += f" {q:>11.1f} {q / ours:>10.2f}x"
            result[f"{args.quantize}_tok_s"] = q
        if compiled is not None:
            c = tokens / statistics.median(times["compiled"])
            c_step = step_seconds("compiled")
            line += f" {c:>15.1f} {c / theirs:>10.2f}x {c_step * 1e3:>17.2f}"
            result.update(compiled_tok_s=c, compiled_step_ms=c_step * 1e3, compile_s=warm["compiled"])
        print(line)
        results.append(result)

    read_bw = statistics.median(read_bws)
    floor_ms = weights_read / read_bw * 1e3
    print(
        f"read bandwidth beside the steps: median {read_bw / 1e9:.2f} GB/s over {len(read_bws)} rounds "
        f"({min(read_bws) / 1e9:.2f} to {max(read_bws) / 1e9:.2f}): floor of a step {floor_ms:.2f} ms"
    )
    if compiled is not None:
        print(
            "first call of each batch size, compiling its decode step included: "
            + ", ".join(f"batch {r['batch']} {r['compile_s']:.1f} s" for r in results)
        )
    modes = [("engine", "eager")] + ([("compiled", "compiled")] if compiled is not None else [])
    first = next((r for r in results if r["batch"] == 1), None)
    if first is not None:
        steps = "; ".join(
            f"{label} {first[f'{key}_step_ms']:.2f} ms, {floor_ms / first[f'{key}_step_ms']:.0%} of it"
            for key, label in modes
        )
        print(f"batch-1 step against the floor of {floor_ms:.2f} ms: {steps}")
    checks = []  # (what, target, measured, holds)
    for key, label in modes:
        for r in results:
            if ratio_targets and r["batch"] in ratio_targets:
                ratio = r[f"{key}_tok_s"] / r["transformers_tok_s"]
                goal = ratio_targets[r["batch"]]
                what = f"{label}, batch {r['batch']}: / transformers"
                checks.append((what, f">= {goal:.2f}x", f"{ratio:.2f}x", ratio >= goal))
        if floor_target is not None and first is not None:
            frac = floor_ms / first[f"{key}_step_ms"]
            what = f"{label}, batch 1: of the floor"
            checks.append((what, f">= {floor_target:.0%}", f"{frac:.0%}", frac >= floor_target))
    if quantized is not None:
        for r in results:
            ratio = r[f"{args.quantize}_tok_s"] / r["engine_tok_s"]
            what = f"eager, batch {r['batch']}: {args.quantize} / float"
            checks.append((what, "> 1.00x", f"{ratio:.2f}x", ratio > 1))
    if checks:
        print(f"targets of preset {args.preset}:")
        for what, goal, got, holds in checks:
            print(f"  {what:<36} target {goal:>8}  measured {got:>6}  {'holds' if holds else 'MISSES'}")
        for _, label in modes:
            mine = [c for c in checks if c[0].startswith(label + ",")]
            if mine:
                print(f"  {label}: {sum(c[3] for c in mine)} of {len(mine)} targets hold")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "model": model_dir,
                    "params": params,
                    "copy_bw_gb_s": copy_bw / 1e9,
                    "read_bw_gb_s": read_bw / 1e9,
                    "read_bw_rounds_gb_s": [b / 1e9 for b in read_bws],
                    "floor_ms": floor_ms,
                    "targets": [dict(zip(("what", "target", "measured", "holds"), c)) for c in checks],
                    "load_rss_ratio": rss / ckpt_bytes,
                    "results": results,
                },
                indent=2,
            )
        )
    return 1 if args.check and not all(c[3] for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
