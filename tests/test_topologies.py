"""Schedules, simulated in one process: exact sums on every rank, no self-sends, no deadlock,
no message left unreceived, for every group size from 1 to 9."""

import random

import pytest

from topologies.schedule import Op, Schedule, build, hierarchical, ring, span, star, tree
from topologies.simulate import ScheduleError, simulate

SIZES = [0, 1, 2, 7, 64, 101]


def _check(schedule, n, size, seed=0):
    rng = random.Random(seed * 1000 + n * 10 + size)
    inputs = [[rng.randint(-1000, 1000) for _ in range(size)] for _ in range(n)]
    total = [sum(col) for col in zip(*inputs)] if size else []
    out = simulate(schedule, inputs)
    assert all(buf == total for buf in out), schedule.name


@pytest.mark.parametrize("n", range(1, 10))
@pytest.mark.parametrize("size", SIZES)
def test_star_ring_and_tree(n, size):
    _check(star(n), n, size)
    _check(ring(n), n, size)
    for chunks in (1, 2, 3, 5):
        for arity in (2, 3):
            _check(tree(n, arity, chunks), n, size)


@pytest.mark.parametrize("n", range(1, 10))
@pytest.mark.parametrize("per_node", [1, 2, 3, 4])
@pytest.mark.parametrize("variant", ["reduce", "scatter"])
def test_hierarchical_any_node_size(n, per_node, variant):
    for size in SIZES:
        _check(hierarchical(n, per_node, variant), n, size)


def test_ring_moves_the_bandwidth_optimal_amount():
    n, size = 4, 400
    s = ring(n)
    sent = sum(
        span(op.region, size)[1] - span(op.region, size)[0]
        for steps in s.steps
        for step in steps
        for op in step
        if op.kind == "send"
    )
    assert sent == 2 * (n - 1) * size  # 2(n-1)/n of the buffer from each of n ranks
    assert s.messages() == 2 * n * (n - 1)


def test_regions_partition_any_size():
    for size in range(0, 30):
        for parts in range(1, 9):
            spans = [span(((i, parts),), size) for i in range(parts)]
            assert spans[0][0] == 0 and spans[-1][1] == size
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


def test_the_simulator_catches_broken_schedules():
    selfish = Schedule("selfish", 2)
    selfish.add(0, Op("send", 0))
    with pytest.raises(ScheduleError, match="itself"):
        simulate(selfish, [[1], [2]])
    waiting = Schedule("waiting", 2)
    waiting.add(0, Op("copy", 1))
    waiting.add(1, Op("copy", 0))
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(waiting, [[1], [2]])
    unread = Schedule("unread", 2)
    unread.add(0, Op("send", 1))
    with pytest.raises(ScheduleError, match="nobody receives"):
        simulate(unread, [[1], [2]])
    clobber = Schedule("clobber", 2)
    clobber.add(0, Op("send", 1, ((0, 2),)), Op("copy", 1, ((0, 2),)))
    clobber.add(1, Op("send", 0, ((0, 2),)), Op("copy", 0, ((0, 2),)))
    with pytest.raises(ScheduleError, match="overwrites"):
        simulate(clobber, [[1, 2], [3, 4]])
    half = star(3)
    half.steps[2] = []  # rank 2 never takes part
    with pytest.raises(ScheduleError):
        simulate(half, [[1], [2], [3]])


def test_build_by_name():
    for name in ("star", "tree", "ring", "hier", "hier-scatter"):
        _check(build(name, 6, per_node=4, chunks=2), 6, 37)
    with pytest.raises(ValueError, match="unknown topology"):
        build("mesh", 4)


def test_resolved_steps_are_the_regions_offsets_without_empty_ranges():
    s = ring(4)
    # 2 elements in 4 parts: parts 2 and 3 are empty, so some steps send and receive nothing
    for rank in range(4):
        resolved = s.resolved(rank, 2)
        expected = [
            [
                (op.kind, op.peer, *span(op.region, 2))
                for op in step
                if span(op.region, 2)[0] < span(op.region, 2)[1]
            ]
            for step in s.steps[rank]
        ]
        assert [list(step) for step in resolved] == [step for step in expected if step]
        assert all(a < b for step in resolved for _, _, a, b in step)
    assert len(s.resolved(0, 2)) < len(s.steps[0])  # empty steps are dropped
    assert s.resolved(0, 2) is s.resolved(0, 2)  # remembered
    s.add(0, Op("send", 1))
    assert len(s.resolved(0, 1000)) == len(s.steps[0])  # a schedule that grows is resolved anew


def test_resolved_steps_are_remembered_for_a_bounded_number_of_sizes(monkeypatch):
    import topologies.schedule as schedule

    monkeypatch.setattr(schedule, "RESOLVED_KEPT", 3)
    s = star(4)
    first = s.resolved(0, 10)
    for numel in (11, 12, 13):
        s.resolved(0, numel)
    assert len(s._resolved) == 3
    assert s.resolved(0, 10) is not first and s.resolved(0, 10) == first  # dropped, then resolved anew
