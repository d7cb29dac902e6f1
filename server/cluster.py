"""The control plane: cluster members, heartbeats, leader election with terms, signed messages.

One member per node (``./launch.sh serve --cluster``), plus optionally a witness (a member with no
model, ``./launch.sh witness``) so that two nodes still have a majority of three. Members talk over
HTTP on their public port, under ``/_control/``, separately from the compute collectives, and need
nothing of torchrun's rendezvous store once they run.

Election follows Raft without a log (the only state worth agreeing on is who leads): terms are
monotonic and fence every message, a member votes once per term, and a candidate needs the votes
of a majority of the members the cluster was started with. A member that has heard from a leader
within the shortest election timeout refuses to vote (so a live leader is not deposed by a member
that merely missed a few heartbeats). Before it takes a new term, a would-be candidate asks for
pre-votes (Raft's pre-vote): only when a majority would vote for it does it raise its term. A
member that was cut off or paused therefore comes back without a higher term, which would make the
live leader step down at its next heartbeat. The leader holds a lease: it serves only while a majority
acknowledged a heartbeat that it sent less than ``lease_s`` ago. Since ``lease_s`` is shorter than
the shortest election timeout, a voter that acknowledged a heartbeat cannot help elect a new
leader before the old leader's lease has run out: there is never more than one serving leader,
even when the old one was paused (SIGSTOP) and resumes.

Messages are JSON with the sender, its term, a timestamp and a nonce, signed with HMAC-SHA256 over
the exact bytes with the cluster secret; a message with a bad signature, a timestamp outside the
replay window or a nonce seen before is refused and counted. Nothing on these sockets is pickled.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import json
import os
import random
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

SIGNATURE = "X-Ringleader-Signature"
TERM_HEADER = "X-Ringleader-Term"


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Member:
    name: str
    url: str  # base URL of the member's HTTP server
    witness: bool = False  # votes and acknowledges, never leads, has no model


def parse_members(spec: str) -> list[Member]:
    """``name=http://host:port,...``; a member written ``name=url#witness`` is a witness."""
    members = []
    for item in spec.split(","):
        name, sep, url = item.strip().partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ConfigError(f"--cluster: {item.strip()!r} is not NAME=http://HOST:PORT")
        witness = url.endswith("#witness")
        members.append(Member(name, url.removesuffix("#witness").rstrip("/"), witness))
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ConfigError(f"--cluster: member names repeat: {names}")
    return members


def member_rows(members) -> list[list]:
    """A configuration's members as JSON: ``[name, url, witness]`` each."""
    return [[m.name, m.url, m.witness] for m in members]


def members_from_rows(rows) -> dict[str, Member]:
    """The members of a configuration from ``member_rows``; ValueError when they are not."""
    if not isinstance(rows, list) or not rows:
        raise ValueError("a configuration needs at least one member")
    members = {}
    for row in rows:
        if not (isinstance(row, list) and len(row) == 3 and all(isinstance(v, str) for v in row[:2])):
            raise ValueError(f"{row!r} is not [name, url, witness]")
        if row[0] in members:
            raise ValueError(f"member {row[0]!r} is listed twice")
        members[row[0]] = Member(row[0], row[1], bool(row[2]))
    return members


class Refused(Exception):
    """A membership change refused: ``status`` (HTTP), why, said to whoever asked, and whether
    asking again later may succeed (``retry``: no leader yet, a change in progress)."""

    def __init__(self, status: int, reason: str, retry: bool = False, leader: str | None = None):
        super().__init__(reason)
        self.status, self.reason, self.retry, self.leader = status, reason, retry, leader

    def body(self) -> dict:
        return {"error": self.reason, "retry": self.retry, "leader": self.leader}


