"""Command line: ``ringleader generate`` (also ``./launch.sh generate``) and ``ringleader demo``.

    ringleader generate [--model DIR] (--prompt TEXT | --prompt-ids 1,2,3) [--max-tokens N]
                        [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop STR ...]
                        [--json]

Without ``--model`` it generates with the demo checkpoint (built on first use). With ``--json`` it
prints one JSON object: token_ids (generated ids only), text, finish_reason, prompt_token_ids,
seed, usage. Bad input ends with one line on stderr naming what was wrong and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from engine.errors import RingleaderError

EXIT_USAGE = 2


def _ids(value: str) -> list[int]:
    try:
        ids = [int(x) for x in value.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringleader", description="ringleader inference runtime")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    gen.add_argument("--model", help="Hugging Face checkpoint directory (default: the demo checkpoint)")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", type=_ids, help="prompt as comma-separated token ids")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="0 means no limit")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--stop-token-ids", type=_ids, default=[], help="comma-separated token ids")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    gen.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token to --prompt")
    gen.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    gen.add_argument("--threads", type=int, default=None, help="intra-op CPU threads")
    gen.add_argument("--json", action="store_true", help="print one JSON object")

    sub.add_parser("info", help="print this host's CPUs, memory and GPUs as JSON")

    demo = sub.add_parser("demo", help="build the demo checkpoint and print its path")
    demo.add_argument("path", nargs="?")
    demo.add_argument("--force", action="store_true")
    return parser


def _generate(args) -> int:
    import torch

    from engine.config import DTYPES, ModelConfig
    from engine.demo import ensure_demo
    from engine.generate import Generator, SamplingParams, check_request
    from engine.tokenizer import Tokenizer

    if args.threads is not None:
        if args.threads < 1:
            raise RingleaderError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RingleaderError(f"--device {device}: CUDA is not available on this machine")
    model_dir = args.model or str(ensure_demo())
    # everything that can be wrong with the request is checked before the weights are read
    config = ModelConfig.from_hf(model_dir)
    tokenizer = Tokenizer(model_dir)
    if args.prompt is not None:
        prompt = tokenizer.encode(args.prompt, add_bos=False if args.no_bos else None)
    else:
        prompt = args.prompt_ids
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        stop_token_ids=args.stop_token_ids,
        ignore_eos=args.ignore_eos,
    )
    check_request(prompt, params, config.vocab_size, config.max_position_embeddings)
    t0 = time.perf_counter()
    gen = Generator.from_pretrained(
        model_dir,
        device=device,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        progress=not args.json,
    )
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    (out,) = gen.generate([prompt], params)
    gen_s = time.perf_counter() - t1
    if args.json:
        record = {
            "model": os.path.abspath(model_dir),
            "prompt_token_ids": out.prompt_ids,
            "token_ids": out.token_ids,
            "text": out.text,
            "finish_reason": out.finish_reason,
            "seed": out.seed,
            "usage": {
                "prompt_tokens": len(out.prompt_ids),
                "completion_tokens": len(out.token_ids),
                "total_tokens": len(out.prompt_ids) + len(out.token_ids),
            },
            "timing": {"load_s": round(load_s, 4), "generate_s": round(gen_s, 4)},
        }
        print(json.dumps(record, ensure_ascii=False))
    else:
        print(out.text)
        rate = len(out.token_ids) / gen_s if gen_s > 0 else float("inf")
        print(
            f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}, {rate:.1f} tokens/s, "
            f"load {load_s:.2f}s]",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "info":
            from engine.hardware import describe

            print(json.dumps(describe(), indent=2))
            return 0
        from engine.demo import build_demo, default_demo_dir, ensure_demo

        print(build_demo(args.path or default_demo_dir()) if args.force else ensure_demo(args.path))
        return 0
    except RingleaderError as e:
        print(f"ringleader: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
