"""Where a cluster's router sends a request: to the replica that already holds the longest part of
its prompt in its prefix cache, unless that would pile work onto one replica.

The router cannot see the replicas' caches. It keeps, per replica, an approximate index of what it
sent there: the chained hashes (``engine.kv_cache.block_hash``, the same the engines compute) of
the full blocks of every prompt it routed there, and of prompt plus output once the request has
finished there (a conversation's next turn starts with both). Each index is an LRU bounded at the
replica's cache size in blocks, so it forgets roughly as the replica's cache evicts; a lost
replica's index is dropped.

Policy ``cache-aware`` (the default), after SGLang's router:

1. Balance first: if the most and least loaded routable replicas (requests routed there and not
   finished) differ by more than ``balance_abs`` requests and by more than ``balance_rel`` times,
   the request goes to the least loaded one, whatever its cache holds.
2. Otherwise, if some replica holds at least ``cache_threshold`` of the prompt's tokens, the
   request goes to the one that holds the most (least loaded among equals).
3. Otherwise (a miss everywhere) to the least loaded replica, and among equals to the one whose
   index is smallest: new prefixes go where there is most room.

The trade-off: a low ``cache_threshold`` keeps conversations and shared system prompts together
(fewer prefill tokens, lower TTFT) at the price of uneven load when one prefix is popular; the
balance thresholds bound that unevenness, and lower ones trade hit rate for even queues.
``least-loaded`` ignores the caches (the router's behaviour before prefix caching).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from engine.kv_cache import extend_block_hashes

POLICIES = ("cache-aware", "least-loaded")


def prompt_hashes(tokens: list[int], block_size: int) -> list[int]:
    """The chained hashes of the full blocks of ``tokens``, first block first."""
    return extend_block_hashes([], tokens, block_size, len(tokens) // block_size)


class PrefixIndex:
    """Per replica, the block hashes the router believes are in its prefix cache (an LRU)."""

    def __init__(self, capacity_blocks: int):
        if capacity_blocks < 1:
            raise ValueError(f"a prefix index holds at least 1 block, got {capacity_blocks}")
        self.capacity = capacity_blocks
        self.blocks: dict[str, collections.OrderedDict[int, None]] = {}

    def match(self, name: str, hashes: list[int]) -> int:
        """How many leading blocks of ``hashes`` the replica is believed to hold."""
        held = self.blocks.get(name)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def insert(self, name: str, hashes: list[int]) -> None:
        held = self.blocks.setdefault(name, collections.OrderedDict())
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.capacity:
            held.popitem(last=False)

    def size(self, name: str) -> int:
        return len(self.blocks.get(name, ()))

    def drop(self, name: str) -> None:
        self.blocks.pop(name, None)


@dataclass
class RoutingPolicy:
    policy: str = "cache-aware"
    cache_threshold: float = 0.5  # share of the prompt's tokens a replica must hold to win on cache
    balance_abs: int = 8  # requests: a load gap above this (and above balance_rel) routes by load
    balance_rel: float = 1.5  # times

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"routing policy must be one of {POLICIES}, got {self.policy!r}")
        if not 0 <= self.cache_threshold <= 1:
            raise ValueError(f"the cache threshold must be in [0, 1], got {self.cache_threshold}")
        if self.balance_abs < 0 or self.balance_rel < 1:
            raise ValueError(
                f"balance thresholds must be >= 0 requests and >= 1 times, got {self.balance_abs} "
                f"and {self.balance_rel}"
            )

    def pick(
        self, names: list[str], load: dict[str, int], index: PrefixIndex, hashes: list[int], prompt_len: int,
        block_size: int, prefer: str | None = None,
    ) -> tuple[str, str]:  # fmt: skip
        """(replica, why): why is "cache", "balance" or "load". ``prefer`` wins ties (this member's
        own replica, which costs no network hop)."""

        def by_load(n):
            return (load[n], index.size(n), n != prefer, n)

        if self.policy == "least-loaded" or len(names) == 1:
            return min(names, key=lambda n: (load[n], n != prefer, n)), "load"
        loads = [load[n] for n in names]
        if max(loads) - min(loads) > self.balance_abs and max(loads) > self.balance_rel * min(loads):
            return min(names, key=by_load), "balance"
        matched = {n: index.match(n, hashes) for n in names}
        best = max(matched.values())
        if best and best * block_size >= self.cache_threshold * prompt_len:
            return min((n for n in names if matched[n] == best), key=by_load), "cache"
        return min(names, key=by_load), "load"


def add_routing_flags(parser) -> None:
    group = parser.add_argument_group("cluster routing (server.routing)")
    group.add_argument(
        "--routing",
        choices=POLICIES,
        default="cache-aware",
        help="cache-aware: to the replica holding the longest cached prefix, within load bounds; "
        "least-loaded: by outstanding requests alone",
    )
    group.add_argument(
        "--cache-threshold",
        type=float,
        default=RoutingPolicy.cache_threshold,
        help="share of a prompt's tokens a replica must hold to win the request on its cache",
    )
    group.add_argument(
        "--balance-abs-threshold",
        type=int,
        default=RoutingPolicy.balance_abs,
        help="route by load alone when replicas' outstanding requests differ by more than this ...",
    )
    group.add_argument(
        "--balance-rel-threshold",
        type=float,
        default=RoutingPolicy.balance_rel,
        help="... and the busiest has more than this many times the least busy one's",
    )


def policy_from_flags(args) -> RoutingPolicy:
    """The policy the flags name; a bad value is a ValueError naming the flag."""
    checks = (
        ("--cache-threshold", 0 <= args.cache_threshold <= 1, "in [0, 1]"),
        ("--balance-abs-threshold", args.balance_abs_threshold >= 0, ">= 0"),
        ("--balance-rel-threshold", args.balance_rel_threshold >= 1, ">= 1"),
    )
    for flag, ok, want in checks:
        if not ok:
            raise ValueError(f"{flag} must be {want}, got {getattr(args, flag[2:].replace('-', '_'))}")
    return RoutingPolicy(
        args.routing, args.cache_threshold, args.balance_abs_threshold, args.balance_rel_threshold
    )
