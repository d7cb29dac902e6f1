"""A hang inside a multi-rank replica: one of its tensor-parallel ranks stops (SIGSTOP), so its
head's step never ends while the member itself keeps answering heartbeats. Past the step deadline
the member reports the replica stalled and the leader moves its requests to a live replica."""

import signal
import time

import psutil
import pytest

from server.testing.cluster import Endpoint, Load, counter, expected_outputs, get, wait_for
from server.testing.processes import LaunchedServer, free_port

SECRET = "stall-secret"


@pytest.mark.parametrize("stalled_leads", [False, True], ids=["follower-stalls", "leader-stalls"])
def test_a_hung_tensor_parallel_rank_moves_its_replicas_requests_elsewhere(tiny_demo, stalled_leads):
    expected = expected_outputs(tiny_demo)
    ports = {"a": free_port(), "b": free_port(), "w": free_port()}
    spec = ",".join(f"{n}=http://127.0.0.1:{p}" + ("#witness" if n == "w" else "") for n, p in ports.items())
    env = {"RINGLEADER_CLUSTER_SECRET": SECRET}
    common = ["--model", str(tiny_demo), "--threads", "1", "--kv-cache-mib", "4", "--cluster", spec]
    witness = LaunchedServer("--cluster", spec, "--name", "w", command="witness", port=ports["w"],
                             ready_path="/health", env=env)  # fmt: skip
    a = LaunchedServer(*common, "--name", "a", port=ports["a"], ready_path="/health", env=env, defer=True)
    if stalled_leads:
        a.proc.send_signal(signal.SIGSTOP)  # held back until b leads
    b = LaunchedServer(*common, "--name", "b", "--tp", "2", "--step-deadline", "2", "--timeout", "60",
                       port=ports["b"], ready_path="/health", env=env, defer=True)  # fmt: skip
    try:
        first, second = (b, a) if stalled_leads else (a, b)
        first.wait()
        name = "b" if stalled_leads else "a"
        wait_for(first.answers_ready, 15, f"{name} to lead with the witness's vote")
        if stalled_leads:
            a.proc.send_signal(signal.SIGCONT)
        second.wait()
        leader = first

        def routable() -> bool:
            rows = (get(leader.base + "/cluster")[1] or {}).get("replicas") or []
            return sum(bool(r.get("routable")) for r in rows) == 2

        wait_for(routable, 15, f"both replicas routable from the leader {name}")
        ranks = psutil.Process(b.proc.pid).children(recursive=True)
        rank1 = next((p for p in ranks if p.environ().get("RANK") == "1"), None)
        assert rank1 is not None, f"no rank 1 among b's processes {ranks}"
        rerouted = counter(leader.base, "ringleader_rerouted_requests_total")
        failovers = counter(leader.base, "ringleader_failovers_total")
        load = Load(Endpoint(leader.base + "/v1"), expected, workers=6)
        try:
            time.sleep(2)
            rank1.send_signal(signal.SIGSTOP)  # b's head now waits in an all-reduce that never ends
            time.sleep(6)
        finally:
            figures = load.finish()
            rank1.send_signal(signal.SIGCONT)
        said = "moves on from replica b" in leader.stderr
        moved = counter(leader.base, "ringleader_rerouted_requests_total") - rerouted
        lost_replicas = counter(leader.base, "ringleader_failovers_total") - failovers
        print(f"\ntp rank 1 of b hung ({'b' if leader is b else 'a'} leads): {figures}; {moved:.0f} moved on")
        assert figures["failed"] == 0 and figures["lost"] == 0 and figures["retried"] == 0, load.errors[:3]
        assert not load.wrong
        assert said and moved >= 1 and lost_replicas == 1  # b had requests in flight; they went on on a
    finally:
        for node in (a, b, witness):
            node.kill()
