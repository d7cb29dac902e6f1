"""The election rules of server/cluster.py, with three members in one process whose messages go
straight to each other's handlers: a member that comes back from a pause cannot raise its term
and depose a live leader (pre-vote), a leader that is gone is replaced, followers learn every
replica's state from the leader's heartbeats, and terms and votes survive a restart."""

import asyncio
import json
import time

import pytest

from server.cluster import Cluster, ConfigError, Member, Refused, Signer

NAMES = ("n1", "n2", "n3")


def make_cluster(witness: str | None = None) -> dict[str, Cluster]:
    members = [Member(n, f"http://{n}.invalid", witness=n == witness) for n in NAMES]
    nodes = {n: Cluster(n, members, Signer("secret")) for n in NAMES}
    down: set[str] = set()
    hung: set[str] = set()
    sent: list[tuple[str, str]] = []  # (sender, path) of every message

    async def post(sender: Cluster, name: str, path: str, message: dict):
        sent.append((sender.me, path))
        if name in down or sender.me in down:
            return None  # a dead member answers nothing
        if name in hung:
            await asyncio.sleep(1.0)  # a paused member: the request times out
            return None
        message = {**message, "from": sender.me, "term": sender.term}
        target = nodes[name]
        return target.handle_vote(message) if path.endswith("/vote") else target.handle_heartbeat(message)

    for node in nodes.values():
        node._post = lambda name, path, message, node=node: post(node, name, path, message)
    nodes["down"], nodes["hung"], nodes["sent"] = down, hung, sent
    return nodes


def elect_n1(nodes) -> None:
    for name in NAMES:
        nodes[name].last_contact -= 5  # nobody has heard a leader yet
    asyncio.run(nodes["n1"]._election())
    asyncio.run(nodes["n1"]._heartbeat_round())
    assert nodes["n1"].is_leader() and nodes["n1"].term == 1
    assert all(nodes[n].leader == "n1" and nodes[n].term == 1 for n in ("n2", "n3"))


def test_a_member_back_from_a_pause_does_not_depose_the_leader():
    nodes = make_cluster()
    elect_n1(nodes)
    late = nodes["n3"]
    late.last_contact = time.monotonic() - 5  # paused past its election timeout, then resumed
    asyncio.run(late._election())
    # the others heard n1 recently: no pre-vote majority, so n3 keeps its term and asks no votes
    assert late.term == 1 and late.role == "follower"
    assert nodes["n2"].term == 1 and nodes["n2"].voted_for == "n1"  # its vote of term 1 stands
    asyncio.run(nodes["n1"]._heartbeat_round())
    assert nodes["n1"].is_leader() and nodes["n1"].term == 1  # n3's answer did not end its term
    assert late.leader == "n1"


def test_a_pre_vote_changes_nothing_and_a_real_vote_is_once_per_term():
    nodes = make_cluster()
    voter = nodes["n2"]
    voter.last_contact -= 5
    pre = voter.handle_vote({"pre": True, "proposed": 3, "from": "n1", "term": 2, "config_id": 1})
    assert pre["granted"] and voter.term == 0 and voter.voted_for is None
    stale = voter.handle_vote({"pre": True, "proposed": 0, "from": "n1", "term": 0, "config_id": 1})
    assert not stale["granted"]
    assert voter.handle_vote({"from": "n1", "term": 3, "config_id": 1})["granted"] and voter.term == 3
    # already voted in term 3
    assert not voter.handle_vote({"from": "n3", "term": 3, "config_id": 1})["granted"]


def test_a_dead_leader_is_replaced_by_a_pre_voted_candidate():
    nodes = make_cluster()
    elect_n1(nodes)
    nodes["down"].add("n1")
    for name in ("n2", "n3"):
        nodes[name].last_contact -= 5  # n1's heartbeats stopped
    asyncio.run(nodes["n2"]._election())
    assert nodes["n2"].role == "leader" and nodes["n2"].term == 2
    assert nodes["n3"].term == 2 and nodes["n3"].voted_for == "n2"


