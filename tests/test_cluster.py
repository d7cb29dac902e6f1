"""Fault tolerance with real processes: three emulated nodes (separate ``./launch.sh serve
--cluster`` invocations on loopback), one replica each, under a steady load of streaming and
non-streaming requests from the official openai client, which never retries on its own
(``max_retries=0``), through a test-side proxy that sends traffic to whichever node answers
``/ready`` with 200 (as HAProxy does with Patroni).

The tests share one cluster and each starts by healing it (every member running, one leader,
every replica routable), so any of them can run alone or in any order. A follower's fault must
cost no request and no retry: its requests move to another replica, which the leader's
``ringleader_rerouted_requests_total`` shows. A leader's fault breaks the connections it held:
those requests are retried by the load, explicitly, and counted. Each test prints its figures."""

import hashlib
import hmac
import json
import os
import signal
import time
import urllib.request

import openai
import pytest

from engine.generate import Generator
from engine.request import SamplingParams
from server.testing.cluster import (
    LEASE_MS,
    NAMES,
    SECRET,
    Cluster,
    Load,
    Proxy,
    expected_outputs,
    member,
    wait_for,
)

REROUTED, FAILOVERS = "ringleader_rerouted_requests_total", "ringleader_failovers_total"


@pytest.fixture(scope="module")
def expected(tiny_demo):
    return expected_outputs(tiny_demo)


@pytest.fixture(scope="module")
def cluster(tiny_demo):
    c = Cluster(tiny_demo)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def proxy(cluster):
    p = Proxy(cluster)
    yield p
    p.stop()


def _sign(body: bytes, secret: str = SECRET) -> dict:
    return {"X-Ringleader-Signature": hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
            "Content-Type": "application/json"}  # fmt: skip


def _post(url, body: bytes, headers) -> int:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _term(cluster: Cluster, name: str) -> int:
    term = (cluster.state(name) or {}).get("term")
    assert term is not None, f"{name} does not answer /cluster"
    return term


def _in_flight(cluster: Cluster, leader: str, replica: str | None = None) -> None:
    """Until the leader has requests outstanding on ``replica`` (on any replica when None)."""

    def busy():
        rows = (cluster.state(leader) or {}).get("replicas") or []
        return sum(r.get("outstanding", 0) for r in rows if replica is None or r.get("name") == replica)

    wait_for(busy, 10, f"requests in flight on {replica or 'any replica'} (the leader {leader}'s /cluster)")


def test_forged_and_replayed_control_messages_are_refused_and_counted(cluster):
    leader = cluster.heal()
    follower = next(n for n in NAMES if n != leader)
    url = cluster.url(follower)
    term = _term(cluster, follower)
    reasons = ("bad signature", "stale", "replayed")

    def refused() -> dict:
        metrics = urllib.request.urlopen(url + "/metrics").read().decode()
        counts = dict.fromkeys(reasons, 0.0)
        for line in metrics.splitlines():
            for reason in reasons:
                if line.startswith(f'ringleader_control_rejected_total{{reason="{reason}"}}'):
                    counts[reason] = float(line.split()[-1])
        return counts

    before = refused()
    message = {
        "from": leader,
        "term": term + 5,
        "leader": leader,
        "ts": time.time(),
        "nonce": os.urandom(8).hex(),
    }
    body = json.dumps(message).encode()
    assert _post(url + "/_control/heartbeat", body, _sign(body, "wrong secret")) == 403
    assert _post(url + "/_control/heartbeat", body, {"Content-Type": "application/json"}) == 403
    stale = json.dumps({**message, "ts": time.time() - 3600}).encode()
    assert _post(url + "/_control/heartbeat", stale, _sign(stale)) == 403
    # a genuine message from the past (a stale term) is refused by its term
    old = json.dumps({**message, "term": 0, "nonce": os.urandom(8).hex()}).encode()
    assert _post(url + "/_control/generate", old, _sign(old)) == 409
    assert _post(url + "/_control/generate", old, _sign(old)) == 403  # the same bytes again: replayed
    assert _term(cluster, follower) == term and cluster.leader() == leader
    counts = {r: refused()[r] - before[r] for r in reasons}
    print(f"\nrefused control messages on {follower}: {counts}")
    assert counts == {"bad signature": 2, "stale": 1, "replayed": 1}


