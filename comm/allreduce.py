"""Run a ``topologies`` schedule as an all-reduce with torch.distributed point-to-point.

Semantics are those of ``dist.all_reduce`` (sum, in place) for any size and dtype, and every rank
ends with the same bits. Each step's sends and receives go out together: through
``batch_isend_irecv`` on a GPU (NCCL needs a pair of opposite transfers grouped to run them
without deadlock), straight on the process group on the CPU (gloo runs each on its own). Received
regions land in scratch buffers and are added in the schedule's order as they arrive, or copied
in place.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from comm.cost import auto_choice
from topologies.schedule import Schedule, build, chunks_for


@functools.lru_cache(maxsize=256)
def schedule_for(name: str, n: int, per_node: int, chunks: int = 1) -> Schedule:
    return build(name, n, per_node=per_node, chunks=chunks)


_scratch: dict[tuple, torch.Tensor] = {}


def _scratch_for(flat: torch.Tensor, numel: int) -> torch.Tensor:
    """A reusable receive buffer: fresh allocations of megabytes cost page faults on every call."""
    key = (flat.dtype, flat.device)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < numel:
        buf = _scratch[key] = torch.empty(numel, dtype=flat.dtype, device=flat.device)
    return buf


def run_schedule(
    x: torch.Tensor, schedule: Schedule, rank: int, ranks: tuple[int, ...], group
) -> torch.Tensor:
    """All-reduce the contiguous tensor ``x`` in place by ``schedule``; ``rank`` is this process's
    index in the group and ``ranks`` the group's global ranks.

    A step's ``reduce`` receives land in scratch space and are added in the schedule's order, each
    as soon as it has arrived, so the addition of one piece overlaps the transfer of the next;
    ``copy`` receives land in place (the simulator checks that no send of the same step reads
    what they overwrite)."""
    if not x.is_contiguous():
        raise ValueError("run_schedule needs a contiguous tensor")
    flat = x.view(-1)
    if flat.numel() == 0 or schedule.n == 1:
        return x
    post = _post_direct if flat.device.type == "cpu" else _post_batched
    for step in schedule.resolved(rank, flat.numel()):
        need = sum(b - a for kind, _, a, b in step if kind == "reduce")
        scratch = _scratch_for(flat, need) if need else None
        transfers, landed, at = [], [], 0
        for kind, peer, a, b in step:
            if kind == "send":
                transfers.append((True, flat[a:b], peer))
            elif kind == "copy":  # straight into place: no send of this step reads it
                transfers.append((False, flat[a:b], peer))
            else:
                buf = scratch[at : at + b - a]
                at += b - a
                landed.append((len(transfers), a, b, buf))
                transfers.append((False, buf, peer))
        works = post(transfers, ranks, group)
        waited = 0
        for index, a, b, buf in landed:
            while waited <= index:  # in posting order, which the backends progress in
                works[waited].wait()
                waited += 1
            flat[a:b].add_(buf)
        for work in works[waited:]:
            work.wait()
    return x


def _post_direct(transfers, ranks, group) -> list:
    """Post each transfer straight on the process group (peers are group ranks). Right for gloo,
    which runs every send and receive on its own. Skipping torch.distributed's Python wrappers
    matters where ranks share cores: a small all-reduce's time is then the CPU time its ranks
    spend, more than any wire's."""
    pg = group if group is not None else dist.group.WORLD
    return [pg.send([t], peer, 0) if is_send else pg.recv([t], peer, 0) for is_send, t, peer in transfers]


def _post_batched(transfers, ranks, group) -> list:
    """Post a step's transfers as one batch, which NCCL needs to run a pair of opposite transfers
    between two ranks without deadlock."""
    ops = [
        dist.P2POp(dist.isend if is_send else dist.irecv, t, ranks[peer], group)
        for is_send, t, peer in transfers
    ]
    return dist.batch_isend_irecv(ops)


def all_reduce(
    x: torch.Tensor, algorithm: str, rank: int, ranks: tuple[int, ...], group, per_node: int
) -> None:
    """Sum ``x`` over the group in place with the named algorithm (``native``: the backend's own)."""
    n = len(ranks)
    if algorithm == "auto":
        algorithm = auto_choice(x.numel() * x.element_size(), n, per_node)
    if algorithm == "native":
        dist.all_reduce(x, group=group)
        return
    chunks = chunks_for(algorithm, x.numel() * x.element_size(), n)
    run_schedule(x, schedule_for(algorithm, n, per_node, chunks), rank, ranks, group)
