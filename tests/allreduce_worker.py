"""Run by torchrun from test_allreduce.py: every hand-written all-reduce against the backend's own,
for each dtype and edge size, in one process group. Writes the problems it finds (none expected)."""

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from comm.allreduce import all_reduce
from comm.cost import ALGORITHMS as ALL
from comm.dist import init

ALGORITHMS = [a for a in ALL if a != "native"]  # checked against native
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
    problems += subgroup_problems(n, rank)
    (out / f"rank{rank}.json").write_text(json.dumps(problems))
    dist.barrier()
    dist.destroy_process_group()


def subgroup_problems(n: int, rank: int) -> list[str]:
    """Every algorithm inside a group whose ranks are not the world's (the even and the odd
    ranks), as the engine's tensor-parallel groups are when there is pipeline parallelism too."""
    problems = []
    groups = {}
    for parity in (0, 1):
        members = tuple(range(parity, n, 2))
        groups[parity] = (members, dist.new_group(list(members), timeout=timedelta(seconds=60)))
    members, group = groups[rank % 2]
    if len(members) < 2:
        return problems
    x = torch.randn(1001, generator=torch.Generator().manual_seed(rank))
    native = x.clone()
    dist.all_reduce(native, group=group)
    for algorithm in ALGORITHMS:
        y = x.clone()
        all_reduce(y, algorithm, members.index(rank), members, group, 1)
        if not torch.allclose(y, native, rtol=1e-5, atol=1e-5):
            problems.append(f"{algorithm} in the group {members}: differs from native")
        everyone = [torch.empty_like(y) for _ in members]
        dist.all_gather(everyone, y, group=group)
        if not all(torch.equal(everyone[0], other) for other in everyone):
            problems.append(f"{algorithm} in the group {members}: ranks differ")
    return problems


if __name__ == "__main__":
    main()