def test_a_killed_follower_costs_no_request_its_requests_move_on_and_it_rejoins(cluster, proxy, expected):
    leader = cluster.heal()
    victim = next(n for n in NAMES if n != leader)
    rerouted, failovers = cluster.counter(leader, REROUTED), cluster.counter(leader, FAILOVERS)
    load = Load(proxy, expected, workers=6)
    try:
        time.sleep(2)
        before = load.completed
        _in_flight(cluster, leader, victim)
        cluster.nodes[victim].proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: member(cluster.state(leader), victim).get("alive") is False, 10,
                 f"the leader {leader} to see {victim} dead")  # fmt: skip
        detected = time.monotonic() - killed
        time.sleep(2)
    finally:
        figures = load.finish()
    moved = cluster.counter(leader, REROUTED) - rerouted
    lost_replicas = cluster.counter(leader, FAILOVERS) - failovers
    print(f"\nfollower {victim} killed: detected in {detected:.2f} s; {figures}; before the kill {before}; "
          f"{moved:.0f} requests moved on")  # fmt: skip
    assert detected <= 5  # a ceiling for liveness: the chaos benchmark measures it
    assert figures["failed"] == 0 and figures["lost"] == 0 and figures["retried"] == 0, load.errors[:3]
    assert moved >= 1 and lost_replicas == 1  # it had requests in flight, and they went on elsewhere
    assert figures["completed"] > before and not load.wrong
    # the node comes back (a new launch naming the same members), rejoins and is routed to
    cluster.start(victim)
    wait_for(lambda: cluster.replica(leader, victim).get("routable"), 20,
             f"{victim} routable again from {leader}")  # fmt: skip
    back = cluster.state(victim) or {}
    assert back.get("role") == "follower" and back.get("leader") == leader, back
    load = Load(proxy, expected, workers=6)
    time.sleep(4)
    figures = load.finish()
    tokens = cluster.counter(victim, "ringleader_generation_tokens_total")
    print(f"{victim} rejoined: {figures}; it generated {tokens:.0f} tokens")
    assert figures["failed"] == 0 and figures["lost"] == 0 and not load.wrong and tokens > 0, load.errors[:3]
    # the leader's latency metrics count every request it routed, wherever it ran, once
    finished = cluster.counter(leader, "ringleader_request_success_total")
    e2e = cluster.counter(leader, "ringleader_e2e_request_latency_seconds_count")
    assert finished == e2e >= figures["completed"]


def test_a_seeded_sampled_request_resumed_on_another_replica_gives_the_undisturbed_tokens(cluster, tiny_demo):
    leader = cluster.heal()
    gen = Generator.from_pretrained(tiny_demo)
    prompt, n = "a sampled request that outlives its replica", 240
    params = SamplingParams(max_tokens=n, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    undisturbed = gen.generate([gen.tokenizer.encode(prompt)], params)[0]
    client = openai.OpenAI(base_url=cluster.url(leader) + "/v1", api_key="unused", max_retries=0)
    rerouted = cluster.counter(leader, REROUTED)
    extra = {"ignore_eos": True, "return_tokens_as_token_ids": True}
    # a long request first: it takes the leader's own replica, so the next goes to a follower
    hold = client.completions.create(model="tiny", prompt="hold", max_tokens=480, stream=True,
                                     extra_body=extra)  # fmt: skip
    try:
        next(iter(hold))
        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0.9,
                                           top_p=0.95, seed=1234, logprobs=0, stream=True,
                                           extra_body=extra)  # fmt: skip
        chunks = iter(stream)
        ids = []

        def tokens(chunk) -> list[int]:
            lp = chunk.choices[0].logprobs if chunk.choices else None
            return [int(t.removeprefix("token_id:")) for t in (lp.tokens if lp else None) or []]

        while len(ids) < 8:
            ids += tokens(next(chunks))
        followers = [f for f in NAMES if f != leader and cluster.replica(leader, f).get("outstanding")]
        assert len(followers) == 1, f"the sampled request runs on no follower: {cluster.state(leader)}"
        victim = followers[0]
        cluster.nodes[victim].proc.send_signal(signal.SIGKILL)
        before = len(ids)
        for chunk in chunks:
            ids += tokens(chunk)
    finally:
        hold.close()
    moved = cluster.counter(leader, REROUTED) - rerouted
    print(f"\nsampled request on {victim}, killed after {before} tokens had arrived: {len(ids)} tokens; "
          f"{moved:.0f} moved on")  # fmt: skip
    assert moved == 1 and f"moves on from replica {victim}" in cluster.nodes[leader].stderr
    assert ids == undisturbed.token_ids


def test_a_hung_follower_is_taken_out_of_routing_and_its_requests_go_on_elsewhere(cluster, proxy, expected):
    leader = cluster.heal()
    victim = next(n for n in NAMES if n != leader)
    node = cluster.nodes[victim]
    rerouted, failovers = cluster.counter(leader, REROUTED), cluster.counter(leader, FAILOVERS)
    load = Load(proxy, expected, workers=6)
    try:
        time.sleep(2)
        _in_flight(cluster, leader, victim)
        node.proc.send_signal(signal.SIGSTOP)  # a hang: nothing breaks, nothing answers
        hung = time.monotonic()
        wait_for(lambda: member(cluster.state(leader), victim).get("alive") is False, 10,
                 f"the leader {leader} to see {victim} dead")  # fmt: skip
        detected = time.monotonic() - hung
        time.sleep(2)
    finally:
        figures = load.finish()
        node.proc.send_signal(signal.SIGCONT)
    moved = cluster.counter(leader, REROUTED) - rerouted
    lost_replicas = cluster.counter(leader, FAILOVERS) - failovers
    print(f"\nfollower {victim} hung: detected in {detected:.2f} s; {figures}; {moved:.0f} requests moved on")
    assert detected <= 5  # a ceiling for liveness: the chaos benchmark measures it
    assert figures["failed"] == 0 and figures["lost"] == 0 and figures["retried"] == 0, load.errors[:3]
    assert moved >= 1 and lost_replicas == 1 and not load.wrong


