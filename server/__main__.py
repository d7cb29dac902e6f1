"""``python -m server`` (``./launch.sh serve``): the OpenAI-compatible server on one process.

    ./launch.sh serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                      [--kv-cache-mib 512] [--block-size 16] [--max-running 64]
                      [--max-batched-tokens 512] [--max-queue 256]

Without ``--model`` it serves the demo checkpoint. The API key may also come from
RINGLEADER_API_KEY. Bad flags or checkpoints end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ringleader serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the demo checkpoint)")
    parser.add_argument("--served-model-name", default=None, help="the model id clients use")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("RINGLEADER_API_KEY"))
    parser.add_argument("--kv-cache-mib", type=int, default=512, help="memory for the paged KV cache")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-running", type=int, default=64)
    parser.add_argument("--max-batched-tokens", type=int, default=512)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=None, help="context length (default: the model's)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    from engine.errors import RingleaderError

    try:
        return _serve(args)
    except RingleaderError as e:
        print(f"ringleader: error: {e}", file=sys.stderr)
        return 2


def _serve(args) -> int:
    import torch
    from aiohttp import web

    from engine.config import DTYPES
    from engine.demo import ensure_demo
    from engine.errors import RingleaderError
    from engine.generate import Generator
    from engine.kv_cache import PagedKVCache
    from engine.scheduler import Engine
    from server.app import ServerConfig, create_app

    for flag in ("port", "kv_cache_mib", "block_size", "max_running", "max_batched_tokens", "max_queue"):
        if getattr(args, flag) < 1:
            raise RingleaderError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = args.model or str(ensure_demo())
    dtype = DTYPES[args.dtype] if args.dtype else None
    gen = Generator.from_pretrained(
        model_dir, device=device, dtype=dtype, max_len=args.max_len, progress=True
    )
    if gen.tokenizer is None:
        raise RingleaderError(f"{model_dir}: serving needs a tokenizer.model")
    model, cfg = gen.model, gen.config
    param_dtype = next(model.parameters()).dtype
    blocks = PagedKVCache.blocks_for_budget(
        args.kv_cache_mib << 20,
        len(model.layer_ids),
        args.block_size,
        model.kv_heads,
        cfg.head_dim,
        param_dtype,
    )
    if blocks < 2:
        raise RingleaderError(
            f"--kv-cache-mib {args.kv_cache_mib} holds fewer than 2 blocks of {args.block_size} tokens"
        )
    cache = PagedKVCache(
        model.layer_ids, blocks, args.block_size, model.kv_heads, cfg.head_dim, param_dtype, device
    )
    engine = Engine(model, cache, gen.tokenizer, device, args.max_running, args.max_batched_tokens)
    name = args.served_model_name or Path(model_dir).name
    print(
        f"ringleader: serving {name!r} on http://{args.host}:{args.port}; KV cache {blocks - 1} blocks "
        f"of {args.block_size} tokens ({(blocks - 1) * args.block_size} tokens, "
        f"{cache.nbytes() / 2**20:.0f} MiB)",
        file=sys.stderr,
        flush=True,
    )
    config = ServerConfig(model_name=name, api_key=args.api_key, max_queue=args.max_queue)
    web.run_app(create_app(engine, config), host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
