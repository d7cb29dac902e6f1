"""Run a schedule in one process on plain Python numbers, checking it as a network would.

Sends are buffered (a snapshot of the region when the step starts); a step completes once every
receive it lists has a message waiting, taken first-in first-out per (sender, receiver) pair, and
the message must cover the same region. The simulation fails on a rank sending to itself, on a
step that receives a copy over a region it is sending (executors receive copies in place), on a
deadlock (no rank can move and some have steps left), and on messages nobody receives.
"""

from __future__ import annotations

import collections

from topologies.schedule import Schedule, span


class ScheduleError(AssertionError):
    """The schedule is not a valid all-reduce."""


def simulate(schedule: Schedule, inputs: list[list]) -> list[list]:
    n = schedule.n
    if len(inputs) != n:
        raise ValueError(f"{len(inputs)} inputs for {n} ranks")
    bufs = [list(x) for x in inputs]
    size = len(bufs[0])
    for rank, steps in enumerate(schedule.steps):
        for step in steps:
            for op in step:
                if op.peer == rank:
                    raise ScheduleError(f"{schedule.name}: rank {rank} sends to or receives from itself")
                if not 0 <= op.peer < n:
                    raise ScheduleError(f"{schedule.name}: rank {rank} names peer {op.peer} of {n}")
    mail: dict[tuple[int, int], collections.deque] = collections.defaultdict(collections.deque)
    pc, started = [0] * n, [False] * n
    while True:
        moved = False
        for r in range(n):
            if pc[r] == len(schedule.steps[r]):
                continue
            step = schedule.steps[r][pc[r]]
            if not started[r]:
                for op in step:
                    if op.kind == "send":
                        a, b = span(op.region, size)
                        mail[(r, op.peer)].append((op.region, bufs[r][a:b]))
                started[r], moved = True, True
            recvs = [op for op in step if op.kind != "send"]
            sent = [span(op.region, size) for op in step if op.kind == "send"]
            for op in recvs:
                a, b = span(op.region, size)
                if op.kind == "copy" and any(a < d and c < b for c, d in sent):
                    raise ScheduleError(
                        f"{schedule.name}: rank {r} overwrites region {op.region} while sending it "
                        "in the same step"
                    )
            need = collections.Counter(op.peer for op in recvs)
            if any(len(mail[(p, r)]) < k for p, k in need.items()):
                continue
            got = []
            for op in recvs:
                region, data = mail[(op.peer, r)].popleft()
                if region != op.region:
                    raise ScheduleError(
                        f"{schedule.name}: rank {r} expects region {op.region} from {op.peer}, gets {region}"
                    )
                got.append((op, data))
            for op, data in got:
                a, b = span(op.region, size)
                if op.kind == "reduce":
                    bufs[r][a:b] = [x + y for x, y in zip(bufs[r][a:b], data)]
                else:
                    bufs[r][a:b] = data
            pc[r] += 1
            started[r], moved = False, True
        if all(pc[r] == len(schedule.steps[r]) for r in range(n)):
            break
        if not moved:
            stuck = {r: schedule.steps[r][pc[r]] for r in range(n) if pc[r] < len(schedule.steps[r])}
            raise ScheduleError(f"{schedule.name}: deadlock; waiting ranks and their steps: {stuck}")
    left = {pair: len(q) for pair, q in mail.items() if q}
    if left:
        raise ScheduleError(f"{schedule.name}: messages nobody receives: {left}")
    return bufs
