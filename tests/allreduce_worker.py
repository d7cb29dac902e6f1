"""Run by torchrun from test_allreduce.py: every hand-written all-reduce against the backend's own,
for each dtype and edge size, in one process group. Writes the problems it finds (none expected)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from comm.allreduce import all_reduce
from comm.dist import init

ALGORITHMS = ["star", "tree", "ring", "hier", "hier-scatter", "auto"]
DTYPES = {
    "float32": (torch.float32, 1e-5),
    "bfloat16": (torch.bfloat16, 2e-2),
    "float16": (torch.float16, 2e-3),
}


def main():
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    env, _ = init(timeout_s=60)
    n, rank = env.world_size, env.rank
    ranks = tuple(range(n))
    per_node = 2 if n > 2 else 1
    sizes = [0, 1, n - 1, n + 1, 7, 1000, 300_000]  # 300k float32 words: the tree pipelines it
    problems = []
    for dtype_name, (dtype, tol) in DTYPES.items():
        for size in sizes:
            g = torch.Generator().manual_seed(1000 * size + rank)
            x = torch.randn(size, generator=g).to(dtype)
            inputs = [torch.empty_like(x) for _ in range(n)]
            dist.all_gather(inputs, x)
            exact = torch.stack([t.double() for t in inputs]).sum(0)
            scale = torch.stack([t.double().abs() for t in inputs]).sum(0) + 1e-30
            native = x.clone()
            dist.all_reduce(native)
            for algorithm in ["native", *ALGORITHMS]:
                y = native if algorithm == "native" else x.clone()
                if algorithm != "native":
                    all_reduce(y, algorithm, rank, ranks, None, per_node)
                err = ((y.double() - exact).abs() / scale).max().item() if size else 0.0
                if err > tol:
                    problems.append(f"{algorithm} {dtype_name} size {size}: relative error {err:.3g}")
                mine = y.view(torch.uint8) if size else y
                everyone = [torch.empty_like(mine) for _ in range(n)]
                dist.all_gather(everyone, mine)
                if not all(torch.equal(everyone[0], other) for other in everyone):
                    problems.append(f"{algorithm} {dtype_name} size {size}: ranks differ")
                if y.shape != x.shape or y.dtype != x.dtype:
                    problems.append(f"{algorithm} {dtype_name} size {size}: shape or dtype changed")
    (out / f"rank{rank}.json").write_text(json.dumps(problems))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
