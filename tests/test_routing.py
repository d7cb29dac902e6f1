"""The cluster router's policy (server.routing): cache first within load bounds, and an index that
names the same blocks the engines cache."""

import argparse

import pytest

from engine.kv_cache import block_hash
from server.routing import PrefixIndex, RoutingPolicy, add_routing_flags, policy_from_flags, prompt_hashes


def test_prompt_hashes_are_the_engines_block_hashes_of_full_blocks():
    tokens = list(range(10, 47))  # 37 tokens: 9 full blocks of 4, one token left over
    hashes = prompt_hashes(tokens, 4)
    assert len(hashes) == 9
    chain = None
    for i, h in enumerate(hashes):
        chain = block_hash(chain, tokens[4 * i : 4 * i + 4])
        assert h == chain
    assert prompt_hashes(tokens[:3], 4) == []


def test_the_index_matches_leading_blocks_and_forgets_least_recently_used_first():
    index = PrefixIndex(4)
    a, b = prompt_hashes(list(range(16)), 4), prompt_hashes(list(range(100, 108)), 4)
    index.insert("r1", a)
    assert index.match("r1", a) == 4 and index.match("r1", a[:2] + b) == 2 and index.match("r2", a) == 0
    assert index.match("r1", [a[1], a[2]]) == 2  # a chain hash stands for its whole prefix
    index.insert("r1", b)  # over capacity: the oldest two go
    assert index.size("r1") == 4 and index.match("r1", a) == 0 and index.match("r1", b) == 2
    index.drop("r1")
    assert index.size("r1") == 0 and index.match("r1", b) == 0


def _pick(policy, load, index, tokens, prefer=None):
    return policy.pick(sorted(load), load, index, prompt_hashes(tokens, 4), len(tokens), 4, prefer)


def test_a_prompt_goes_where_its_prefix_is_cached_unless_the_load_is_too_uneven():
    policy = RoutingPolicy(cache_threshold=0.5, balance_abs=4, balance_rel=2)
    index = PrefixIndex(100)
    conversation = list(range(40))
    index.insert("b", prompt_hashes(conversation, 4))
    load = {"a": 0, "b": 3, "c": 1}
    assert _pick(policy, load, index, conversation + [7, 7]) == ("b", "cache")
    # too little of the prompt is cached there: a miss, to the least loaded
    assert _pick(policy, load, index, conversation[:8] + list(range(200, 240))) == ("a", "load")
    # b is 5 requests and 6x over a: balance wins over the cache
    assert _pick(policy, {"a": 1, "b": 6, "c": 2}, index, conversation + [7]) == ("a", "balance")
    # both bounds must be passed: 5 more but only 1.5x more is not uneven enough
    assert _pick(policy, {"a": 10, "b": 15, "c": 12}, index, conversation + [7]) == ("b", "cache")


def test_misses_spread_to_the_emptiest_index_and_ties_prefer_this_member():
    policy, index = RoutingPolicy(), PrefixIndex(100)
    index.insert("a", prompt_hashes(list(range(300, 340)), 4))
    load = {"a": 0, "b": 0, "c": 0}
    assert _pick(policy, load, index, list(range(80)))[0] in ("b", "c")
    assert _pick(policy, load, index, list(range(80)), prefer="c") == ("c", "load")
    least = RoutingPolicy("least-loaded")
    index.insert("b", prompt_hashes(list(range(80)), 4))
    assert _pick(least, {"a": 0, "b": 1, "c": 0}, index, list(range(80))) == ("a", "load")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--cache-threshold", "1.5"], "--cache-threshold must be in [0, 1], got 1.5"),
        (["--balance-abs-threshold", "-1"], "--balance-abs-threshold must be >= 0, got -1"),
        (["--balance-rel-threshold", "0.5"], "--balance-rel-threshold must be >= 1, got 0.5"),
    ],
)
def test_bad_routing_flags_name_the_flag(flags, message):
    parser = argparse.ArgumentParser()
    add_routing_flags(parser)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        policy_from_flags(parser.parse_args(flags))
    with pytest.raises(SystemExit):
        parser.parse_args(["--routing", "random"])
