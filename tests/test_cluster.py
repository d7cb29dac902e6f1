"""Fault tolerance with real processes: three emulated nodes (separate ``./launch.sh serve
--cluster`` invocations on loopback), one replica each, under a steady load of streaming and
non-streaming requests from the official openai client through a test-side proxy that sends
traffic to whichever node answers ``/ready`` with 200 (as HAProxy does with Patroni).

The tests run in order on one cluster: forged messages, a follower killed (and rejoining), the
leader killed (and rejoining), the leader paused past its lease. Each prints its figures."""

import hashlib
import hmac
import json
import os
import signal
import time
import urllib.request

import pytest
from cluster_harness import LEASE_MS, NAMES, SECRET, Cluster, Load, Proxy, expected_outputs


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


def test_forged_and_replayed_control_messages_are_refused_and_counted(cluster):
    leader = cluster.leader()
    follower = next(n for n in NAMES if n != leader)
    url = cluster.url(follower)
    term = cluster.state(follower)["term"]
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
    old = json.dumps({**message, "term": 0, "nonce": "n-old"}).encode()
    assert _post(url + "/_control/generate", old, _sign(old)) == 409
    assert _post(url + "/_control/generate", old, _sign(old)) == 403  # the same bytes again: replayed
    assert cluster.state(follower)["term"] == term and cluster.leader() == leader
    metrics = urllib.request.urlopen(url + "/metrics").read().decode()
    counts = {r: 0.0 for r in ("bad signature", "stale", "replayed")}
    for line in metrics.splitlines():
        for reason in counts:
            if line.startswith(f'ringleader_control_rejected_total{{reason="{reason}"}}'):
                counts[reason] = float(line.split()[-1])
    print(f"\nrefused control messages on {follower}: {counts}")
    assert counts["bad signature"] == 2 and counts["stale"] == 1 and counts["replayed"] == 1


def test_a_killed_follower_costs_no_request_and_rejoins(cluster, proxy, expected):
    leader = cluster.leader()
    victim = next(n for n in NAMES if n != leader)
    load = Load(proxy, expected)
    time.sleep(3)
    before = load.completed
    cluster.nodes[victim].proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    detected = None
    while time.monotonic() - killed < 10:
        state = cluster.state(leader)
        if state and not next(m for m in state["members"] if m["name"] == victim)["alive"]:
            detected = time.monotonic() - killed
            break
        time.sleep(0.05)
    time.sleep(3)
    figures = load.finish()
    print(f"\nfollower {victim} killed: detected in {detected:.2f} s; {figures}; before the kill {before}")
    assert detected is not None and detected <= 3
    assert figures["failed"] == 0 and figures["lost"] == 0, load.errors[:3]
    assert figures["completed"] > before and not load.wrong
    # the node comes back (a new launch naming the same members), rejoins and is routed to
    cluster.start(victim)
    deadline = time.monotonic() + 20
    routable = False
    while not routable and time.monotonic() < deadline:
        rows = cluster.state(cluster.leader())["replicas"] or []
        routable = any(r["name"] == victim and r["routable"] for r in rows)
        time.sleep(0.1)
    assert routable, cluster.state(cluster.leader())
    load = Load(proxy, expected, workers=6)
    time.sleep(4)
    figures = load.finish()
    served = urllib.request.urlopen(cluster.url(victim) + "/metrics").read().decode()
    tokens = next(float(line.split()[-1]) for line in served.splitlines()
                  if line.startswith("ringleader_generation_tokens_total"))  # fmt: skip
    print(f"{victim} rejoined: {figures}; it generated {tokens:.0f} tokens")
    assert figures["failed"] == 0 and not load.wrong and tokens > 0
    # the leader's latency metrics count every request it routed, wherever it ran, once
    leader_metrics = urllib.request.urlopen(cluster.url(cluster.leader()) + "/metrics").read().decode()
    finished = sum(float(line.split()[-1]) for line in leader_metrics.splitlines()
                   if line.startswith("ringleader_request_success_total"))  # fmt: skip
    e2e = next(float(line.split()[-1]) for line in leader_metrics.splitlines()
               if line.startswith("ringleader_e2e_request_latency_seconds_count"))  # fmt: skip
    assert finished == e2e >= figures["completed"]


