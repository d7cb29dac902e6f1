"""Fault tolerance with real processes: three emulated nodes (separate ``./launch.sh serve
--cluster`` invocations on loopback), one replica each and every one a front end, under a steady
load of streaming and non-streaming requests from the official openai client, which never retries
on its own (``max_retries=0``): clients bound to members, or a test-side load balancer that sends
each request to the next member answering ``/ready`` with 200 (as HAProxy does).

The tests share one cluster and each starts by healing it (every member running, one leader,
every replica routable from every member), so any of them can run alone or in any order. A
member's fault must cost its survivors' clients no request and no retry: the requests those front
ends had on its replica move to another one, which their ``ringleader_rerouted_requests_total``
shows. Only the connections the dead process itself held break: those requests are retried by the
load, explicitly, counted, and each retry names the member its client was on. Each test prints its
figures."""

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
    Members,
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


def _in_flight(cluster: Cluster, among, replica: str | None = None) -> None:
    """Until the members ``among`` have requests outstanding on ``replica`` (any when None)."""
    wait_for(lambda: cluster.outstanding(replica, among), 10,
             f"requests of {list(among)} in flight on {replica or 'any replica'}")  # fmt: skip


def _load_on_the_others(cluster: Cluster, leader: str, expected) -> Load:
    """Three clients on each other member and one on ``leader``. With as many clients on every
    member, each front end can keep its requests on its own replica (least loaded, ties to its
    own) and never route one to the leader's; with fewer there, the others' requests go to it."""
    others = [n for n in NAMES if n != leader]
    return Load(Members(cluster, [*others * 3, leader]), expected, workers=7, retry=True)


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
    # signed with the secret, but from no member of the configuration: refused by its sender
    stranger = json.dumps({**message, "from": "intruder", "nonce": os.urandom(8).hex()}).encode()
    assert _post(url + "/_control/generate", stranger, _sign(stranger)) == 409
    assert _post(url + "/_control/generate", stranger, _sign(stranger)) == 403  # the same bytes: replayed
    assert _term(cluster, follower) == term and cluster.leader() == leader
    counts = {r: refused()[r] - before[r] for r in reasons}
    print(f"\nrefused control messages on {follower}: {counts}")
    assert counts == {"bad signature": 2, "stale": 1, "replayed": 1}


def test_a_killed_follower_costs_no_request_its_requests_move_on_and_it_rejoins(cluster, proxy, expected):
    leader = cluster.heal()
    victim = next(n for n in NAMES if n != leader)
    survivors = [n for n in NAMES if n != victim]
    rerouted, failovers = cluster.total(REROUTED, survivors), cluster.total(FAILOVERS, survivors)
    load = Load(Members(cluster, survivors), expected, workers=6)
    try:
        time.sleep(2)
        before = load.completed
        _in_flight(cluster, survivors, victim)
        cluster.nodes[victim].proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: member(cluster.state(leader), victim).get("alive") is False, 10,
                 f"the leader {leader} to see {victim} dead")  # fmt: skip
        detected = time.monotonic() - killed
        time.sleep(2)
    finally:
        figures = load.finish()
    moved = cluster.total(REROUTED, survivors) - rerouted
    lost_replicas = cluster.total(FAILOVERS, survivors) - failovers
    print(f"\nfollower {victim} killed: detected in {detected:.2f} s; {figures}; before the kill {before}; "
          f"{moved:.0f} requests moved on")  # fmt: skip
    assert detected <= 5  # a ceiling for liveness: the chaos benchmark measures it
    assert figures["failed"] == 0 and figures["lost"] == 0 and figures["retried"] == 0, load.errors[:3]
    # it had requests in flight, and they went on elsewhere; each front end with some there lost it once
    assert moved >= 1 and 1 <= lost_replicas <= len(survivors)
    assert figures["completed"] > before and not load.wrong
    # the node comes back (a new launch naming the same members), rejoins and is routed to
    cluster.start(victim)
    wait_for(lambda: all(cluster.replica(m, victim).get("routable") for m in survivors), 20,
             f"{victim} routable again from {survivors}")  # fmt: skip
    back = cluster.state(victim) or {}
    assert back.get("role") == "follower" and back.get("leader") == leader, back
    answered = len(proxy.responses)
    load = Load(proxy, expected, workers=6)
    time.sleep(4)
    figures = load.finish()
    tokens = cluster.counter(victim, "ringleader_generation_tokens_total")
    print(f"{victim} rejoined: {figures}; it generated {tokens:.0f} tokens")
    assert figures["failed"] == 0 and figures["lost"] == 0 and not load.wrong and tokens > 0, load.errors[:3]
    # each front end's latency metrics count every request it routed, wherever it ran, once
    finished = cluster.total("ringleader_request_success_total")
    e2e = cluster.total("ringleader_e2e_request_latency_seconds_count")
    assert finished == e2e >= figures["completed"]
    spread = {n for _, n, _ in proxy.responses[answered:]}
    assert spread == set(NAMES), f"the load balancer sent to {spread} only"  # every member serves


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
    survivors = [n for n in NAMES if n != victim]
    node = cluster.nodes[victim]
    rerouted, failovers = cluster.total(REROUTED, survivors), cluster.total(FAILOVERS, survivors)
    load = Load(Members(cluster, survivors), expected, workers=6)
    try:
        time.sleep(2)
        _in_flight(cluster, survivors, victim)
        node.proc.send_signal(signal.SIGSTOP)  # a hang: nothing breaks, nothing answers
        hung = time.monotonic()
        wait_for(lambda: member(cluster.state(leader), victim).get("alive") is False, 10,
                 f"the leader {leader} to see {victim} dead")  # fmt: skip
        detected = time.monotonic() - hung
        time.sleep(2)
    finally:
        figures = load.finish()
        node.proc.send_signal(signal.SIGCONT)
    moved = cluster.total(REROUTED, survivors) - rerouted
    lost_replicas = cluster.total(FAILOVERS, survivors) - failovers
    print(f"\nfollower {victim} hung: detected in {detected:.2f} s; {figures}; {moved:.0f} requests moved on")
    assert detected <= 5  # a ceiling for liveness: the chaos benchmark measures it
    assert figures["failed"] == 0 and figures["lost"] == 0 and figures["retried"] == 0, load.errors[:3]
    assert moved >= 1 and 1 <= lost_replicas <= len(survivors) and not load.wrong


