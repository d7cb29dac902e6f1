"""Elastic membership with real processes on loopback: a cluster of three grows to four and
shrinks again while it serves a steady load of openai-client requests that never retry on their
own (``max_retries=0``); changes go through the operator's command (``python -m server.members``)
and ``serve --join``; unsafe and forged changes are refused and counted."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from server.cluster import Signer
from server.testing.cluster import SECRET, Cluster, Endpoint, Load, Members, Proxy, expected_outputs, wait_for
from server.testing.processes import ROOT, LaunchedServer, free_port

CHANGES = "ringleader_membership_changes_total"


@pytest.fixture(scope="module")
def expected(tiny_demo):
    return expected_outputs(tiny_demo)


@pytest.fixture(scope="module")
def cluster(tiny_demo):
    c = Cluster(tiny_demo)
    yield c
    c.stop()


def members(cluster: Cluster, name: str) -> set[str]:
    """The members of ``name``'s configuration, once it is committed (else an empty set)."""
    config = (cluster.state(name) or {}).get("config") or {}
    return set(config.get("members") or []) if config.get("id") == config.get("committed") else set()


def operator(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RINGLEADER_CLUSTER_SECRET": SECRET}
    return subprocess.run([sys.executable, "-m", "server.members", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)  # fmt: skip


def changes(cluster: Cluster, name: str, outcome: str) -> float:
    text = urllib.request.urlopen(cluster.url(name) + "/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(CHANGES) and f'outcome="{outcome}"' in line)  # fmt: skip


def test_the_cluster_grows_and_shrinks_under_load_and_a_restarted_member_keeps_the_new_configuration(
    cluster, expected
):
    leader = cluster.heal()
    # a fourth member joins through a follower; the members route to its replica once it is loaded
    follower = next(n for n in cluster.names if n != leader)
    load = Load(Members(cluster, ("n1", "n2", "n3")), expected, workers=6)
    try:
        cluster.join("n4", via=follower)
        loaded = time.monotonic()
        wait_for(lambda: cluster.counter("n4", "ringleader_generation_tokens_total") > 0, 5,
                 "the new member's replica to run requests of the others")  # fmt: skip
        served_after = time.monotonic() - loaded
        wait_for(lambda: all(members(cluster, n) == {"n1", "n2", "n3", "n4"} for n in cluster.names), 5,
                 "every member to hold the configuration with n4")  # fmt: skip
    finally:
        grown = load.finish()
    print(f"\nn4 joined under load: its replica ran requests {served_after:.2f} s after loading; {grown}")
    assert grown["failed"] == 0 and grown["lost"] == 0 and not grown["retried"] and grown["completed"] > 0
    assert cluster.counter(leader, CHANGES) >= 1

    # a member leaves under load (its clients come through a load balancer): nothing fails
    leaving = next(n for n in ("n1", "n2", "n3") if n != leader)
    proxy = Proxy(cluster)
    load = Load(proxy, expected, workers=6)
    try:
        time.sleep(1)
        left = operator("leave", cluster.url(leaving))
        assert left.returncode == 0, left.stdout + left.stderr
        time.sleep(1)
    finally:
        shrunk = load.finish()
        proxy.stop()
    code = cluster.nodes[leaving].proc.wait(timeout=30)
    rest = [n for n in cluster.names if n != leaving]
    print(f"{leaving} left under load: {left.stdout.strip()!r}; exit {code}; {shrunk}; "
          f"{len(proxy.redispatched)} refused connections sent on")  # fmt: skip
    assert code == 0 and shrunk["failed"] == 0 and shrunk["lost"] == 0, load.errors[:3]
    assert shrunk["completed"] > 0
    wait_for(lambda: all(members(cluster, n) == set(rest) for n in rest), 5,
             f"the configuration without {leaving}")  # fmt: skip
    assert not any(r.get("name") == leaving for r in cluster.state(rest[0])["replicas"])

    # a member restarted with its launch list comes back with the configuration it had stored
    restarted = next(n for n in rest if n not in (leader, "n4"))
    cluster.nodes[restarted].stop()
    cluster.start(restarted)
    state = wait_for(lambda: members(cluster, restarted) and cluster.state(restarted), 15,
                     f"{restarted} back with a committed configuration")  # fmt: skip
    assert set(state["config"]["members"]) == set(rest) and leaving not in state["config"]["members"]
    assert "replaces --cluster" in cluster.nodes[restarted].stderr

    # with one member dead, a change that would leave no live majority is refused and nothing stops
    victim = restarted
    cluster.nodes[victim].proc.send_signal(signal.SIGKILL)
    survivors = [n for n in rest if n != victim]
    wait_for(lambda: not any(m.get("alive") for m in cluster.state(leader)["members"] if m["name"] == victim),
             10, f"the leader to see {victim} dead")  # fmt: skip
    other = next(n for n in survivors if n != leader)
    load = Load(Members(cluster, survivors), expected, workers=4)
    try:
        refused = operator("remove", cluster.url(other), other)
        assert refused.returncode == 1 and "fewer than the 2 of a majority" in refused.stderr, refused.stderr
        assert members(cluster, leader) == set(rest)
        # the dead member is removed by name, through any member
        removed = operator("remove", cluster.url(other), victim)
        assert removed.returncode == 0, removed.stderr
        time.sleep(1)
    finally:
        last = load.finish()
    print(f"with {victim} dead: removing {other} refused ({refused.stderr.strip()!r}); {victim} removed "
          f"({removed.stdout.strip()!r}); {last}")  # fmt: skip
    assert last["failed"] == 0 and last["lost"] == 0 and last["completed"] > 0, load.errors[:3]
    wait_for(lambda: all(members(cluster, n) == set(survivors) for n in survivors), 5,
             f"the configuration of {survivors}")  # fmt: skip
    assert changes(cluster, leader, "refused") >= 1 and changes(cluster, leader, "committed") >= 2


def test_a_join_with_a_bad_secret_a_forged_or_replayed_change_and_a_duplicate_name_are_refused(
    tiny_demo, tmp_path
):
    # a one-member cluster of its own: nothing here depends on the other test's cluster
    port, model = free_port(), tiny_demo
    env = {"RINGLEADER_CLUSTER_SECRET": SECRET}
    solo = LaunchedServer("--model", str(model), "--threads", "1", "--kv-cache-mib", "4", "--cluster",
                          f"a=http://127.0.0.1:{port}", "--name", "a", "--state-dir", str(tmp_path / "a"),
                          port=port, ready_path="/health", env=env)  # fmt: skip
    try:
        wait_for(solo.leads, 10, "a one-member cluster to lead")
        url = solo.base

        def post(path: str, body: bytes, headers: dict) -> tuple[int, dict]:
            req = urllib.request.Request(url + path, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read() or b"{}")

        intruder = free_port()
        wrong, right = Signer("not the secret"), Signer(SECRET)
        join = {"from": "b", "term": 0, "url": f"http://127.0.0.1:{intruder}"}
        assert post("/_control/join", *wrong.sign(join))[0] == 403  # a bad secret
        body, headers = right.sign({**join, "from": "a"})
        status, answer = post("/_control/join", body, headers)
        assert status == 409 and "already in the cluster" in answer["error"]  # a duplicate name
        assert post("/_control/join", body, headers)[0] == 403  # the same bytes again: replayed
        forged = json.loads(body)
        forged["from"] = "b"
        assert post("/_control/join", json.dumps(forged).encode(), headers)[0] == 403  # altered
        state = json.loads(urllib.request.urlopen(url + "/cluster").read())
        assert state["config"] == {"id": 1, "committed": 1, "members": ["a"]}
        metrics = urllib.request.urlopen(url + "/metrics").read().decode()
        rejected = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("ringleader_control_rejected_total{")}  # fmt: skip
        assert rejected == {"bad signature": 2.0, "replayed": 1.0}, rejected
        assert f'{CHANGES}{{kind="join",outcome="refused"}} 1.0' in metrics
        # a real member started with the wrong secret says why it cannot join, and exits
        bad = subprocess.run([sys.executable, "-m", "server", "--model", str(model), "--threads", "1",
                              "--kv-cache-mib", "4", "--join", url, "--name", "b", "--port", str(intruder),
                              "--state-dir", str(tmp_path / "b"), "--cluster-secret", "not the secret"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert bad.returncode == 2, bad.stderr[-2000:]
        assert "could not join the cluster: control message refused: bad signature" in bad.stderr
    finally:
        solo.kill()


def test_a_front_end_with_no_replica_joins_and_serves_through_the_other_members_replicas(
    tiny_demo, tmp_path, expected
):
    port, fe_port = free_port(), free_port()
    while fe_port == port:
        fe_port = free_port()
    env = {"RINGLEADER_CLUSTER_SECRET": SECRET}
    common = ("--model", str(tiny_demo), "--threads", "1", "--kv-cache-mib", "4")
    solo = LaunchedServer(*common, "--cluster", f"a=http://127.0.0.1:{port}", "--name", "a", "--state-dir",
                          str(tmp_path / "a"), port=port, ready_path="/health", env=env)  # fmt: skip
    front = None
    try:
        wait_for(solo.leads, 10, "a one-member cluster to lead")
        front = LaunchedServer(*common, "--no-replica", "--join", solo.base, "--name", "fe",
                               "--state-dir", str(tmp_path / "fe"), port=fe_port, ready_path="/ready",
                               env=env)  # fmt: skip
        assert "as a front end with no replica" in front.stderr
        state = json.loads(urllib.request.urlopen(front.base + "/cluster").read())
        assert [r["name"] for r in state["replicas"]] == ["a"]  # it routes only to a's replica
        seen = json.loads(urllib.request.urlopen(solo.base + "/cluster").read())
        assert {r["name"]: r["routable"] for r in seen["replicas"]} == {"a": True, "fe": False}

        def fe_replica_state():  # what a knows of it from fe's first heartbeat acknowledgement
            seen = json.loads(urllib.request.urlopen(solo.base + "/cluster").read())
            return next(m for m in seen["members"] if m["name"] == "fe")["replica"].get("state")

        wait_for(lambda: fe_replica_state() is not None, 10, "a to hear from fe")
        assert fe_replica_state() == "none"
        load = Load(Endpoint(front.base + "/v1", "fe"), expected, workers=2)
        time.sleep(3)
        figures = load.finish()
        ran = float(urllib.request.urlopen(solo.base + "/metrics").read().decode().split(
            "\nringleader_generation_tokens_total ")[1].split()[0])  # fmt: skip
        print(f"\na front end with no replica, through a's: {figures}; a generated {ran:.0f} tokens")
        assert figures["failed"] == 0 and figures["completed"] > 0 and not load.wrong, load.errors[:3]
        assert ran > 0
    finally:
        if front is not None:
            front.kill()
        solo.kill()