def test_a_hung_follower_is_taken_out_of_routing_and_its_requests_go_on_elsewhere(cluster, proxy, expected):
    leader = cluster.leader()
    victim = next(n for n in NAMES if n != leader)
    load = Load(proxy, expected, workers=6)
    time.sleep(2)
    cluster.nodes[victim].proc.send_signal(signal.SIGSTOP)  # a hang: nothing breaks, nothing answers
    hung = time.monotonic()
    detected = None
    while time.monotonic() - hung < 10:
        member = next(m for m in cluster.state(leader)["members"] if m["name"] == victim)
        if not member["alive"]:
            detected = time.monotonic() - hung
            break
        time.sleep(0.05)
    time.sleep(2)
    figures = load.finish()
    cluster.nodes[victim].proc.send_signal(signal.SIGCONT)
    print(f"\nfollower {victim} hung: detected in {detected:.2f} s; {figures}")
    assert detected is not None and detected <= 3
    assert figures["failed"] == 0 and figures["lost"] == 0 and not load.wrong, load.errors[:3]


def test_a_killed_leader_is_replaced_within_5s_and_clients_finish(cluster, proxy, expected):
    leader = cluster.leader()
    term = cluster.state(leader)["term"]
    load = Load(proxy, expected, retry_broken_streams=True)
    time.sleep(3)
    cluster.nodes[leader].proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    new = cluster.leader(timeout=10)
    failover = time.monotonic() - killed
    time.sleep(3)
    figures = load.finish()
    print(f"\nleader {leader} killed: {new} leads after {failover:.2f} s; {figures}")
    assert new != leader and failover <= 5
    assert cluster.state(new)["term"] > term
    assert figures["failed"] == 0 and figures["lost"] == 0 and not load.wrong, load.errors[:3]
    assert not proxy.two_leaders()
    cluster.start(leader)  # back as a follower


def test_a_paused_leader_steps_down_and_never_answers_in_an_old_term(cluster, proxy, expected):
    leader = cluster.leader()
    term = cluster.state(leader)["term"]
    load = Load(proxy, expected, retry_broken_streams=True)
    time.sleep(2)
    node = cluster.nodes[leader]
    node.proc.send_signal(signal.SIGSTOP)
    paused = time.monotonic()
    new = cluster.leader(timeout=10, among=[n for n in NAMES if n != leader])
    new_term_began = time.monotonic()
    time.sleep(max(0.0, 2 * LEASE_MS / 1000 - (time.monotonic() - paused)))
    node.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (cluster.state(leader) or {}).get("role") == "leader":
        time.sleep(0.05)
    stepped_down = cluster.state(leader)
    time.sleep(2)
    figures = load.finish()
    print(f"\nleader {leader} paused: {new} leads; the old one says {stepped_down['role']} in term "
          f"{stepped_down['term']}; {figures}")  # fmt: skip
    assert new != leader and stepped_down["role"] != "leader" and stepped_down["term"] > term
    late = [r for r in proxy.responses if r[0] > new_term_began and r[2] is not None and r[2] <= term]
    assert not late, late
    assert not proxy.two_leaders()
    assert figures["failed"] == 0 and not load.wrong, load.errors[:3]


def test_a_leader_stopped_with_sigterm_finishes_every_request_it_routed(cluster, proxy, expected):
    for name, node in cluster.nodes.items():  # the paused one is back; everyone is up
        if node.proc.poll() is not None:
            cluster.start(name)
    leader = cluster.leader()
    load = Load(proxy, expected, workers=6, retry_broken_streams=False)
    time.sleep(2)
    stopping = cluster.nodes[leader]
    stopping.terminate()
    code = stopping.proc.wait(timeout=30)
    new = cluster.leader(timeout=10)
    time.sleep(2)
    figures = load.finish()
    drained = [line.strip() for line in stopping.lines if "drained in" in line]
    print(f"\nleader {leader} stopped with SIGTERM: {drained}; {new} leads; {figures}")
    assert code == 0 and drained and "0 unfinished requests failed" in drained[0]
    assert figures["failed"] == 0 and figures["lost"] == 0 and not load.wrong, load.errors[:3]
