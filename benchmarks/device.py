"""Decode on one accelerator against its memory bandwidth, and against transformers, in one run.

Builds a random-weight Llama-architecture checkpoint in Hugging Face format on the machine itself
(no downloads): ``1b`` (Llama-3.2-1B's shape, 1.2B parameters), ``7b`` (Llama-2-7B's shape, 6.7B)
or ``tiny`` (for a smoke run on a CPU). Then, side by side:

- the device's copy bandwidth (a 1 GiB copy, bytes read plus written, best of 5);
- batch-1 decode tokens/s of the serving engine (paged cache, continuous batching) with bf16
  weights and with weight-only int8, each with compiled decode steps (CUDA graphs) and eager
  ones, and the bandwidth each achieves: the bytes one decode step reads (every weight but the
  embedding table, plus the KV cache so far) times the steps, over the time;
- throughput at batch 32 and 64;
- the time to first token of a ``--prefill-len`` prompt (one prefill step and its sampled token),
  and the matmul flop rate it reached (2 flops per weight and token, plus attention's);
- transformers' ``generate`` (greedy, its default cache, SDPA attention) on the same checkpoint,
  on the same prompts, and how many of each row's greedy tokens the engine's configurations share
  with it before their first difference (a check that the device's path computes the model).

A configuration that fails (a kernel this torch lacks on the device, say) is reported with its
error and the run goes on; ``--json`` is rewritten after every row, so a run stopped at a time
limit keeps what it measured.

    python benchmarks/device.py --size 7b            # on a GPU: the figures of BENCHMARKS.md
    python benchmarks/device.py --size 1b --batch-sizes 1,32,64
    python benchmarks/device.py --size tiny --device cpu --dtype float32   # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.request import SamplingParams  # noqa: E402
from engine.scheduler import Engine  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=1024),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}  # fmt: skip
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_checkpoint(path: Path, size: str, dtype: torch.dtype, device: torch.device) -> Path:
    """A Llama checkpoint with random weights (normal, std 0.02; norms 1) in ``path``."""
    from safetensors.torch import save_file

    shape = SHAPES[size]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **shape,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    marker = path / "config.json"
    if marker.is_file() and json.loads(marker.read_text()) == config:
        return path
    path.mkdir(parents=True, exist_ok=True)
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    d = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*dims):
        return (torch.randn(*dims, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()

    ends = {"model.embed_tokens.weight": rand(v, h), "lm_head.weight": rand(v, h)}
    shards: list[dict[str, torch.Tensor]] = [{**ends, "model.norm.weight": torch.ones(h, dtype=dtype)}]
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shards.append(
            {
                p + "self_attn.q_proj.weight": rand(h, h),
                p + "self_attn.k_proj.weight": rand(kv, h),
                p + "self_attn.v_proj.weight": rand(kv, h),
                p + "self_attn.o_proj.weight": rand(h, h),
                p + "mlp.gate_proj.weight": rand(i, h),
                p + "mlp.up_proj.weight": rand(i, h),
                p + "mlp.down_proj.weight": rand(h, i),
                p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
            }
        )
    weight_map = {}
    for n, tensors in enumerate(shards):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    marker.write_text(json.dumps(config))
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def step_bytes(model, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Bytes one decode step reads on average: the weights (not the embedding table) and the
    KV cache of every sequence, at its mean length during the run."""
    weights = sum(
        b.numel() * b.element_size()
        for n, b in [*model.named_parameters(), *model.named_buffers()]
        if "embed_tokens" not in n and "rotary" not in n
    )
    cfg = model.config
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * next(model.parameters()).element_size()
    return weights + batch * per_token * (prompt_len + new_tokens / 2)


