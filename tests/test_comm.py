"""Launch environments and parallel layouts, without processes."""

import pytest

from comm.dist import env_from, expand_nodelist
from comm.layout import LayoutError, ParallelLayout


def test_torchrun_environment():
    env = env_from(
        {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
         "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29501"}
    )  # fmt: skip
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.master_addr, env.master_port, env.node_rank) == ("10.1.2.3", 29501, 1)


def test_slurm_environment_without_torchrun():
    env = env_from(
        {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_TASKS_PER_NODE": "4(x2)",
         "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    )  # fmt: skip
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (6, 8, 2, 4)
    assert env.master_addr == "gpu07" and env.master_port == 29500 and env.node_rank == 1


def test_slurm_falls_back_to_the_requested_tasks_per_node():
    env = env_from({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4",
                    "SLURM_JOB_NODELIST": "n1"})  # fmt: skip
    assert env.local_world_size == 4


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
        ("gpu[01-02,07],login5", ["gpu01", "gpu02", "gpu07", "login5"]),
        ("a[8-10]", ["a8", "a9", "a10"]),
    ],
)
def test_nodelist_expansion(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_single_process_without_a_launcher():
    env = env_from({})
    assert (env.rank, env.world_size) == (0, 1)


def test_layout_coordinates_put_tp_fastest():
    layout = ParallelLayout(tp=2, pp=3, dp=2)
    assert layout.world_size == 12
    assert [layout.coords(r) for r in (0, 1, 2, 5, 6, 11)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 2, 1), (1, 0, 0), (1, 2, 1)
    ]  # fmt: skip
    assert all(layout.rank_of(*layout.coords(r)) == r for r in range(12))
    assert layout.tp_group_ranks(1, 2) == [10, 11]
    assert layout.replica_ranks(1) == list(range(6, 12))


def test_layers_split_evenly_or_as_told():
    assert [ParallelLayout(pp=3).layers_of_stage(s, 8) for s in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    explicit = ParallelLayout(pp=2, stage_layers=(1, 7))
    explicit.validate(8, 8, 8)
    assert explicit.layers_of_stage(1, 8) == list(range(1, 8))


@pytest.mark.parametrize(
    "layout, shape, message",
    [
        (ParallelLayout(tp=3), (32, 8, 30), "tp=3 does not divide the model's 32 attention heads"),
        (
            ParallelLayout(tp=16),
            (48, 6, 30),
            "tp=16 exceeds the model's 6 key/value heads and is not a multiple",
        ),
        (ParallelLayout(tp=4), (32, 6, 30), "tp=4 does not divide the model's 6 key/value heads"),
        (ParallelLayout(pp=40), (32, 8, 30), "pp=40 exceeds the model's 30 layers"),
        (ParallelLayout(pp=2, stage_layers=(10, 10)), (32, 8, 30), "add up to the model's 30 layers"),
    ],
)
def test_invalid_layouts_name_the_numbers(layout, shape, message):
    with pytest.raises(LayoutError, match=message):
        layout.validate(*shape, world_size=layout.world_size)


def test_a_layout_must_fill_the_world():
    with pytest.raises(LayoutError, match="= 8 ranks, but the world has 4 processes"):
        ParallelLayout(tp=2, pp=2, dp=2).validate(32, 8, 30, world_size=4)


def test_tp_above_kv_heads_replicates_them_when_it_divides():
    ParallelLayout(tp=8).validate(32, 2, 30)
    with pytest.raises(LayoutError, match="tp=8 exceeds the model's 3 key/value heads"):
        ParallelLayout(tp=8).validate(48, 3, 30)
