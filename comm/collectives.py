"""The collectives the engine calls, each written out where the model uses it.

``TPGroup`` is a rank's place in its tensor-parallel group. With one rank every function here is
the identity, so single-process code pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from comm import allreduce


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: object = None  # torch.distributed ProcessGroup; None when size == 1
    ranks: tuple[int, ...] = (0,)  # global ranks of the group, in tp order
    algorithm: str = "native"  # all-reduce: native | star | tree | ring | hier | hier-scatter | auto
    per_node: int = 1  # ranks of the group per node, for the hierarchical topologies


def all_reduce(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Sum ``x`` over the tensor-parallel group, in place, with the group's configured algorithm;
    every rank gets the same bits."""
    if tp.size > 1:
        allreduce.all_reduce(x, tp.algorithm, tp.rank, tp.ranks, tp.group, tp.per_node)
    return x


def gather_last_dim(x: torch.Tensor, tp: TPGroup, dst: int = 0) -> torch.Tensor | None:
    """Concatenate the ranks' ``x`` along the last dimension on tp rank ``dst`` only (None elsewhere)."""
    if tp.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.size)] if tp.rank == dst else None
    dist.gather(x, parts, dst=tp.ranks[dst], group=tp.group)
    return torch.cat(parts, dim=-1) if parts is not None else None


def all_gather_last_dim(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Concatenate the ranks' ``x`` along the last dimension on every rank."""
    if tp.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=-1)