def build_engine(model_dir, args, device, dtype, quantize, mode, max_batch) -> Engine:
    """A serving engine with room for ``max_batch`` sequences of the run's length, whose prefills
    go in one step."""
    from engine.config import ModelConfig

    cfg = ModelConfig.from_hf(model_dir)
    max_len = max(args.prompt_len + args.new_tokens, args.prefill_len) + 16
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
    kv_mib = -(-(max_batch + 1) * (max_len + 16) * per_token // (1 << 20))
    return Engine.from_pretrained(
        model_dir, device=device, dtype=dtype, max_len=max_len, kv_cache_mib=kv_mib, quantize=quantize,
        decode_mode=mode, max_running=max_batch,
        max_batched_tokens=max(max_batch * args.prompt_len, args.prefill_len),  # a prefill in one step
    )  # fmt: skip


def prefill_flops(model, tokens: int) -> float:
    """Flops of one prefill of ``tokens``: 2 per weight (not the embedding table) and token, and
    causal attention's two products (q.k and p.v) over half the square of the prompt."""
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    weights += sum(b.numel() for n, b in model.named_buffers() if "qweight" in n)  # int8 projections
    cfg = model.config
    attention = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * tokens * tokens / 2
    return 2 * weights * tokens + attention


def run_engine(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Every prompt through the engine at once; each row's generated tokens."""
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    while engine.has_work():
        for o in engine.step():
            out[o.request_id] += o.token_ids
    return [out[str(i)] for i in range(len(prompts))]


def agreement(ours: list[list[int]], ref: list[list[int]]) -> float:
    """The mean, over rows, of the tokens two greedy runs share before their first difference."""
    lead = []
    for a, b in zip(ours, ref, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        lead.append(n)
    return statistics.mean(lead)


def time_it(fn, device, repeats: int):
    """The median seconds of ``repeats`` calls after a first one (which compiles what it needs, in
    compiled mode), the last call's result, and the first call's seconds."""
    sync(device)
    t = time.perf_counter()
    result = fn()
    sync(device)
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), result, first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="7b")
    parser.add_argument(
        "--dir", default=None, help="where the checkpoint goes (default: ~/.cache/ringleader)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--batch-sizes", default="1,32,64")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-len", type=int, default=2048, help="the TTFT prompt's length (0: none)")
    parser.add_argument(
        "--modes", default=None, help="decode modes (default: compiled,eager on a GPU, eager on a CPU)"
    )
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    home = Path(args.dir or Path(os.environ.get("RINGLEADER_HOME", Path.home() / ".cache" / "ringleader")))
    t0 = time.perf_counter()
    model_dir = build_checkpoint(home / f"random-llama-{args.size}-{args.dtype}", args.size, dtype, device)
    print(f"checkpoint {model_dir} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    print(f"{command}\n{datetime.date.today()}, {name}, torch {torch.__version__}")
    print(f"device copy bandwidth: {bw / 1e9:.1f} GB/s (read + write)")

    batches = [int(b) for b in args.batch_sizes.split(",")]
    modes = (args.modes or ("compiled,eager" if device.type == "cuda" else "eager")).split(",")
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(3, vocab, (b, args.prompt_len), generator=g).tolist() for b in batches}
    rows: list[dict] = []
    tokens: dict[tuple[str, int], list[list[int]]] = {}  # (runtime, batch) -> each row's greedy tokens

    def save() -> None:
        if args.json:
            run = {"command": command, "device": name, "torch": torch.__version__, "copy_bw_gb_s": bw / 1e9}
            Path(args.json).write_text(json.dumps({**run, "rows": rows}, indent=2))

    def report(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()

    def failed(label: str, batch: int | None, e: BaseException) -> None:
        traceback.print_exc()
        report({"runtime": label, "batch": batch, "tok_s": None, "gb_s": None, "of_copy_bw": None,
                "error": f"{type(e).__name__}: {e}"[:500]})  # fmt: skip

    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    for quantize in (None, "int8"):
        for mode in modes:
            label = f"engine {quantize or args.dtype}, {mode}"
            try:  # no warm-up of every batch size: each run's first call compiles the one it uses
                engine = build_engine(model_dir, args, device, dtype, quantize, mode, max(batches))
            except Exception as e:  # noqa: BLE001 - reported, and the other configurations run
                failed(label, None, e)
                continue
            model = engine.executor.model
            for batch in batches:
                try:
                    seconds, out, first = time_it(lambda e=engine, p=prompts[batch]: run_engine(e, p, params),
                                                  device, args.repeats)  # fmt: skip
                except Exception as e:  # noqa: BLE001
                    failed(label, batch, e)
                    continue
                took = f"first run {first:.1f} s (compiling included), then {seconds:.2f} s"
                print(f"{label}, batch {batch}: {took}", flush=True)
                tokens[label, batch] = out
                read = step_bytes(model, batch, args.prompt_len, args.new_tokens)
                achieved = read * args.new_tokens / seconds
                report({"runtime": label, "batch": batch, "tok_s": batch * args.new_tokens / seconds,
                        "gb_s": achieved / 1e9, "of_copy_bw": achieved / bw})  # fmt: skip
            if args.prefill_len and mode == modes[0]:  # prefills run eager in every mode
                ttft_prompts = iter(
                    torch.randint(3, vocab, (args.repeats + 1, 1, args.prefill_len), generator=g).tolist()
                )
                one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
                try:  # a new prompt each time: none of it is in the prefix cache
                    seconds, _, _ = time_it(
                        lambda e=engine, it=ttft_prompts, p=one: run_engine(e, next(it), p),
                        device,
                        args.repeats,
                    )
                except Exception as e:  # noqa: BLE001
                    failed(label + ", prefill", 1, e)
                else:
                    flops = prefill_flops(model, args.prefill_len)
                    report({"runtime": label + ", prefill", "batch": 1, "prompt_tokens": args.prefill_len,
                            "ttft_ms": seconds * 1e3, "tflops": flops / seconds / 1e12})  # fmt: skip
            del engine, model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if not args.no_transformers:
        import transformers

        label = "transformers " + args.dtype
        try:
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=dtype, attn_implementation="sdpa"
            )
            hf = hf.to(device).eval()
            hf.generation_config.eos_token_id = None
            hf.generation_config.pad_token_id = 0
        except Exception as e:  # noqa: BLE001
            failed(label, None, e)
            hf = None
        for batch in batches if hf is not None else []:
            ids = torch.tensor(prompts[batch], device=device)

            def run(ids=ids):
                with torch.inference_mode():
                    n = args.new_tokens
                    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False)  # fmt: skip
                    return out[:, ids.shape[1] :].tolist()

            try:
                seconds, out, _ = time_it(run, device, args.repeats)
            except Exception as e:  # noqa: BLE001
                failed(label, batch, e)
                continue
            tokens[label, batch] = out
            report({"runtime": label, "batch": batch, "tok_s": batch * args.new_tokens / seconds,
                    "gb_s": None, "of_copy_bw": None})  # fmt: skip
        for r in rows:
            ref = tokens.get((label, r["batch"]))
            if r["runtime"].startswith("engine") and (r["runtime"], r["batch"]) in tokens and ref is not None:
                r["greedy_agreement"] = agreement(tokens[r["runtime"], r["batch"]], ref)
        save()
    agree = f"greedy tokens as transformers' (of {args.new_tokens})"
    print(f"\n| runtime | batch | tok/s | achieved GB/s | of copy bandwidth | {agree} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "ttft_ms" in r:
            continue
        if r.get("error"):
            print(f"| {r['runtime']} | {r['batch'] or ''} | failed: {r['error'][:120]} | | | |")
            continue
        gb = f"{r['gb_s']:.1f}" if r["gb_s"] is not None else ""
        share = f"{r['of_copy_bw'] * 100:.0f}%" if r["of_copy_bw"] is not None else ""
        agree = f"{r['greedy_agreement']:.1f}" if "greedy_agreement" in r else ""
        print(f"| {r['runtime']} | {r['batch']} | {r['tok_s']:.1f} | {gb} | {share} | {agree} |")
    prefills = [r for r in rows if "ttft_ms" in r]
    if prefills:
        print("\n| runtime | prompt tokens | time to first token, ms | matmul TFLOP/s |")
        print("| --- | ---: | ---: | ---: |")
        for r in prefills:
            print(f"| {r['runtime']} | {r['prompt_tokens']} | {r['ttft_ms']:.1f} | {r['tflops']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
