"""Command line: ``ringleader generate`` (also ``./launch.sh generate``), ``ringleader info`` and
``ringleader demo``.

    ringleader generate [--model DIR] (--prompt TEXT | --prompt-ids 1,2,3) [--max-tokens N]
                        [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop STR ...]
                        [--dtype auto|float32|bfloat16|float16] [--json]
    ringleader info [--model DIR]

``info`` prints the host's CPUs, memory and GPUs as JSON, or with ``--model`` what was detected in
a checkpoint directory (``describe_checkpoint``).

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

from comm.cost import ALGORITHMS
from comm.layout import LayoutError
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
    from engine.quant import MODES as QUANT_MODES

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
    add_dtype_flag(gen)
    gen.add_argument("--quantize", choices=QUANT_MODES, default=None, help="weight-only quantization at load")
    gen.add_argument("--threads", type=int, default=None, help="intra-op CPU threads")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    add_parallel_flags(gen)

    info = sub.add_parser(
        "info", help="print this host's CPUs, memory and GPUs as JSON; with --model, what the checkpoint is"
    )
    info.add_argument("--model", help="describe this checkpoint directory instead of the host")

    demo = sub.add_parser("demo", help="build the demo checkpoint and print its path")
    demo.add_argument("path", nargs="?")
    demo.add_argument("--force", action="store_true")
    return parser


def add_dtype_flag(parser: argparse.ArgumentParser) -> None:
    """``--dtype``, shared by ``generate`` and ``serve`` (``engine.config.resolve_dtype``)."""
    from engine.config import DTYPE_CHOICES

    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="compute dtype; auto: the checkpoint's on a GPU, float32 on a CPU (default)",
    )


def add_parallel_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that place a replica on ranks, shared by ``generate`` and ``serve``."""
    par = parser.add_argument_group("parallelism (started through torchrun when tp x pp > 1)")
    par.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage")
    par.add_argument("--pp", type=int, default=1, help="pipeline stages")
    par.add_argument("--stage-layers", type=_ids, default=None, help="layers per stage, e.g. 10,14")
    par.add_argument("--timeout", type=float, default=60.0, help="seconds before a silent peer is an error")
    par.add_argument(
        "--allreduce",
        choices=ALGORITHMS,
        default="native",
        help="tensor-parallel all-reduce: the backend's own (native), a topology, or auto by size",
    )
    par.add_argument("--nnodes", type=int, default=1)
    par.add_argument("--nproc-per-node", type=int, default=None)
    par.add_argument("--node-rank", type=int, default=None)
    par.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the rendezvous (multi-node)")
    par.add_argument("--rdzv-id", default="ringleader", help="job id shared by all nodes")


def launched_as_rank(layout, nnodes: int) -> bool:
    """True in a process that is already one rank: started by torchrun, or by srun with one task
    per rank (srun with one task per node runs launch.sh, which starts torchrun)."""
    if "RANK" in os.environ:
        return True
    ntasks = int(os.environ.get("SLURM_NTASKS", "0") or 0)
    return "SLURM_PROCID" in os.environ and nnodes == 1 and ntasks == layout.world_size > 1


def _generate(args) -> int:
    import torch

    from comm.layout import ParallelLayout
    from engine.config import ModelConfig
    from engine.demo import ensure_demo
    from engine.replica import check_layout
    from engine.request import SamplingParams, check_request
    from engine.tokenizer import has_tokenizer, load_tokenizer

    if args.threads is not None:
        if args.threads < 1:
            raise RingleaderError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RingleaderError(f"--device {args.device}: CUDA is not available on this machine")
    layout = ParallelLayout(tp=args.tp, pp=args.pp, stage_layers=tuple(args.stage_layers or ()))
    as_rank = launched_as_rank(layout, args.nnodes)
    distributed = layout.world_size > 1 or args.nnodes > 1 or as_rank
    model_dir = args.model or str(ensure_demo())
    # everything that can be wrong with the request is checked before any weight is read or any
    # process is started
    config = ModelConfig.from_hf(model_dir)
    check_layout(layout, config)
    # token-id prompts run without a tokenizer; the output then has no text
    with_tokenizer = args.prompt is not None or has_tokenizer(model_dir)
    tokenizer = load_tokenizer(model_dir, config.vocab_size) if with_tokenizer else None
    if args.prompt is not None:
        prompt = tokenizer.encode(args.prompt, add_special_tokens=not args.no_bos)
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
    if distributed and not as_rank:
        return exec_torchrun(args, layout, "engine.cli")
    if distributed:
        return _run_rank(args, layout, model_dir, prompt, params)
    return _run_single(args, model_dir, config, tokenizer, prompt, params)