def test_a_killed_leader_costs_the_clients_of_other_members_nothing_and_rejoins_as_a_follower(
    cluster, proxy, expected
):
    leader = cluster.heal()
    term = _term(cluster, leader)
    others = [n for n in NAMES if n != leader]
    rerouted = cluster.total(REROUTED, others)
    polled = len(proxy.polls)
    load = _load_on_the_others(cluster, leader, expected)
    try:
        time.sleep(2)
        _in_flight(cluster, others, leader)  # survivors' requests run on the leader's replica
        served = dict(load.by_target)
        cluster.nodes[leader].proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        new = cluster.leader(timeout=10, among=others)
        failover = time.monotonic() - killed
        time.sleep(2)
    finally:
        figures = load.finish()
    moved = cluster.total(REROUTED, others) - rerouted
    print(f"\nleader {leader} killed: {new} leads after {failover:.2f} s; {figures}; {moved:.0f} requests of "
          f"{others} moved on; retries: {load.retries}")  # fmt: skip
    new_term = _term(cluster, new)
    assert failover < 5 and new_term > term
    assert figures["failed"] == 0 and figures["lost"] == 0 and not load.wrong, load.errors[:3]
    # only the connections the dead process held broke: no client of another member saw an error
    assert figures["retried"] >= 1 and all(r.startswith(f"{leader}:") for r in load.retries), load.retries
    assert moved >= 1  # their requests on its replica went on elsewhere
    assert all(load.by_target[n] > served.get(n, 0) for n in others)  # and they went on being served
    # started again with the same command, it joins as a follower of the new leader, deposing nobody
    cluster.start(leader)
    wait_for(lambda: cluster.replica(new, leader).get("routable"), 20, f"{leader} routable again from {new}")
    back = cluster.state(leader) or {}
    assert (back.get("role"), back.get("leader"), back.get("term")) == ("follower", new, new_term), back
    assert cluster.leader() == new and _term(cluster, new) == new_term
    assert len(proxy.polls) > polled and not proxy.two_leaders()  # at no time, its return included


def test_a_paused_leader_steps_down_and_the_clients_of_other_members_see_nothing(cluster, proxy, expected):
    leader = cluster.heal()
    term = _term(cluster, leader)
    node = cluster.nodes[leader]
    others = [n for n in NAMES if n != leader]
    load = _load_on_the_others(cluster, leader, expected)
    try:
        time.sleep(2)
        _in_flight(cluster, others, leader)
        node.proc.send_signal(signal.SIGSTOP)
        paused = time.monotonic()
        new = cluster.leader(timeout=10, among=others)
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
    assert not proxy.two_leaders()  # it never said it led once the new leader did
    assert figures["failed"] == 0 and figures["lost"] == 0 and not load.wrong, load.errors[:3]
    assert all(r.startswith(f"{leader}:") for r in load.retries), load.retries  # others' clients: none


def test_a_leader_stopped_with_sigterm_finishes_every_request_it_routed(cluster, proxy, expected):
    leader = cluster.heal()
    load = Load(proxy, expected, workers=6, retry=True)
    stopping = cluster.nodes[leader]
    started = time.monotonic()
    try:
        time.sleep(2)
        _in_flight(cluster, [leader])
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