def test_a_majority_decides_without_waiting_for_a_hung_member():
    """A paused leader holds every request sent to it until it times out; the election and the
    new leader's first heartbeats go by the majority's answers, so its lease is live at once."""
    nodes = make_cluster()
    elect_n1(nodes)
    nodes["hung"].add("n1")
    for name in ("n2", "n3"):
        nodes[name].last_contact -= 5

    async def elect_and_beat():
        t = time.monotonic()
        await nodes["n2"]._election()
        elected = time.monotonic() - t
        beat = asyncio.create_task(nodes["n2"]._heartbeat_round())
        await asyncio.sleep(0.1)  # n3 has acknowledged; n1 has not answered
        leading = nodes["n2"].is_leader() and nodes["n2"].lease_until > time.monotonic() + 0.5
        await beat
        return elected, leading

    elected, leading = asyncio.run(elect_and_beat())
    assert elected < 0.5  # not the 2 x 1 s of waiting on n1 for the pre-vote and the vote
    assert leading and nodes["n2"].term == 2


def test_a_change_of_leader_is_counted_on_every_member_that_sees_it():
    from prometheus_client import CollectorRegistry

    from server.cluster import cluster_metrics

    nodes = make_cluster()
    for name in NAMES:
        nodes[name].metrics = cluster_metrics(CollectorRegistry())
    elect_n1(nodes)

    def changes(name):
        return nodes[name].metrics["leader_changes"]._value.get()

    assert [changes(n) for n in NAMES] == [0, 0, 0]  # a first leader is no change
    nodes["down"].add("n1")
    for name in ("n2", "n3"):
        nodes[name].last_contact -= 5
    asyncio.run(nodes["n2"]._election())  # n3 passes through "no leader" while it votes
    asyncio.run(nodes["n2"]._heartbeat_round())
    assert nodes["n3"].leader == "n2"
    assert changes("n2") == 1 and changes("n3") == 1


def test_a_witness_never_stands_for_election_and_no_member_votes_for_one():
    nodes = make_cluster(witness="n3")
    witness = nodes["n3"]
    for name in NAMES:
        nodes[name].last_contact -= 5  # no leader heard: anyone else would stand now
    witness.deadline = 0.0

    async def run_a_while():
        try:
            await asyncio.wait_for(witness._run(), 0.3)
        except asyncio.TimeoutError:
            pass

    asyncio.run(run_a_while())
    assert not nodes["sent"], nodes["sent"]  # it asked nobody for a vote
    asyncio.run(witness._election())  # were it to stand anyway, nobody grants it a pre-vote or a vote
    assert witness.role == "follower" and witness.term == 0
    assert not nodes["n1"].handle_vote({"from": "n3", "term": 1, "config_id": 1})["granted"]
    assert nodes["n1"].term == 0
    asyncio.run(nodes["n1"]._election())  # a full member does get elected, with the witness's vote
    assert nodes["n1"].role == "leader" and nodes["n3"].voted_for == "n1"


def test_followers_learn_every_replica_from_the_heartbeats_and_keep_the_last_word_without_a_leader():
    nodes = make_cluster()
    nodes["n3"].replica_state = lambda: {"state": "ready", "outstanding": 4}
    elect_n1(nodes)
    asyncio.run(nodes["n1"]._heartbeat_round())  # n1 heard n3's state in the first; n2 hears it now
    follower = nodes["n2"]
    assert follower.peers["n3"].replica == {"state": "ready", "outstanding": 4}  # through n1's view
    assert follower.alive("n1") and follower.alive("n3")
    nodes["down"].add("n3")  # n3 dies: n1's next heartbeats report its acknowledgement ageing
    nodes["n1"].peers["n3"].last_ack -= 2 * nodes["n1"].dead_after_s
    asyncio.run(nodes["n1"]._heartbeat_round())
    assert not follower.alive("n3") and follower.alive("n1")
    nodes["down"].discard("n3")
    asyncio.run(nodes["n1"]._heartbeat_round())  # n3 answers n1 again; n2 hears of it one beat later
    assert not follower.alive("n3")
    asyncio.run(nodes["n1"]._heartbeat_round())
    assert follower.alive("n3")
    # n1 goes quiet: n2 stops believing in n1 itself, but keeps n1's last word about n3
    follower.heard_at -= 2 * follower.dead_after_s
    assert not follower.alive("n1") and follower.alive("n3")


