"""Run by torchrun from test_parallel.py: greedy generation on a tp x pp replica for each
checkpoint, in one process group, with the tensor-parallel consistency checks on. The head saves
tokens and per-step logits; every rank saves its parameter bytes. For the first checkpoint the
head also runs the continuous-batching engine on the replica over shared-prefix requests, with
prefix caching off and on, and saves what each gave."""

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
from engine.scheduler import Engine

# requests sharing a 21-token prefix (5 blocks of 4 and a token), greedy and seeded
SHARED = [
    [7 + i % 50 for i in range(21)] + suffix for suffix in ([1], [2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12])
]


def engine_outputs(executor, replica, caching: bool) -> dict:
    """Tokens and log-probabilities of SHARED on the replica, half arriving together, then one
    after another; and the engine's prefix-cache hits."""
    config = replica.model.config
    engine = Engine(
        executor, config, 64, 4, None, replica.model.rotary.max_len, max_batched_tokens=16,
        micro_batches=replica.layout.pp, min_micro_batch_rows=1, prefix_caching=caching,
    )  # fmt: skip
    out: dict[str, list] = {}

    def run():
        while engine.has_work():
            for o in engine.step():
                out.setdefault(o.request_id, []).append((o.token_ids, o.logprobs))

    for i, prompt in enumerate(SHARED):
        params = SamplingParams(max_tokens=6, temperature=0.8 * (i % 2), seed=i, ignore_eos=True, logprobs=3)
        engine.add_request(str(i), prompt, params)
        if i >= 2:
            run()
    run()
    return {"outputs": out, "hits": engine.stats().prefix_cache_hits, "free": engine.allocator.num_free}


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
            saved["results"][name] = {
                "tokens": [o.token_ids for o in outs],
                "logits": [torch.stack(o.logits) for o in outs],
            }
            if item == runs[0][0] and algo == "native":
                saved["engine"] = {c: engine_outputs(gen.executor, replica, c) for c in (False, True)}
            gen.close()
        else:
            replica.follow()
    torch.save(saved, Path(args.out) / f"rank{env.rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
