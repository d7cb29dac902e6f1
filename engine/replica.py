"""Set up this rank's part of a model replica: process groups, its stage and shard, its role.

Every rank calls ``make_groups`` once (collective: all ranks create every group, in the same
order), then ``load_stage`` for each model it serves. The replica's head then drives generation
through ``Replica.generator()``; every other rank calls ``Replica.follow()``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from comm.collectives import TPGroup
from comm.dist import DistEnv, new_group
from comm.layout import LayoutError, ParallelLayout
from engine.config import ModelConfig
from engine.executor import DistributedExecutor, ReplicaRanks, follow
from engine.generate import Generator
from engine.loader import Checkpoint, build_model
from engine.model import CausalLM
from engine.quant import weight_bytes
from engine.tokenizer import Tokenizer, has_tokenizer, load_tokenizer


def check_layout(layout: ParallelLayout, config: ModelConfig, world_size: int | None = None) -> None:
    """Everything about ``layout`` that must hold for this model, before any process exists."""
    layout.validate(config.num_heads, config.num_kv_heads, config.num_layers, world_size)
    if config.intermediate_size % layout.tp:
        raise LayoutError(
            f"tp={layout.tp} does not divide the model's intermediate size {config.intermediate_size}"
        )


def make_groups(
    layout: ParallelLayout,
    rank: int,
    timeout_s: float,
    algorithm: str = "native",
    per_node: int | None = None,
) -> TPGroup:
    """Create every tensor-parallel group (all ranks, same order) and return this rank's, whose
    all-reduces use ``algorithm`` (``per_node``: its ranks per node, for the hierarchical ones)."""
    dp, pp, tp = layout.coords(rank)
    mine = TPGroup()
    for d in range(layout.dp):
        for p in range(layout.pp):
            ranks = layout.tp_group_ranks(d, p)
            group = new_group(ranks, timeout_s) if layout.tp > 1 else None
            if (d, p) == (dp, pp):
                mine = TPGroup(tp, layout.tp, group, tuple(ranks), algorithm, per_node or layout.tp)
    return mine


@dataclass
class Replica:
    model: CausalLM
    ranks: ReplicaRanks
    layout: ParallelLayout
    device: torch.device
    tokenizer: Tokenizer | None
    param_bytes: int
    check: bool = False

    @property
    def is_head(self) -> bool:
        return self.ranks.rank == self.ranks.head

    def generator(self) -> Generator:
        executor = DistributedExecutor(self.model, self.ranks, self.device, check=self.check)
        return Generator(self.model, self.tokenizer, self.device, executor, micro_batches=self.layout.pp)

    def follow(self) -> None:
        follow(self.model, self.ranks, self.device, check=self.check)


def load_stage(
    model_dir: str | Path,
    layout: ParallelLayout,
    env: DistEnv,
    tp: TPGroup,
    device: torch.device,
    dtype: torch.dtype | None = None,
    max_len: int | None = None,
    check: bool = False,
    progress: bool = True,
    quantize: str | None = None,
) -> Replica:
    """Build and load this rank's stage and shard of the model in ``model_dir``."""
    config = ModelConfig.from_hf(model_dir)
    check_layout(layout, config, env.world_size)
    dp, pp, t = layout.coords(env.rank)
    layer_ids = layout.layers_of_stage(pp, config.num_layers)
    first, last = pp == 0, pp == layout.pp - 1
    model = build_model(
        config,
        Checkpoint(model_dir),
        device,
        dtype,
        max_len,
        layer_ids=layer_ids,
        first=first,
        last=last,
        tp=tp,
        progress=progress and env.rank == 0,
        quantize=quantize,
    )
    ranks = ReplicaRanks(
        rank=env.rank,
        head=layout.rank_of(dp, 0, 0),
        members=tuple(layout.replica_ranks(dp)),
        prev=None if first else layout.rank_of(dp, pp - 1, t),
        next=None if last else layout.rank_of(dp, pp + 1, t),
        sampler=layout.rank_of(dp, layout.pp - 1, 0),
        is_sampler=last and t == 0,
    )
    param_bytes = weight_bytes(model)
    parts = (["embedding"] if first else []) + [f"layers {layer_ids[0]}-{layer_ids[-1]}"]
    parts += ["norm and head"] if last else []
    print(
        f"rank {env.rank} (dp {dp}, pp {pp}, tp {t}): {', '.join(parts)}; "
        f"{param_bytes} parameter bytes ({param_bytes / 2**20:.1f} MiB)",
        file=sys.stderr,
        flush=True,
    )
    tokenizer = load_tokenizer(model_dir, config.vocab_size) if has_tokenizer(model_dir) else None
    return Replica(model, ranks, layout, device, tokenizer, param_bytes, check)
