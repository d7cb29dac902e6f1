"""The parallel layout of the world: dp x pp x tp, tp fastest.

``ParallelLayout`` checks itself against the model's shape before any process group exists, so a
layout that cannot work ends at once with a message naming the numbers instead of a hang or a
shape error deep in a collective. Rank r has tp rank r % tp, pipeline stage (r // tp) % pp and
replica r // (tp * pp): a tp group is consecutive ranks, which torchrun places on one node.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class LayoutError(ValueError):
    """A parallel layout that does not fit the model or the world."""


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    # layers per pipeline stage; empty: as even a split as possible, earlier stages taking the rest
    stage_layers: tuple[int, ...] = field(default_factory=tuple)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def validate(
        self, num_heads: int, num_kv_heads: int, num_layers: int, world_size: int | None = None
    ) -> None:
        for name, value in (("tp", self.tp), ("pp", self.pp), ("dp", self.dp)):
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"{name} must be a positive integer, got {value!r}")
        if world_size is not None and world_size != self.world_size:
            raise LayoutError(
                f"dp={self.dp} x pp={self.pp} x tp={self.tp} = {self.world_size} ranks, but the world has "
                f"{world_size} processes"
            )
        if num_heads % self.tp:
            raise LayoutError(f"tp={self.tp} does not divide the model's {num_heads} attention heads")
        if self.tp > num_kv_heads and self.tp % num_kv_heads:
            raise LayoutError(
                f"tp={self.tp} exceeds the model's {num_kv_heads} key/value heads and is not a multiple of "
                "them, so they cannot be replicated evenly"
            )
        if self.tp <= num_kv_heads and num_kv_heads % self.tp:
            raise LayoutError(f"tp={self.tp} does not divide the model's {num_kv_heads} key/value heads")
        if self.pp > num_layers:
            raise LayoutError(f"pp={self.pp} exceeds the model's {num_layers} layers")
        if self.stage_layers:
            if len(self.stage_layers) != self.pp:
                raise LayoutError(f"{len(self.stage_layers)} stage sizes given for pp={self.pp}")
            if sum(self.stage_layers) != num_layers or min(self.stage_layers) < 1:
                raise LayoutError(
                    f"stage sizes {list(self.stage_layers)} must be positive and add up to the model's "
                    f"{num_layers} layers"
                )

    def layers_of_stage(self, stage: int, num_layers: int) -> list[int]:
        sizes = list(self.stage_layers) or [
            num_layers // self.pp + (1 if s < num_layers % self.pp else 0) for s in range(self.pp)
        ]
        start = sum(sizes[:stage])
        return list(range(start, start + sizes[stage]))

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp rank, pp stage, tp rank) of a global rank."""
        return rank // (self.tp * self.pp), (rank // self.tp) % self.pp, rank % self.tp

    def rank_of(self, dp: int, pp: int, tp: int) -> int:
        return (dp * self.pp + pp) * self.tp + tp

    def tp_group_ranks(self, dp: int, pp: int) -> list[int]:
        return [self.rank_of(dp, pp, t) for t in range(self.tp)]

    def replica_ranks(self, dp: int) -> list[int]:
        return [self.rank_of(dp, p, t) for p in range(self.pp) for t in range(self.tp)]
