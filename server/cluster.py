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
    last_ack: float | None = None  # monotonic time of its last heartbeat acknowledgement
    replica: dict = field(default_factory=dict)  # what it last said of its replica


class TermStore:
    """A member's term and vote, on disk (``state.json`` in its state directory), written before
    they are acted on: atomically (a temporary file, fsync, rename, fsync of the directory), so a
    member restarted at any moment comes back with the term it had reached and the vote it gave."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--state-dir: cannot create {self.folder} ({e.strerror or e})") from None
        self.path = self.folder / "state.json"

    def load(self) -> tuple[int, str | None]:
        if not self.path.exists():
            return 0, None
        try:
            state = json.loads(self.path.read_text())
            term, vote = int(state["term"]), state.get("voted_for")
            if term < 0 or not (vote is None or isinstance(vote, str)):
                raise ValueError("term below 0 or a vote that is not a name")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--state-dir: {self.path} is not a member's saved state ({e})") from None
        return term, vote

    def save(self, term: int, voted_for: str | None) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"term": term, "voted_for": voted_for}, f)
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
    ):
        if me not in {m.name for m in members}:
            raise ConfigError(
                f"--name {me!r} is not one of the --cluster members {[m.name for m in members]}"
            )
        if not lease_s < election_timeout_s[0]:
            raise ConfigError("the leader's lease must be shorter than the shortest election timeout")
        self.me, self.members, self.signer = me, {m.name: m for m in members}, signer
        self.heartbeat_s, self.lease_s, self.dead_after_s = heartbeat_s, lease_s, dead_after_s
        self.election_timeout_s = election_timeout_s
        self.replica_state, self.metrics = replica_state, metrics or {}
        self.majority = len(members) // 2 + 1
        self.can_lead = not self.members[me].witness
        self.term, self.role, self.voted_for, self.leader = 0, "follower", None, None
        self.last_leader: str | None = None  # the latest leader known, through elections
        self.lease_until = 0.0
        self.last_contact = time.monotonic()  # from a leader, or a vote granted
        self.deadline = self._new_deadline()
        self.peers = {name: PeerState() for name in self.members if name != me}
        # how long a member goes on serving its clients after it last knew a leader with a majority
        # (the leader: its lease; a follower: the leader's last heartbeat), so that an election is
        # invisible to them; past it, without a leader, it answers 503
        self.serve_grace_s = 4 * election_timeout_s[0] if serve_grace_s is None else serve_grace_s
        self.confirmed_at: float | None = None  # when it last knew such a leader (monotonic)
        self.heard_at: float | None = None  # a follower: the leader's last heartbeat (monotonic)
        self.store = TermStore(state_dir) if state_dir is not None else None
        if self.store is not None:
            self.term, self.voted_for = self.store.load()
        self.session: aiohttp.ClientSession | None = None
        self.task: asyncio.Task | None = None

    # state

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
        ack = self.peers[name].last_ack
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
            self.store.save(self.term, self.voted_for)

    # running

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=max(0.5, 2 * self.heartbeat_s))
        )
        if self.majority == 1 and self.can_lead:
            self._become_leader(time.monotonic())
        self.task = asyncio.create_task(self._run())

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
            async with self.session.post(self.members[name].url + path, data=body, headers=headers) as r:
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
        acks = 1
        for answer in self._ask("/_control/heartbeat", {"leader": self.me, "view": self.view()}):
            name, reply = await answer
            if self.role != "leader" or self.term != term:
                return
            if reply is None:
                continue
            if reply.get("term", 0) > self.term:
                self._set("follower", reply["term"], None)
                self.deadline = self._new_deadline()
                return
            if reply.get("ok"):
                acks += 1
                self.peers[name].last_ack = time.monotonic()
                self.peers[name].replica = reply.get("replica") or {}
                if acks >= self.majority:
                    self.lease_until = max(self.lease_until, sent + self.lease_s)
                    self.confirmed_at = max(self.confirmed_at or sent, sent)

    async def _majority_grants(self, message: dict) -> bool | None:
        """Whether a majority (this member included) grants the vote ``message`` asks for, decided
        as soon as the answers decide it; None when an answer shows a newer term (adopted)."""
        granted, undecided = 1, len(self.peers)
        if granted >= self.majority:
            return True
        for answer in self._ask("/_control/vote", message):
            _, reply = await answer
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
        if not await self._majority_grants({"pre": True, "proposed": self.term + 1}):
            self.deadline = self._new_deadline()
            return
        if self.role != "follower" or time.monotonic() - self.last_contact < self.election_timeout_s[0]:
            return  # a leader was heard (or a vote given) meanwhile
        started = time.monotonic()
        self._set("candidate", self.term + 1, None)
        self._vote_for(self.me)
        self._count("elections")
        term = self.term
        won = await self._majority_grants({})
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
        if term < self.term or sender not in self.members:
            return {"ok": False, "term": self.term}
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
        return {"ok": True, "term": self.term, "replica": self.replica_state()}

    def handle_vote(self, message: dict) -> dict:
        """A vote, or with ``pre`` a pre-vote: whether this member would vote for the sender in
        the term it ``proposed``, which changes nothing here."""
        term, candidate = message["term"], message["from"]
        now = time.monotonic()
        if candidate not in self.members or self.members[candidate].witness:
            return {"granted": False, "term": self.term}
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
                       help="where this member keeps its term and vote across restarts (default: "
                       "$XDG_STATE_HOME/ringleader/cluster-<hash of --cluster>/<name>)")  # fmt: skip


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
    members = parse_members(args.cluster)
    if not args.name:
        raise ConfigError("--cluster needs --name (this member's name)")
    if not args.cluster_secret:
        raise ConfigError(
            "--cluster needs --cluster-secret or RINGLEADER_CLUSTER_SECRET (the same on every member)"
        )
    for flag in ("heartbeat_ms", "lease_ms", "election_timeout_ms", "serve_without_leader_ms"):
        value = getattr(args, flag, None)
        if value is not None and not value > 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    signer = Signer(args.cluster_secret)
    election = args.election_timeout_ms / 1000
    grace = getattr(args, "serve_without_leader_ms", None)
    state_dir = getattr(args, "state_dir", None) or default_state_dir(args.cluster, args.name)
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
    """``POST /_control/heartbeat`` and ``/_control/vote`` on ``app`` (aiohttp)."""
    from aiohttp import web

    def handler(method):
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            try:
                message = verified(body, request.headers.get(SIGNATURE), signer, metrics)
            except Forged as e:
                return web.json_response({"error": f"control message refused: {e.reason}"}, status=403)
            return web.json_response(method(message))

        return handle

    app.router.add_post("/_control/heartbeat", handler(cluster.handle_heartbeat))
    app.router.add_post("/_control/vote", handler(cluster.handle_vote))


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
    }