def test_a_member_serves_through_an_election_for_the_grace_and_not_after():
    nodes = make_cluster()
    assert not any(nodes[n].can_serve() for n in NAMES)  # no leader ever known
    elect_n1(nodes)
    follower = nodes["n2"]
    assert nodes["n1"].can_serve() and follower.can_serve()
    follower.confirmed_at -= follower.serve_grace_s - 0.5  # the leader went quiet a while ago
    assert follower.can_serve()
    follower.confirmed_at -= 1.0  # and now for longer than the grace
    assert not follower.can_serve()
    witness = make_cluster(witness="n3")["n3"]
    assert not witness.can_serve()  # a witness has no model to serve with


def test_term_and_vote_survive_a_restart_and_a_member_never_votes_twice_in_a_term(tmp_path):
    members = [Member(n, f"http://{n}.invalid") for n in NAMES]
    voter = Cluster("n2", members, Signer("secret"), state_dir=tmp_path / "n2")
    voter.last_contact -= 5
    assert voter.handle_vote({"from": "n1", "term": 4, "config_id": 1})["granted"]
    restarted = Cluster("n2", members, Signer("secret"), state_dir=tmp_path / "n2")
    assert (restarted.term, restarted.voted_for) == (4, "n1")
    restarted.last_contact -= 5
    # it voted in term 4
    assert not restarted.handle_vote({"from": "n3", "term": 4, "config_id": 1})["granted"]
    assert restarted.handle_vote({"from": "n3", "term": 5, "config_id": 1})["granted"]
    saved = json.loads((tmp_path / "n2" / "state.json").read_text())
    assert (saved["term"], saved["voted_for"], saved["config"]["id"]) == (5, "n3", 1)
    (tmp_path / "n2" / "state.json").write_text("{not json")
    with pytest.raises(ConfigError, match="state.json is not a member's saved state"):
        Cluster("n2", members, Signer("secret"), state_dir=tmp_path / "n2")


def test_a_member_joins_once_a_majority_of_the_old_and_the_new_configuration_stored_it():
    nodes = make_cluster()
    elect_n1(nodes)
    leader = nodes["n1"]
    joiner = Cluster("n4", [], Signer("secret"), join="http://n1.invalid", url="http://n4.invalid")
    nodes["n4"] = joiner
    assert joiner.config_id == 0 and not joiner.can_lead and not joiner.can_serve()
    assert asyncio.run(leader.change(add=Member("n4", "http://n4.invalid"))) == 2
    assert leader.committed_id == 2 and leader.majority == 3 and leader.old_members is None
    for name in ("n2", "n3", "n4"):
        assert nodes[name].config_id == 2 and set(nodes[name].members) == {"n1", "n2", "n3", "n4"}
    assert joiner.can_lead and joiner.join_url is None
    asyncio.run(leader._heartbeat_round())
    assert all(nodes[n].committed_id == 2 for n in ("n2", "n3", "n4"))
    # a candidate without the newest configuration gets no vote from a member that has it
    stale = {"from": "n3", "term": leader.term + 1, "config_id": 1}
    assert not nodes["n2"].handle_vote({**stale, "pre": True, "proposed": leader.term + 1})["granted"]
    with pytest.raises(Refused, match="already in the cluster"):
        asyncio.run(leader.change(add=Member("n2", "http://elsewhere.invalid")))


def test_a_change_that_would_leave_no_live_majority_is_refused_and_a_dead_member_is_removed():
    nodes = make_cluster()
    elect_n1(nodes)
    leader = nodes["n1"]
    nodes["down"].update({"n2", "n3"})  # two of three gone: neither the old nor the new has a majority
    for name in ("n2", "n3"):
        leader.peers[name].last_ack -= 2 * leader.dead_after_s
    with pytest.raises(Refused, match=r"fewer than the 2 of a majority"):
        asyncio.run(leader.change(remove="n3"))
    assert leader.config_id == 1 and set(leader.members) == set(NAMES)  # nothing changed
    nodes["down"].discard("n2")  # one of three gone: it can be removed by name
    asyncio.run(leader._heartbeat_round())
    assert asyncio.run(leader.change(remove="n3")) == 2
    assert set(leader.members) == {"n1", "n2"} and set(nodes["n2"].members) == {"n1", "n2"}
    assert "n3" not in leader.peers and leader.majority == 2
    with pytest.raises(Refused, match="no member named 'n3'"):
        asyncio.run(leader.change(remove="n3"))
    # the removed member, back with its old configuration, wins no vote and depose no one
    nodes["down"].discard("n3")
    back = nodes["n3"]
    back.last_contact -= 5
    asyncio.run(back._election())
    assert back.role == "follower" and leader.is_leader()