def exec_torchrun(args, layout, module: str, argv: list[str] | None = None) -> int:
    """Replace this process by torchrun starting ``python -m module`` with this command's
    arguments (or ``argv``) on every local rank."""
    if args.nnodes < 1 or layout.world_size % args.nnodes:
        raise RingleaderError(
            f"--nnodes {args.nnodes} does not divide the {layout.world_size} ranks of the layout"
        )
    nproc = args.nproc_per_node or layout.world_size // args.nnodes
    if nproc * args.nnodes != layout.world_size:
        raise RingleaderError(
            f"--nnodes {args.nnodes} x --nproc-per-node {nproc} is not the layout's "
            f"tp x pp = {layout.world_size} ranks"
        )
    cmd = [sys.executable, "-m", "comm.launcher", "--nnodes", str(args.nnodes)]
    # a rank that loses a peer notices within milliseconds (a reset connection) and exits with its
    # own message; torchrun checks on its workers every 2 s and then stops whoever is left
    cmd += ["--nproc-per-node", str(nproc), "--max-restarts", "0", "--monitor-interval", "2"]
    if args.rdzv_endpoint:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", args.rdzv_id]
        if args.node_rank is not None:
            cmd += ["--node-rank", str(args.node_rank)]
    elif args.nnodes > 1:
        raise RingleaderError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    else:
        cmd += ["--standalone"]
    cmd += ["-m", module, *(sys.argv[1:] if argv is None else argv)]
    sys.stdout.flush()
    os.execv(sys.executable, cmd)
    return 1  # not reached


def _run_rank(args, layout, model_dir, prompt, params) -> int:
    """One rank of a tp x pp replica: the head generates and prints, the others follow it."""
    import torch
    import torch.distributed as dist

    from comm.dist import DistEnv, env_from, exit_lost_replica, exit_with_launcher, init
    from engine.config import ModelConfig, resolve_dtype
    from engine.replica import load_stage, make_groups

    env: DistEnv = env_from()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        exit_with_launcher(env.rank)
    try:
        env, device = init(
            env, timeout_s=args.timeout, device=torch.device(args.device) if args.device else None
        )
        per_node = min(layout.tp, env.local_world_size)
        tp = make_groups(layout, env.rank, args.timeout, args.allreduce, per_node)
        t0 = time.perf_counter()
        replica = load_stage(
            model_dir,
            layout,
            env,
            tp,
            device,
            resolve_dtype(args.dtype, ModelConfig.from_hf(model_dir), device),
            progress=not args.json,
            quantize=args.quantize,
        )
        load_s = time.perf_counter() - t0
        if replica.is_head:
            gen = replica.generator()
            t1 = time.perf_counter()
            (out,) = gen.generate([prompt], params)
            gen_s = time.perf_counter() - t1
            gen.close()
            _print_result(args, out, model_dir, load_s, gen_s, layout)
        else:
            replica.follow()
        dist.destroy_process_group()
    except RuntimeError as e:  # torch.distributed's errors: a peer died, hung past the timeout, ...
        exit_lost_replica(env.rank, e)
    return 0


