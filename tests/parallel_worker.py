"""Run by torchrun from test_parallel.py: greedy generation on a tp x pp replica for each
checkpoint, in one process group, with the tensor-parallel consistency checks on. The head saves
tokens and per-step logits; every rank saves its parameter bytes."""

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist

from comm.dist import init
from comm.layout import ParallelLayout
from engine.replica import load_stage, make_groups
from engine.request import SamplingParams


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--pp", type=int, required=True)
    parser.add_argument("--models", required=True, help="name=dir,name=dir")
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--allreduce", default="native", help="comma-separated algorithms to run each model with"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    env, device = init(timeout_s=60)
    layout = ParallelLayout(tp=args.tp, pp=args.pp)
    tp = make_groups(layout, env.rank, 60)
    prompts = json.loads(args.prompts)
    saved = {"param_bytes": {}, "results": {}}
    runs = [(item, algo) for item in args.models.split(",") for algo in args.allreduce.split(",")]
    for item, algo in runs:
        name, path = item.split("=", 1)
        name = name if algo == "native" else f"{name}@{algo}"
        group = dataclasses.replace(tp, algorithm=algo, per_node=max(1, args.tp // 2))
        replica = load_stage(path, layout, env, group, device, check=True, progress=False)
        saved["param_bytes"][name] = replica.param_bytes
        if replica.is_head:
            gen = replica.generator()
            gen.min_micro_batch_rows = 1  # exercise micro-batches in flight even for a few prompts
            params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
            outs = gen.generate(prompts, params, record_logits=True)
            gen.close()
            saved["results"][name] = {
                "tokens": [o.token_ids for o in outs],
                "logits": [torch.stack(o.logits) for o in outs],
            }
        else:
            replica.follow()
    torch.save(saved, Path(args.out) / f"rank{env.rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
