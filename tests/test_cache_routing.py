"""Cache-aware routing in a 3-replica cluster on loopback: each conversation's turns stay on the
replica that has them cached while it lives, and move (and stay) elsewhere when it dies."""

import json
import random
import urllib.request

import pytest

from server.testing.cluster import Cluster, wait_for


@pytest.fixture(scope="module")
def cluster(tiny_demo):
    c = Cluster(tiny_demo)
    yield c
    c.stop()


def _routed(cluster, leader) -> dict[str, int]:
    """Requests the leader has routed to each replica so far."""
    rows = (cluster.state(leader) or {}).get("replicas") or []
    return {r["name"]: sum((r.get("routed") or {}).values()) for r in rows}


def _turn(cluster, leader, prompt) -> tuple[str, list[int], int]:
    """Send one turn (no retries) to the leader; (the replica that ran it, the generated ids, the
    prompt tokens it found cached)."""
    before = _routed(cluster, leader)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, "return_tokens_as_token_ids": True}  # fmt: skip
    req = urllib.request.Request(cluster.url(leader) + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as r:
        answer = json.loads(r.read())
    after = _routed(cluster, leader)
    moved = [n for n in after if after[n] != before.get(n, 0)]
    assert len(moved) == 1, f"one turn, one routing decision: {before} -> {after}"
    ids = [int(t.removeprefix("token_id:")) for t in answer["choices"][0]["logprobs"]["tokens"]]
    assert len(ids) == 8
    return moved[0], ids, answer["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_conversations_stay_on_the_replica_that_caches_them_and_move_when_it_dies(cluster):
    leader = cluster.heal()
    rng = random.Random(3)
    history = {c: [] for c in range(3)}
    where = {c: [] for c in range(3)}

    def turn(c):
        # what the replica that ran the last turn holds: its whole sequence but the last token
        held = (len(history[c]) - 1) // 16 * 16 if history[c] else 0
        prompt = history[c] + [rng.randrange(4, 1000) for _ in range(40)]
        name, ids, cached = _turn(cluster, leader, prompt)
        where[c].append((name, cached, held))
        history[c] = prompt + ids

    for _ in range(3):  # the conversations take turns, one request at a time
        for c in history:
            turn(c)
    homes = {c: where[c][0][0] for c in history}
    for c, turns in where.items():
        assert [n for n, *_ in turns] == [homes[c]] * 3, f"conversation {c} moved: {turns}"
        assert all(cached == held > 0 for _, cached, held in turns[1:]), turns  # found there
    assert len(set(homes.values())) == 3, f"new conversations spread over the replicas: {homes}"

    victim = next(c for c in history if homes[c] != leader)
    cluster.nodes[homes[victim]].kill()
    wait_for(lambda: not cluster.replica(leader, homes[victim]).get("routable"), 15,
             f"the leader to take {homes[victim]} out of routing")  # fmt: skip
    for _ in range(2):
        for c in history:
            turn(c)
    moved = [n for n, *_ in where[victim][3:]]
    assert moved[0] != homes[victim] and moved[1] == moved[0], f"it moves once, then stays: {where[victim]}"
    _, cached, held = where[victim][4]
    assert where[victim][3][1] == 0 and cached == held  # its new replica has it by the next turn
    for c in history:
        if c != victim:
            assert [n for n, *_ in where[c]] == [homes[c]] * 5, f"conversation {c} moved: {where[c]}"
    assert cluster.replica(leader, homes[victim])["indexed_blocks"] == 0  # its entries were dropped