def test_a_killed_leader_is_replaced_and_rejoins_as_a_follower(cluster, proxy, expected):
    leader = cluster.heal()
    term = _term(cluster, leader)
    others = [n for n in NAMES if n != leader]
    load = Load(proxy, expected, retry=True)
    try:
        time.sleep(2)
        _in_flight(cluster, leader)
        cluster.nodes[leader].proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        new = cluster.leader(timeout=10, among=others)
        failover = time.monotonic() - killed
        time.sleep(2)
    finally:
        figures = load.finish()
    print(f"\nleader {leader} killed: {new} leads after {failover:.2f} s; {figures}; retries: {load.retries}")
    new_term = _term(cluster, new)
    assert failover <= 10 and new_term > term  # a ceiling for liveness, as above
    assert figures["failed"] == 0 and figures["lost"] == 0 and not load.wrong, load.errors[:3]
    assert figures["retried"] >= 1  # the requests it held broke (and only those were sent again)
    # started again with the same command, it joins as a follower of the new leader, deposing nobody
    cluster.start(leader)
    wait_for(lambda: cluster.replica(new, leader).get("routable"), 20, f"{leader} routable again from {new}")
    back = cluster.state(leader) or {}
    assert (back.get("role"), back.get("leader"), back.get("term")) == ("follower", new, new_term), back
    assert cluster.leader() == new and _term(cluster, new) == new_term
    assert not proxy.two_leaders()  # at no time, the old leader's return included


def test_a_paused_leader_steps_down_and_never_answers_in_an_old_term(cluster, proxy, expected):
    leader = cluster.heal()
    term = _term(cluster, leader)
    node = cluster.nodes[leader]
    load = Load(proxy, expected, retry=True)
    try:
        time.sleep(2)
        _in_flight(cluster, leader)
        node.proc.send_signal(signal.SIGSTOP)
        paused = time.monotonic()
        new = cluster.leader(timeout=10, among=[n for n in NAMES if n != leader])
        new_term_began = time.monotonic()
        time.sleep(max(0.0, 2 * LEASE_MS / 1000 - (time.monotonic() - paused)))
        node.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: (cluster.state(leader) or {}).get("role") not in (None, "leader"), 5,
                 f"the paused leader {leader} to step down")  # fmt: skip
        stepped_down = cluster.state(leader) or {}
        time.sleep(2)
    finally:
        figures = load.finish()
        node.proc.send_signal(signal.SIGCONT)
    print(f"\nleader {leader} paused: {new} leads; the old one says {stepped_down.get('role')} in term "
          f"{stepped_down.get('term')}; {figures}; retries: {load.retries}")  # fmt: skip
    assert new != leader and (stepped_down.get("term") or 0) > term
    late = [r for r in proxy.responses if r[0] > new_term_began and r[2] is not None and r[2] <= term]
    assert not late, late
    assert not proxy.two_leaders()
    assert figures["failed"] == 0 and figures["lost"] == 0 and not load.wrong, load.errors[:3]
    assert figures["retried"] >= 1  # the requests it held were cut when it resumed


def test_a_leader_stopped_with_sigterm_finishes_every_request_it_routed(cluster, proxy, expected):
    leader = cluster.heal()
    load = Load(proxy, expected, workers=6, retry=True)
    stopping = cluster.nodes[leader]
    started = time.monotonic()
    try:
        time.sleep(2)
        _in_flight(cluster, leader)
        stopping.terminate()
        code = stopping.proc.wait(timeout=30)
        new = cluster.leader(timeout=10, among=[n for n in NAMES if n != leader])
        time.sleep(2)
    finally:
        figures = load.finish()
    drained = [line.strip() for line in stopping.lines if "drained in" in line]
    redispatched = [node for when, node in proxy.redispatched if when >= started]
    print(f"\nleader {leader} stopped with SIGTERM: {drained}; {new} leads; {figures}; "
          f"retries: {load.retries}; refused connections the proxy sent on: {len(redispatched)}")  # fmt: skip
    assert code == 0 and drained and "0 unfinished requests failed" in drained[0]
    assert figures["failed"] == 0 and figures["lost"] == 0 and not load.wrong, load.errors[:3]
    # what it had accepted it finished: the only retries are of requests it refused (503) while draining
    assert all(r.endswith("503") for r in load.retries), load.retries
