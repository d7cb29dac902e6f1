"""Two nodes and a witness, each test with a fresh trio of its own: either node can be lost and the
other leads with the witness's vote; the witness and a node lost together stop the cluster once the
grace for an election has run out; a follower serves API calls itself, through an election, and
answers 503 once it has heard from no leader for that grace."""

import signal
import time
from pathlib import Path

import openai
import pytest

from server.testing.cluster import get, wait_for
from server.testing.processes import LaunchedServer, free_port

SECRET = "witness-secret"
LONGEST_ELECTION_TIMEOUT_S = 3.0  # twice --election-timeout-ms, 1500 by default
GRACE_S = 3.0  # --serve-without-leader-ms: how long a member serves after it last knew a leader


class Trio:
    def __init__(self, model, state: Path):
        ports = {"a": free_port(), "b": free_port(), "w": free_port()}
        spec = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in ports.items()) + "#witness"  # w is last
        env = {"RINGLEADER_CLUSTER_SECRET": SECRET}
        self.witness = LaunchedServer("--cluster", spec, "--name", "w", "--state-dir", str(state / "w"),
                                      command="witness", port=ports["w"],
                                      ready_path="/health", env=env)  # fmt: skip
        self.nodes = {}
        for n in ("a", "b"):
            self.nodes[n] = LaunchedServer("--model", str(model), "--kv-cache-mib", "4", "--threads", "1",
                                           "--cluster", spec, "--name", n, "--state-dir", str(state / n),
                                           "--serve-without-leader-ms", str(GRACE_S * 1000), port=ports[n],
                                           ready_path="/health", env=env, defer=True)  # fmt: skip
        for node in self.nodes.values():
            node.wait()

    def leader(self, among=("a", "b"), timeout: float = 15.0) -> str:
        return wait_for(lambda: next((n for n in among if self.nodes[n].leads()), None), timeout,
                        f"a leader among {list(among)} (leading with a lease)")  # fmt: skip

    def witness_state(self) -> dict:
        return get(self.witness.base + "/cluster")[1] or {}

    def kill(self) -> None:
        for server in (*self.nodes.values(), self.witness):
            server.kill()


@pytest.fixture()
def trio(tiny_demo, tmp_path):
    t = Trio(tiny_demo, tmp_path)
    yield t
    t.kill()


def _client(node: LaunchedServer, timeout: float = 30.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.base + "/v1", api_key="unused", max_retries=0, timeout=timeout)


def test_two_nodes_and_a_witness_survive_one_loss_and_stop_at_two(trio):
    leader = trio.leader()
    other = "b" if leader == "a" else "a"
    assert not trio.witness.answers_ready()
    # a witness never leads: by its own role, in every term it sees
    wait_for(lambda: trio.witness_state().get("leader") == leader, 5, f"the witness to follow {leader}")
    assert trio.witness_state().get("role") == "follower"
    trio.nodes[leader].proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    trio.leader(among=[other], timeout=10)
    took = time.monotonic() - killed
    print(f"\nwith a witness: {other} leads {took:.2f} s after {leader} was killed")
    assert took < 10  # a ceiling for liveness: the chaos benchmark measures failover
    wait_for(lambda: trio.witness_state().get("leader") == other, 5, f"the witness to follow {other}")
    state = trio.witness_state()
    assert state.get("role") == "follower" and state.get("term", 0) >= 2, state
    served = _client(trio.nodes[other]).completions.create(model="tiny", prompt="still serving", max_tokens=4)
    assert served.choices and served.choices[0].text
    # the witness too: one member of three is left, no majority, and it stops serving once its lease
    # and the grace after it have run out
    trio.witness.kill()
    lost = time.monotonic()
    wait_for(lambda: not trio.nodes[other].answers_ready(), GRACE_S + 5,
             f"{other} to stop serving without a majority")  # fmt: skip
    stopped = time.monotonic() - lost
    with pytest.raises(openai.APIStatusError) as refused:
        _client(trio.nodes[other], timeout=10).completions.create(model="tiny", prompt="x", max_tokens=2)
    assert refused.value.status_code == 503 and (refused.value.body or {}).get("code") == "no_leader"
    until = time.monotonic() + LONGEST_ELECTION_TIMEOUT_S + 0.5  # it could have stood for election
    while time.monotonic() < until:
        assert not trio.nodes[other].answers_ready(), f"{other} serves again with no majority"
        time.sleep(0.1)
    print(f"the witness killed too: {other} stopped serving after {stopped:.2f} s")


def test_a_follower_serves_itself_through_an_election_and_answers_503_once_no_leader_is_heard(trio):
    leader = trio.leader()
    name = "b" if leader == "a" else "a"
    follower = trio.nodes[name]
    wait_for(lambda: (get(follower.base + "/cluster")[1] or {}).get("leader") == leader, 5,
             f"the follower to know the leader {leader}")  # fmt: skip
    term = (get(trio.nodes[leader].base + "/cluster")[1] or {}).get("term")
    greedy = {"model": "tiny", "prompt": "via", "max_tokens": 4, "temperature": 0}
    raw = _client(follower).completions.with_raw_response.create(**greedy)
    # answered by the follower itself, in the term it knows
    assert raw.headers.get("X-Ringleader-Member") == name
    assert raw.headers.get("X-Ringleader-Term") == str(term)
    stream = _client(follower).completions.create(**greedy, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == raw.parse().choices[0].text
    # the leader and the witness hang: no majority for anyone; the follower goes on serving for the
    # grace (an election could still end it), then says it has no leader, without waiting on one
    for server in (trio.nodes[leader], trio.witness):
        server.proc.send_signal(signal.SIGSTOP)
    paused = time.monotonic()
    try:
        during = _client(follower, timeout=15).completions.create(**greedy)
        assert during.choices[0].text == raw.parse().choices[0].text
        served_for = wait_for(lambda: get(follower.base + "/ready")[0] == 503 and time.monotonic() - paused,
                              GRACE_S + 5, "the follower to stop serving without a leader")  # fmt: skip
        for moment in ("just stopped", "stopped for a while"):
            sent = time.monotonic()
            with pytest.raises(openai.APIStatusError) as refused:
                _client(follower, timeout=15).completions.create(model="tiny", prompt="x", max_tokens=2)
            took = time.monotonic() - sent
            print(f"\nleader {moment}: the follower answered {refused.value.status_code} after {took:.2f} s")
            assert refused.value.status_code == 503 and (refused.value.body or {}).get("code") == "no_leader"
            assert took < 2  # not a hang: it says so at once
            assert get(follower.base + "/ready")[0] == 503
            time.sleep(1)
        print(f"served for {served_for:.2f} s after the leader and the witness hung (grace {GRACE_S:g} s)")
        assert GRACE_S - 1.5 <= served_for <= GRACE_S + 5
    finally:
        for server in (trio.nodes[leader], trio.witness):
            server.proc.send_signal(signal.SIGCONT)
