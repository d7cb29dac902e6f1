"""Decode throughput with a JSON-schema constraint against none, at batch 1 and 16, in one run.

Each case runs ``batch`` sequences of the same prompt for ``--tokens`` decode steps; the schema (an
array of at least 1000 small objects) cannot end sooner, so every row decodes every step and the
figures differ only by the cost of the constraint: the token masks (computed on a worker thread
while the forward pass runs) and their application before sampling. Decode tokens/s counts the
steps after the prefill.

    python benchmarks/structured.py                      # the demo model, CPU or the GPU
    python benchmarks/structured.py --model DIR --device cuda --decode-mode compiled
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.compiled import MODES, resolve_decode_mode  # noqa: E402
from engine.demo import ensure_demo  # noqa: E402
from engine.request import SamplingParams  # noqa: E402
from engine.scheduler import Engine  # noqa: E402
from engine.structured import grammar_from  # noqa: E402

SCHEMA = {
    "type": "array",
    "minItems": 1000,
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 9999},
            "name": {"type": "string", "maxLength": 12},
            "kind": {"enum": ["user", "admin", "guest"]},
            "active": {"type": "boolean"},
        },
        "required": ["id", "name", "kind", "active"],
        "additionalProperties": False,
    },
}


def decode_rate(engine: Engine, prompt: list[int], batch: int, tokens: int, grammar: str | None) -> float:
    """Decode tokens/s of ``batch`` rows over ``tokens`` steps (the prefill step not counted)."""
    for i in range(batch):
        params = SamplingParams(max_tokens=tokens + 1, temperature=1.0, seed=i, grammar=grammar)
        engine.add_request(f"r{i}", prompt, params, 0)
    engine.step()  # the prefill, and each row's first token
    if engine.executor.device.type == "cuda":
        torch.cuda.synchronize()
    t0, steps = time.perf_counter(), 0
    while engine.has_work():
        outputs = engine.step()
        steps += 1
        assert len(outputs) == batch and all(o.finish_reason in (None, "length") for o in outputs)
    return batch * steps / (time.perf_counter() - t0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--decode-mode", choices=MODES, default="auto")
    parser.add_argument("--tokens", type=int, default=128, help="decode steps per case")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per case; the median counts")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args(argv)
    model_dir = args.model or ensure_demo()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mode = resolve_decode_mode(args.decode_mode, device)
    engine = Engine.from_pretrained(
        model_dir, device=device, kv_cache_mib=256, max_running=max(args.batches), decode_mode=mode
    )
    engine.warm_up()
    prompt = engine.tokenizer.encode("Write the users as JSON:")
    grammar = grammar_from("json", SCHEMA, "schema")
    engine.structured.check(grammar)
    print(f"model {model_dir}, {device}, decode {mode}, {args.tokens} decode steps, median of {args.repeats}")
    print(f"{'batch':>5} {'none tok/s':>11} {'schema tok/s':>13} {'slower':>7}")
    for batch in args.batches:
        decode_rate(engine, prompt, batch, 8, grammar)  # warm: the matchers' first masks, the caches
        runs: dict[str, list[float]] = {"none": [], "schema": []}
        for _ in range(args.repeats):  # interleaved, so that a noisy neighbour hits both alike
            for name, g in (("none", None), ("schema", grammar)):
                runs[name].append(decode_rate(engine, prompt, batch, args.tokens, g))
        rates = {name: statistics.median(r) for name, r in runs.items()}
        slower = 1 - rates["schema"] / rates["none"]
        print(f"{batch:>5} {rates['none']:>11.1f} {rates['schema']:>13.1f} {slower:>7.1%}")


if __name__ == "__main__":
    main()