class Forged(Exception):
    """A control message that is not from the cluster, or not fresh."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Signer:
    """Signs and verifies control messages with the cluster secret."""

    def __init__(self, secret: str, window_s: float = 10.0):
        if not secret:
            raise ConfigError("the cluster secret is empty")
        self.key = secret.encode()
        self.window_s = window_s
        self.seen: dict[str, float] = {}  # nonce -> its timestamp, for the replay window

    def sign(self, message: dict) -> tuple[bytes, dict]:
        body = json.dumps({**message, "ts": time.time(), "nonce": secrets.token_hex(12)}).encode()
        return body, {
            SIGNATURE: hmac.new(self.key, body, hashlib.sha256).hexdigest(),
            "Content-Type": "application/json",
        }

    def verify(self, body: bytes, signature: str | None) -> dict:
        expected = hmac.new(self.key, body, hashlib.sha256).hexdigest()
        if not signature or not hmac.compare_digest(expected, signature):
            raise Forged("bad signature")
        try:
            message = json.loads(body)
            ts, nonce = float(message["ts"]), str(message["nonce"])
            int(message["term"]), str(message["from"])
        except (ValueError, KeyError, TypeError):
            raise Forged("malformed") from None
        now = time.time()
        if abs(now - ts) > self.window_s:
            raise Forged("stale")
        for old in [n for n, t in self.seen.items() if now - t > self.window_s]:
            del self.seen[old]
        if nonce in self.seen:
            raise Forged("replayed")
        self.seen[nonce] = ts
        return message


@dataclass
class PeerState:
    url: str = ""
    last_ack: float | None = None  # monotonic time of its last heartbeat acknowledgement
    replica: dict = field(default_factory=dict)  # what it last said of its replica
    config_id: int = 0  # the newest configuration it said it has stored


class StateStore:
    """A member's term, vote and cluster configuration, on disk (``state.json`` in its state
    directory), written before they are acted on: atomically (a temporary file, fsync, rename, fsync
    of the directory), so a member restarted at any moment comes back with the term it had reached,
    the vote it gave and the configuration it had stored, not the one it was launched with."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--state-dir: cannot create {self.folder} ({e.strerror or e})") from None
        self.path = self.folder / "state.json"

    def load(self) -> dict | None:
        """``{"term", "voted_for", "config"}`` (config: ``{"id", "committed", "members"}`` or None),
        or None when nothing was saved."""
        if not self.path.exists():
            return None
        try:
            state = json.loads(self.path.read_text())
            term, vote, config = int(state["term"]), state.get("voted_for"), state.get("config")
            if term < 0 or not (vote is None or isinstance(vote, str)):
                raise ValueError("term below 0 or a vote that is not a name")
            if config is not None:
                config = {"id": int(config["id"]), "committed": int(config["committed"]),
                          "members": members_from_rows(config["members"])}  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--state-dir: {self.path} is not a member's saved state ({e})") from None
        return {"term": term, "voted_for": vote, "config": config}

    def save(self, term: int, voted_for: str | None, config: dict | None = None) -> None:
        tmp = self.path.with_suffix(".tmp")
        state = {"term": term, "voted_for": voted_for}
        if config is not None:
            state["config"] = {"id": config["id"], "committed": config["committed"],
                               "members": member_rows(config["members"].values())}  # fmt: skip
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Cluster:
    """This member's view of the cluster and its part in heartbeats and elections."""

    def __init__(
        self,
        me: str,
        members: list[Member],
        signer: Signer,
        heartbeat_s: float = 0.2,
        lease_s: float = 1.0,
        election_timeout_s: tuple[float, float] = (1.5, 3.0),
        dead_after_s: float = 1.0,
        replica_state=lambda: {"state": "none"},
        metrics: dict | None = None,
        serve_grace_s: float | None = None,
        state_dir: str | os.PathLike | None = None,
        join: str | None = None,
        url: str | None = None,
    ):
        """``members``: the launch configuration; or, with ``join`` (any member's URL), none:
        this member (at ``url``) asks to be added to a running cluster. A configuration saved in
        ``state_dir`` wins over both, unless it no longer has this member and ``join`` is given (a
        member that left joins again)."""
        if not lease_s < election_timeout_s[0]:
            raise ConfigError("the leader's lease must be shorter than the shortest election timeout")
        self.me, self.signer = me, signer
        self.heartbeat_s, self.lease_s, self.dead_after_s = heartbeat_s, lease_s, dead_after_s
        self.election_timeout_s = election_timeout_s
        self.replica_state, self.metrics = replica_state, metrics or {}
        self.store = StateStore(state_dir) if state_dir is not None else None
        saved = self.store.load() if self.store is not None else None
        self.join_url = None
        # the configuration: its members, its id (the launch list is 1), the newest id known to be
        # committed (stored by a majority), and while a change is not committed, the one before it
        self.config_id, self.committed_id, self.old_members = 1, 1, None
        rejoin = saved is not None and saved["config"] is not None and me not in saved["config"]["members"]
        if saved is not None and saved["config"] is not None and not (rejoin and join is not None):
            config = saved["config"]
            self.members = config["members"]
            self.config_id, self.committed_id = config["id"], config["committed"]
            if members and set(self.members) != {m.name for m in members}:
                print(f"ringleader: member {me}: the configuration saved in {self.store.path} (id "
                      f"{self.config_id}: {', '.join(self.members)}) replaces --cluster",
                      file=sys.stderr, flush=True)  # fmt: skip
        elif join is not None:
            if not url:
                raise ConfigError("--join needs this member's own URL (--advertise-url)")
            self.members, self.config_id, self.committed_id = {me: Member(me, url)}, 0, 0
            self.join_url = join.rstrip("/")
        else:
            self.members = {m.name: m for m in members}
            if me not in self.members:
                raise ConfigError(
                    f"--name {me!r} is not one of the --cluster members {[m.name for m in members]}"
                )
        self.on_config = None  # called after the configuration changed here
        self.on_removed = None  # called once a configuration without this member is committed
        self.on_join_refused = None  # called with why, when a join is refused for good
        self.changes: dict[int, asyncio.Event] = {}  # the leader: configuration id -> committed
        self.term, self.role, self.voted_for, self.leader = 0, "follower", None, None
        self.last_leader: str | None = None  # the latest leader known, through elections
        self.lease_until = 0.0
        self.last_contact = time.monotonic()  # from a leader, or a vote granted
        self.deadline = self._new_deadline()
        self.peers: dict[str, PeerState] = {}
        self._sync_peers()
        # how long a member goes on serving its clients after it last knew a leader with a majority
        # (the leader: its lease; a follower: the leader's last heartbeat), so that an election is
        # invisible to them; past it, without a leader, it answers 503
        self.serve_grace_s = 4 * election_timeout_s[0] if serve_grace_s is None else serve_grace_s
        self.confirmed_at: float | None = None  # when it last knew such a leader (monotonic)
        self.heard_at: float | None = None  # a follower: the leader's last heartbeat (monotonic)
        if saved is not None:
            self.term, self.voted_for = saved["term"], saved["voted_for"]
        self.session: aiohttp.ClientSession | None = None
        self.task: asyncio.Task | None = None

    # state

    @property
    def majority(self) -> int:
        return len(self.members) // 2 + 1

    @property
    def can_lead(self) -> bool:
        """A full member of the configuration: not a witness, not joining, not removed."""
        m = self.members.get(self.me)
        return m is not None and not m.witness and self.join_url is None

    def _sync_peers(self) -> None:
        """A peer for every other member of the configuration, and of the one before it while a
        change is not committed (they still hear heartbeats, so that they learn of it)."""
        wanted = {**(self.old_members or {}), **self.members}
        for name, m in wanted.items():
            if name != self.me:
                self.peers.setdefault(name, PeerState(url=m.url)).url = m.url
        for name in [n for n in self.peers if n not in wanted]:
            del self.peers[name]

    def config(self) -> dict:
        return {"id": self.config_id, "committed": self.committed_id, "members": self.members}

    def is_leader(self) -> bool:
        """Leader with a live lease: the only state in which this member serves requests."""
        return self.role == "leader" and (self.majority == 1 or time.monotonic() < self.lease_until)

    def can_serve(self) -> bool:
        """Whether this member answers API calls: it leads with a live lease, or knew a leader with
        a majority less than ``serve_grace_s`` ago (an election under way is not a reason to fail
        its clients; a member cut off from the majority for longer stops)."""
        if not self.can_lead:
            return False  # a witness has no model
        if self.is_leader():
            return True
        return self.confirmed_at is not None and time.monotonic() - self.confirmed_at < self.serve_grace_s

    def alive(self, name: str) -> bool:
        """Whether member ``name`` answers heartbeats. The leader knows it first hand; a follower
        learns it from the leader's heartbeats, which carry the age of every member's last
        acknowledgement, and keeps the leader's last word while there is no leader to ask (the
        leader itself is alive while its heartbeats arrive)."""
        if name == self.me:
            return True
        peer = self.peers.get(name)
        ack = None if peer is None else peer.last_ack
        if ack is None:
            return False
        if self.role == "leader":
            return time.monotonic() - ack < self.dead_after_s
        if name == self.last_leader:
            return self.heard_at is not None and time.monotonic() - self.heard_at < self.dead_after_s
        return self.heard_at is not None and self.heard_at - ack < self.dead_after_s

    def view(self) -> dict:
        """What the leader's heartbeats tell every follower: each member's replica state and the
        age of its last acknowledgement (None: never acknowledged)."""
        now = time.monotonic()
        rows = {self.me: {"age": 0.0, "replica": self.replica_state()}}
        for name, peer in self.peers.items():
            age = None if peer.last_ack is None else round(now - peer.last_ack, 3)
            rows[name] = {"age": age, "replica": peer.replica}
        return rows

    def describe(self) -> dict:
        now = time.monotonic()
        rows = []
        for name, m in self.members.items():
            peer = self.peers.get(name)
            rows.append(
                {
                    "name": name,
                    "url": m.url,
                    "witness": m.witness,
                    "role": self.role
                    if name == self.me
                    else ("leader" if name == self.leader else "follower"),
                    "alive": self.alive(name),
                    "last_ack_s": None
                    if peer is None or peer.last_ack is None
                    else round(now - peer.last_ack, 3),
                    "replica": self.replica_state() if name == self.me else (peer.replica if peer else {}),
                }
            )
        return {
            "me": self.me,
            "role": self.role,
            "term": self.term,
            "leader": self.leader,
            "leading": self.is_leader(),  # leads with a live lease
            "serving": self.can_serve(),
            "members": rows,
            "config": {"id": self.config_id, "committed": self.committed_id, "members": list(self.members)},
            # a membership change not yet stored by a majority of the old and the new configuration
            "change": None
            if self.config_id <= self.committed_id
            else {"config": self.config_id, "from": list(self.old_members or {}), "to": list(self.members)},
            "joining": self.join_url is not None,
            "removed": self.me not in self.members,
        }

    def _new_deadline(self) -> float:
        return time.monotonic() + random.uniform(*self.election_timeout_s)

    def _count(self, name: str, **labels) -> None:
        metric = self.metrics.get(name)
        if metric is not None:
            (metric.labels(**labels) if labels else metric).inc()

    def _set(self, role: str, term: int, leader: str | None) -> None:
        changed = (role, term) != (self.role, self.term)
        # a change of leader passes through an election with no leader known: count it when the
        # next leader is known and is not the one before
        if leader is not None and self.last_leader is not None and leader != self.last_leader:
            self._count("leader_changes")
        if leader is not None:
            self.last_leader = leader
        if changed or leader != self.leader:
            who = f"; leader {leader}" if leader else ""
            print(f"ringleader: member {self.me}: {role} in term {term}{who}", file=sys.stderr, flush=True)
        self.role, self.leader = role, leader
        if term != self.term:
            self.term, self.voted_for = term, None
            self._persist()

    def _vote_for(self, name: str) -> None:
        self.voted_for = name
        self._persist()  # before the vote is sent: a restarted member never votes twice in a term

    def _persist(self) -> None:
        if self.store is not None:
            self.store.save(self.term, self.voted_for, self.config() if self.join_url is None else None)

    # running

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=max(0.5, 2 * self.heartbeat_s))
        )
        if self.majority == 1 and self.can_lead:
            self._become_leader(time.monotonic())
        self.task = asyncio.create_task(self._join() if self.join_url is not None else self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        if self.session is not None:
            await self.session.close()

    async def _run(self) -> None:
        tick = self.heartbeat_s / 4
        last_beat = 0.0
        while True:
            now = time.monotonic()
            if self.role == "leader":
                if self.majority > 1 and now >= self.lease_until:
                    self._set("follower", self.term, None)  # lost the majority: stop serving
                    self.deadline = self._new_deadline()
                elif now - last_beat >= self.heartbeat_s:
                    last_beat = now
                    asyncio.create_task(self._heartbeat_round())
            elif (
                self.can_lead
                and now >= self.deadline
                and now - self.last_contact >= self.election_timeout_s[0]
            ):
                await self._election()
            await asyncio.sleep(tick)

    async def _post(self, name: str, path: str, message: dict) -> dict | None:
        body, headers = self.signer.sign({**message, "from": self.me, "term": self.term})
        try:
            async with self.session.post(self.peers[name].url + path, data=body, headers=headers) as r:
                if r.status != 200:
                    return None
                return await r.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None

    def _ask(self, path: str, message: dict):
        """(peer, reply) of every peer as each answers: a majority's answers are acted on without
        waiting for a peer that hangs until the request times out."""

        async def one(name: str):
            return name, await self._post(name, path, message)

        return asyncio.as_completed([asyncio.ensure_future(one(n)) for n in self.peers])

    async def _heartbeat_round(self) -> None:
        sent, term = time.monotonic(), self.term
        config = {"id": self.config_id, "members": member_rows(self.members.values())}
        message = {"leader": self.me, "view": self.view(), "committed": self.committed_id, "config": config}
        acks = 1 if self.me in self.members else 0  # a leader removing itself counts only the others
        for answer in self._ask("/_control/heartbeat", message):
            name, reply = await answer
            if self.role != "leader" or self.term != term:
                return
            if reply is None:
                continue
            if reply.get("term", 0) > self.term:
                self._set("follower", reply["term"], None)
                self.deadline = self._new_deadline()
                return
            if reply.get("ok") and name in self.peers:
                peer = self.peers[name]
                peer.last_ack, peer.replica = time.monotonic(), reply.get("replica") or {}
                peer.config_id = int(reply.get("config_id") or 0)
                if name in self.members:
                    acks += 1
                if acks >= self.majority:
                    self.lease_until = max(self.lease_until, sent + self.lease_s)
                    self.confirmed_at = max(self.confirmed_at or sent, sent)
                self._commit_if_stored()

    def _commit_if_stored(self) -> None:
        """The leader: the configuration is committed once a majority of it, and of the one before
        it (where this leader began the change), has stored it."""
        if self.config_id <= self.committed_id:
            return

        def stored(members) -> bool:
            have = sum(n == self.me or (n in self.peers and self.peers[n].config_id >= self.config_id)
                       for n in members)  # fmt: skip
            return have >= len(members) // 2 + 1

        if not stored(self.members) or (self.old_members is not None and not stored(self.old_members)):
            return
        self.committed_id, self.old_members = self.config_id, None
        self._sync_peers()
        self._persist()
        print(f"ringleader: member {self.me}: configuration {self.config_id} committed: "
              f"{', '.join(self.members)}", file=sys.stderr, flush=True)  # fmt: skip
        event = self.changes.pop(self.config_id, None)
        if event is not None:
            event.set()
        if self.on_config is not None:
            self.on_config()
        if self.me not in self.members:
            self._set("follower", self.term, None)  # a leader that removed itself stops leading
            if self.on_removed is not None:
                self.on_removed()

    async def _majority_grants(self, message: dict) -> bool | None:
        """Whether a majority (this member included) grants the vote ``message`` asks for, decided
        as soon as the answers decide it; None when an answer shows a newer term (adopted)."""
        granted, undecided = 1, len([n for n in self.peers if n in self.members])
        if granted >= self.majority:
            return True
        for answer in self._ask("/_control/vote", message):
            name, reply = await answer
            if name not in self.members:
                continue  # a member of the configuration before: its vote does not count
            undecided -= 1
            if reply is not None and reply.get("term", 0) > self.term and not message.get("pre"):
                self._set("follower", reply["term"], None)
                return None
            granted += bool(reply and reply.get("granted"))
            if granted >= self.majority:
                return True
            if granted + undecided < self.majority:
                return False
        return False

    async def _election(self) -> None:
        # pre-vote: a member that merely lost touch learns it cannot win, and keeps its term
        pre = {"pre": True, "proposed": self.term + 1, "config_id": self.config_id}
        if not await self._majority_grants(pre):
            self.deadline = self._new_deadline()
            return
        if self.role != "follower" or time.monotonic() - self.last_contact < self.election_timeout_s[0]:
            return  # a leader was heard (or a vote given) meanwhile
        started = time.monotonic()
        self._set("candidate", self.term + 1, None)
        self._vote_for(self.me)
        self._count("elections")
        term = self.term
        won = await self._majority_grants({"config_id": self.config_id})
        if self.role != "candidate" or self.term != term:  # a newer term or a leader turned up
            self.deadline = self._new_deadline()
            return
        if won:
            self._become_leader(started)
        else:
            self._set("follower", self.term, None)
            self.deadline = self._new_deadline()

    def _become_leader(self, since: float) -> None:
        if self.majority == 1:
            self.term = max(self.term, 1)
        self._set("leader", self.term, self.me)
        # the votes were given after ``since``: no voter helps elect anyone else before then + lease
        self.lease_until = since + self.lease_s
        self.confirmed_at = since
        for peer in self.peers.values():
            peer.last_ack = time.monotonic()  # give followers one dead_after to answer

    # handling messages from other members

    def handle_heartbeat(self, message: dict) -> dict:
        term, sender = message["term"], message["from"]
        if term >= self.term:
            self._adopt(message.get("config"), message.get("committed"))
        if term < self.term or sender not in self.members or self.me not in self.members:
            return {"ok": False, "term": self.term, "config_id": self.config_id}
        if term > self.term or self.role != "follower" or self.leader != sender:
            self._set("follower", term, sender)
        now = time.monotonic()
        self.last_contact = self.heard_at = self.confirmed_at = now
        self.deadline = self._new_deadline()
        view = message.get("view")
        if isinstance(view, dict):
            for name, row in view.items():
                peer = self.peers.get(name)
                if peer is None or not isinstance(row, dict):
                    continue
                age = row.get("age")
                peer.last_ack = now if name == sender else None if age is None else now - float(age)
                peer.replica = row.get("replica") or {}
        return {"ok": True, "term": self.term, "replica": self.replica_state(), "config_id": self.config_id}

    def _adopt(self, config, committed) -> None:
        """A follower stores a newer configuration from the leader's heartbeat before it
        acknowledges it (the leader counts the acknowledgements to commit it)."""
        try:
            if isinstance(config, dict) and int(config["id"]) > self.config_id:
                members = members_from_rows(config["members"])
                was_member = self.me in self.members and self.join_url is None
                self.members, self.config_id, self.old_members = members, int(config["id"]), None
                self.join_url = None if self.me in members else self.join_url
                self._sync_peers()
                print(f"ringleader: member {self.me}: configuration {self.config_id}: {', '.join(members)}",
                      file=sys.stderr, flush=True)  # fmt: skip
                if self.on_config is not None:
                    self.on_config()
                if was_member and self.me not in members:
                    print(f"ringleader: member {self.me}: removed from the cluster", file=sys.stderr)
                    if self.on_removed is not None:
                        self.on_removed()
                changed = True
            else:
                changed = False
            if isinstance(committed, int) and self.committed_id < committed <= self.config_id:
                self.committed_id, changed = committed, True
            if changed:
                self._persist()
        except (KeyError, TypeError, ValueError) as e:
            print(f"ringleader: member {self.me}: ignored a malformed configuration ({e})", file=sys.stderr)

    def handle_vote(self, message: dict) -> dict:
        """A vote, or with ``pre`` a pre-vote: whether this member would vote for the sender in
        the term it ``proposed``, which changes nothing here."""
        term, candidate = message["term"], message["from"]
        now = time.monotonic()
        if candidate not in self.members or self.members[candidate].witness or self.me not in self.members:
            return {"granted": False, "term": self.term}
        if int(message.get("config_id") or 0) < self.config_id:
            return {"granted": False, "term": self.term}  # it lacks a configuration this member stored
        heard_recently = self.leader is not None and now - self.last_contact < self.election_timeout_s[0]
        if message.get("pre"):
            proposed = message.get("proposed")
            ok = isinstance(proposed, int) and proposed > self.term and not self.is_leader()
            return {"granted": ok and not heard_recently, "term": self.term}
        if term < self.term or self.is_leader() or (heard_recently and self.leader != candidate):
            return {"granted": False, "term": self.term}
        if term > self.term:
            self._set("follower", term, None)
        if self.voted_for in (None, candidate):
            if self.voted_for is None:
                self._vote_for(candidate)
            self.last_contact = now
            self.deadline = self._new_deadline()
            return {"granted": True, "term": self.term}
        return {"granted": False, "term": self.term}

    # membership changes: one member at a time, through the leader

    def _not_leader(self) -> Refused:
        leader = self.members.get(self.leader) if self.leader is not None else None
        url = leader.url if leader is not None and self.alive(self.leader) else None
        return Refused(409, "this member does not lead; ask the leader", retry=True, leader=url)

    async def change(self, add: Member | None = None, remove: str | None = None, timeout_s: float = 10.0):
        """The leader adds member ``add`` or removes member ``remove``: the new configuration is
        used at once (majorities are counted over it) and committed once a majority of the old and
        of the new configuration has stored it (Raft's one-at-a-time change). Refused, with why,
        when another change is not committed yet or when either configuration would have no live
        majority. Returns the committed configuration's id."""
        if not self.is_leader():
            raise self._not_leader()
        if self.config_id > self.committed_id:
            raise Refused(409, f"configuration {self.config_id} is not committed yet; one change at a time",
                          retry=True)  # fmt: skip
        old = dict(self.members)
        if add is not None:
            if add.name in old:
                raise Refused(409, f"a member named {add.name!r} is already in the cluster")
            if any(m.url == add.url for m in old.values()):
                raise Refused(409, f"{add.url} is already the URL of a member")
            new = {**old, add.name: add}
        else:
            if remove not in old:
                raise Refused(404, f"no member named {remove!r} in the cluster ({', '.join(old)})")
            new = {n: m for n, m in old.items() if n != remove}
            if not any(not m.witness for m in new.values()):
                raise Refused(409, f"removing {remove!r} would leave no member with a model")
        for label, members in (("the current", old), ("the new", new)):
            joining = add.name if add is not None else None
            live = [n for n in members if n in (self.me, joining) or self.alive(n)]
            need = len(members) // 2 + 1
            if len(live) < need:
                raise Refused(409, f"refused: {label} configuration ({', '.join(members)}) would have "
                              f"{len(live)} live members ({', '.join(live) or 'none'}), fewer than the "
                              f"{need} of a majority")  # fmt: skip
        self.old_members, self.members = old, new
        self.config_id += 1
        cid = self.config_id
        self._sync_peers()
        if add is not None:
            self.peers[add.name].last_ack = time.monotonic()  # one dead_after to answer a heartbeat
        self._persist()
        what = f"adds {add.name} ({add.url})" if add is not None else f"removes {remove}"
        print(f"ringleader: member {self.me}: configuration {cid} {what}", file=sys.stderr, flush=True)
        if self.on_config is not None:
            self.on_config()
        event = self.changes[cid] = asyncio.Event()
        asyncio.create_task(self._heartbeat_round())
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except asyncio.TimeoutError:
            self.changes.pop(cid, None)
            if self.committed_id >= cid:
                return cid
            if self.role == "leader" and self.config_id == cid:
                # not stored by a majority in time (the new member never answered): go back to the
                # members before, as a change of its own
                self.old_members, self.members = self.members, old
                self.config_id += 1
                self._sync_peers()
                self._persist()
                if self.on_config is not None:
                    self.on_config()
            raise Refused(504, f"configuration {cid} was not stored by a majority within {timeout_s:g} s; "
                          "withdrawn", retry=True) from None  # fmt: skip
        return cid

    async def handle_join(self, message: dict) -> tuple[int, dict]:
        name, url = message["from"], message.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return self._refused("join", Refused(400, f"a join needs the member's http URL, got {url!r}"))
        try:
            cid = await self.change(add=Member(name, url.rstrip("/")))
        except Refused as e:
            return self._refused("join", e)
        self._count("membership", kind="join", outcome="committed")
        return 200, {"config": cid, "members": member_rows(self.members.values())}

    async def handle_remove(self, message: dict) -> tuple[int, dict]:
        name = message.get("member")
        if not isinstance(name, str):
            return self._refused("remove", Refused(400, 'a removal names the member: {"member": NAME}'))
        try:
            cid = await self.change(remove=name)
        except Refused as e:
            return self._refused("remove", e)
        self._count("membership", kind="remove", outcome="committed")
        return 200, {"config": cid, "members": member_rows(self.members.values())}

    def _refused(self, kind: str, e: Refused) -> tuple[int, dict]:
        if not e.retry:
            print(f"ringleader: member {self.me}: {kind} refused: {e.reason}", file=sys.stderr, flush=True)
        self._count("membership", kind=kind, outcome="refused")
        return e.status, e.body()

    async def leave(self, attempts: int = 20) -> None:
        """Have this member removed from the configuration (by the leader; by itself when it
        leads), waiting through elections and other changes; Refused when it cannot be."""
        url = None
        for _ in range(attempts):
            if self.is_leader():
                try:
                    await self.change(remove=self.me)
                    return
                except Refused as e:
                    if not e.retry:
                        raise
            else:
                leader = url or (self._not_leader().leader)
                if leader is not None:
                    status, body = await self._post_url(leader + "/_control/remove", {"member": self.me})
                    if status == 200:
                        return
                    if not body.get("retry", status in (None, 503)):
                        raise Refused(status or 503, body.get("error") or f"answered {status}")
                    url = body.get("leader")
            await asyncio.sleep(0.5)
        raise Refused(503, f"no leader removed {self.me} after {attempts} attempts")

    async def _post_url(self, url: str, message: dict) -> tuple[int | None, dict]:
        """(status, JSON body) of a signed control message to ``url``; (None, {}) if none came."""
        body, headers = self.signer.sign({**message, "from": self.me, "term": self.term})
        try:
            timeout = aiohttp.ClientTimeout(total=15)
            async with self.session.post(url, data=body, headers=headers, timeout=timeout) as r:
                try:
                    answer = await r.json(content_type=None)
                except ValueError:
                    answer = {}
                return r.status, answer if isinstance(answer, dict) else {}
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None, {}

    async def _join(self) -> None:
        """A member started with ``--join``: ask (any member, then the leader it names) to be
        added, until the configuration that has it arrives; then take part as any member."""
        url = self.join_url
        while self.join_url is not None:
            status, body = await self._post_url(url + "/_control/join", {"url": self.members[self.me].url})
            if self.join_url is None or status == 200:
                break
            if status is not None and not body.get("retry", False):
                why = body.get("error") or f"{url} answered {status}"
                if self.on_join_refused is not None:
                    self.on_join_refused(why)
                return
            url = body.get("leader") or self.join_url
            await asyncio.sleep(0.2 if body.get("leader") else 1.0)
        while self.join_url is not None:  # added: the configuration comes with the next heartbeat
            await asyncio.sleep(self.heartbeat_s / 4)
        await self._run()

    def is_member(self, message: dict) -> bool:
        """Whether a control message (e.g. a request to generate) is from a member of this
        cluster's configuration. Any member may ask any replica to run a sequence for a client of
        its own; terms fence leadership (heartbeats and votes), not the requests of front ends."""
        sender = message["from"]
        return sender in self.members and sender != self.me and not self.members[sender].witness


def add_cluster_flags(parser, required: bool = False) -> None:
    """The flags that make a process a cluster member (``serve`` and ``witness``)."""
    import os

    group = parser.add_argument_group("cluster (fault tolerance across nodes; see README)")
    group.add_argument("--cluster", required=required, help="every member: NAME=http://HOST:PORT,...; "
                       "NAME=URL#witness marks the witness")  # fmt: skip
    group.add_argument("--name", required=required, help="this member's NAME in --cluster")
    secret = os.environ.get("RINGLEADER_CLUSTER_SECRET")
    group.add_argument("--cluster-secret", default=secret, help="signs control messages; the same everywhere")
    group.add_argument("--heartbeat-ms", type=float, default=200.0)
    group.add_argument(
        "--lease-ms", type=float, default=1000.0, help="a leader without a majority stops after this"
    )
    group.add_argument(
        "--election-timeout-ms", type=float, default=1500.0, help="the shortest; the longest is twice"
    )
    group.add_argument("--serve-without-leader-ms", type=float, default=None,
                       help="how long a member goes on serving after it last knew a leader with a "
                       "majority (default: 4 x --election-timeout-ms)")  # fmt: skip
    group.add_argument("--state-dir", default=None,
                       help="where this member keeps its term, vote and configuration across "
                       "restarts (default: $XDG_STATE_HOME/ringleader/cluster-<hash>/<name>)")  # fmt: skip
    if not required:  # a witness is named in the launch list; a member with a model may join later
        group.add_argument("--join", metavar="URL", default=None,
                           help="join a running cluster through any member's URL, not --cluster")  # fmt: skip
        group.add_argument("--advertise-url", default=None,
                           help="where the others reach this member (default http://HOST:PORT)")  # fmt: skip


def default_state_dir(spec: str, name: str) -> Path:
    """``$XDG_STATE_HOME/ringleader/cluster-<hash>/<name>`` (``~/.local/state`` without it): one
    folder per cluster (by its member list) and member, so that members of different clusters on
    one machine never share a term."""
    members = ",".join(sorted(item.strip() for item in spec.split(",")))
    digest = hashlib.sha256(members.encode()).hexdigest()[:12]
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "ringleader" / f"cluster-{digest}" / name


def cluster_from_flags(args, metrics: dict | None = None) -> tuple[Cluster, Signer]:
    """This member's ``Cluster`` and ``Signer`` from the flags of ``add_cluster_flags``
    (``ConfigError`` naming what is wrong)."""
    join = getattr(args, "join", None)
    if join is not None and args.cluster:
        raise ConfigError("--join and --cluster exclude each other: a member joins, or is in the launch list")
    if join is not None and not join.startswith(("http://", "https://")):
        raise ConfigError(f"--join: {join!r} is not http://HOST:PORT of a member")
    members = parse_members(args.cluster) if args.cluster else []
    flag = "--cluster" if args.cluster else "--join"
    if not args.name:
        raise ConfigError(f"{flag} needs --name (this member's name)")
    if not args.cluster_secret:
        raise ConfigError(
            f"{flag} needs --cluster-secret or RINGLEADER_CLUSTER_SECRET (the same on every member)"
        )
    for flag in ("heartbeat_ms", "lease_ms", "election_timeout_ms", "serve_without_leader_ms"):
        value = getattr(args, flag, None)
        if value is not None and not value > 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    signer = Signer(args.cluster_secret)
    election = args.election_timeout_ms / 1000
    grace = getattr(args, "serve_without_leader_ms", None)
    state_dir = getattr(args, "state_dir", None) or default_state_dir(args.cluster or join, args.name)
    url = getattr(args, "advertise_url", None)
    if join is not None and url is None:
        if args.host in ("0.0.0.0", "::", ""):
            raise ConfigError(f"--join with --host {args.host}: give --advertise-url (where others reach it)")
        url = f"http://{args.host}:{args.port}"
    cluster = Cluster(
        args.name,
        members,
        signer,
        heartbeat_s=args.heartbeat_ms / 1000,
        lease_s=args.lease_ms / 1000,
        election_timeout_s=(election, 2 * election),
        dead_after_s=args.lease_ms / 1000,
        metrics=metrics,
        serve_grace_s=None if grace is None else grace / 1000,
        state_dir=state_dir,
        join=join,
        url=url,
    )
    return cluster, signer


def verified(request_body: bytes, signature: str | None, signer: Signer, metrics: dict) -> dict:
    """The message, or ``Forged`` (counted by reason)."""
    try:
        return signer.verify(request_body, signature)
    except Forged as e:
        metric = metrics.get("rejected")
        if metric is not None:
            metric.labels(reason=e.reason).inc()
        raise


def add_control_routes(app, cluster: Cluster, signer: Signer, metrics: dict) -> None:
    """``POST /_control/heartbeat``, ``/vote``, ``/join`` and ``/remove`` on ``app`` (aiohttp)."""
    from aiohttp import web

    def handler(method):
        """A signed message's route: ``method`` answers it with a JSON body, or (a membership
        change, which waits for its commit) a coroutine of (status, body)."""

        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            try:
                message = verified(body, request.headers.get(SIGNATURE), signer, metrics)
            except Forged as e:
                return web.json_response({"error": f"control message refused: {e.reason}"}, status=403)
            answer, status = method(message), 200
            if inspect.isawaitable(answer):
                status, answer = await answer
            return web.json_response(answer, status=status)

        return handle

    app.router.add_post("/_control/heartbeat", handler(cluster.handle_heartbeat))
    app.router.add_post("/_control/vote", handler(cluster.handle_vote))
    app.router.add_post("/_control/join", handler(cluster.handle_join))
    app.router.add_post("/_control/remove", handler(cluster.handle_remove))


def cluster_metrics(registry) -> dict:
    from prometheus_client import Counter

    return {
        "elections": Counter("ringleader_elections", "elections this member started", registry=registry),
        "leader_changes": Counter("ringleader_leader_changes", "changes of leader seen", registry=registry),
        "failovers": Counter(
            "ringleader_failovers", "replicas taken out of routing on failure", registry=registry
        ),
        "rerouted": Counter(
            "ringleader_rerouted_requests", "requests moved to another replica", registry=registry
        ),
        "rejected": Counter(
            "ringleader_control_rejected", "control messages refused", ["reason"], registry=registry
        ),
        "membership": Counter(
            "ringleader_membership_changes",
            "membership changes this member led (kind: join, remove; outcome: committed, refused)",
            ["kind", "outcome"],
            registry=registry,
        ),
    }