def _run_single(args, model_dir, config, tokenizer, prompt, params) -> int:
    import torch

    from engine.config import default_device, resolve_dtype
    from engine.generate import Generator
    from engine.loader import Checkpoint, build_model

    device = torch.device(args.device) if args.device else default_device()
    t0 = time.perf_counter()
    dtype = resolve_dtype(args.dtype, config, device)
    model = build_model(
        config, Checkpoint(model_dir), device, dtype, progress=not args.json, quantize=args.quantize
    )
    gen = Generator(model, tokenizer, device)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    (out,) = gen.generate([prompt], params)
    gen_s = time.perf_counter() - t1
    _print_result(args, out, model_dir, load_s, gen_s, None)
    return 0


def _print_result(args, out, model_dir, load_s, gen_s, layout) -> None:
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
            "parallel": {
                "tp": layout.tp if layout else 1,
                "pp": layout.pp if layout else 1,
                "allreduce": args.allreduce,
            },
            "timing": {"load_s": round(load_s, 4), "generate_s": round(gen_s, 4)},
        }
        print(json.dumps(record, ensure_ascii=False), flush=True)
    else:
        print(out.text if out.text is not None else out.token_ids, flush=True)
        rate = len(out.token_ids) / gen_s if gen_s > 0 else float("inf")
        print(
            f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}, {rate:.1f} tokens/s, "
            f"load {load_s:.2f}s]",
            file=sys.stderr,
        )


def describe_checkpoint(model_dir: str) -> dict:
    """What ``info --model`` prints: what was detected in a checkpoint directory, read from its
    JSON files and safetensors headers (no tensor is loaded)."""
    import collections
    import math

    from engine.config import GenerationConfig, ModelConfig, default_device, resolve_dtype
    from engine.loader import Checkpoint
    from engine.tokenizer import has_tokenizer, load_tokenizer

    config = ModelConfig.from_hf(model_dir)
    generation = GenerationConfig.from_hf(model_dir)
    checkpoint = Checkpoint(model_dir)
    tokenizer = load_tokenizer(model_dir, config.vocab_size) if has_tokenizer(model_dir) else None
    device = default_device()
    files: dict = {}
    for info in checkpoint.tensors.values():
        entry = files.setdefault(info.path.name, {"file": info.path.name, "tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += info.nbytes
        dtypes = entry.setdefault("dtypes", {})
        dtypes[_dtype_name(info.dtype)] = dtypes.get(_dtype_name(info.dtype), 0) + 1
    windows = collections.Counter(w for w in config.sliding_windows if w is not None)
    return {
        "model": os.path.abspath(model_dir),
        "architecture": config.architecture,
        "config_dtype": _dtype_name(config.dtype),
        "auto_dtype": {"device": str(device), "dtype": _dtype_name(resolve_dtype("auto", config, device))},
        "parameters": config.param_count(),
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "rope": {
            "type": config.rope_type,
            "theta": config.rope_theta,
            "rotary_dim": config.rotary_dim,
            **({"scaling": config.rope_scaling} if config.rope_scaling else {}),
        },
        "sliding_windows": {
            "full_attention_layers": config.sliding_windows.count(None),
            "sliding_attention_layers": {str(w): n for w, n in sorted(windows.items())},
        },
        "tie_word_embeddings": config.tie_word_embeddings,
        "weights": {
            "files": [files[name] for name in sorted(files)],
            "tensors": len(checkpoint.tensors),
            "parameters": sum(math.prod(t.shape) for t in checkpoint.tensors.values()),
            "bytes": checkpoint.nbytes(),
        },
        "bos_token_id": config.bos_token_id,
        "stop_token_ids": config.eos_token_ids,
        "generation_defaults": generation.defaults,
        "tokenizer": tokenizer.describe() if tokenizer is not None else None,
    }


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "info":
            from engine.hardware import describe

            print(json.dumps(describe_checkpoint(args.model) if args.model else describe(), indent=2))
            return 0
        from engine.demo import build_demo, default_demo_dir, ensure_demo

        print(build_demo(args.path or default_demo_dir()) if args.force else ensure_demo(args.path))
        return 0
    except (RingleaderError, LayoutError) as e:
        print(f"ringleader: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
