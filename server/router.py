"""A member's router: each request goes to a live replica, and moves on when its replica is lost.

Every member of a cluster serves one model replica (its node's tp x pp ranks) and is a front end:
it routes each request of its own clients to a replica (``server.routing``'s policy over what it
knows of their load and caches), its own through an in-process call, the others' over
``POST /_control/generate``: a signed request that streams token ids back as JSON lines
(``encode_line`` on the replica's side, ``decode_line`` here). Which replicas are alive and ready
it learns from the leader's heartbeats, which carry every member's last report.

The front end keeps, for every request, the prompt, the seed it fixed, and the tokens generated so
far, and makes the text itself (incremental detokenization and stop strings), so the text a client
sees depends only on the token ids. When a replica is lost in the middle of a request (its stream
breaks, or the control plane declares its member dead), the request goes to another live replica
with the tokens it already has: that replica prefills prompt plus tokens and goes on from there,
with the same seed and sample counters, so the client's stream has no repeated and no missing
token, and a seeded request gives the same text as without the failure.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import secrets
import sys
import time

import aiohttp

from engine.errors import RequestError
from engine.request import SamplingParams, Sequence, StepOutput
from server.cluster import Cluster, Signer
from server.engine_loop import ServerShutdown
from server.metrics import RequestTimings
from server.routing import PrefixIndex, RoutingPolicy, prompt_hashes


class LineError(Exception):
    """A control stream's error line: ``request`` (the replica refused the request) or
    ``replica`` (it failed running it)."""

    def __init__(self, message: str, kind: str, param: str | None = None):
        super().__init__(message)
        self.kind, self.param = kind, param


def encode_line(item) -> bytes:
    """One queue item of a sequence run for another member, as a line of its control stream."""
    if isinstance(item, RequestError):
        line = {"error": str(item), "kind": "request", "param": item.param}
    elif isinstance(item, Exception):
        line = {"error": str(item), "kind": "replica"}
    else:
        line = {"t": item.token_ids, "f": item.finish_reason, "lp": item.logprobs, "c": item.cached_tokens,
                "s": item.stop_reason}  # fmt: skip
    return json.dumps(line).encode() + b"\n"


def decode_line(request_id: str, line: bytes) -> StepOutput:
    """A control stream's line as the step output it carries; an error line raises LineError."""
    item = json.loads(line)
    if "error" in item:
        raise LineError(item["error"], item.get("kind", "replica"), item.get("param"))
    return StepOutput(request_id, item["t"], "", item.get("f"), item.get("lp"), item.get("s"), item.get("c"))


class ReplicaLost(Exception):
    """The replica running a request is gone; the request can go on elsewhere."""


class NoReplica(Exception):
    """No live replica took the request in time."""


class LocalReplica:
    """This member's own replica, through its engine loop."""

    def __init__(self, name: str, engine_loop):
        self.name, self.loop = name, engine_loop

    def routable(self) -> bool:
        loop = self.loop
        return loop.fatal is None and not loop.draining and loop.task is not None and not loop.stalled()

    async def generate(self, rid, prompt, generated, params, priority, timeout_s):
        queue = self.loop.submit(rid, prompt, params, priority, timeout_s, generated or None, observe=False)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), 0.2)
                except asyncio.TimeoutError:
                    if self.loop.stalled():
                        raise ReplicaLost(f"{self.name}: a step ran past the step deadline") from None
                    continue
                if isinstance(item, RequestError):
                    raise item
                if isinstance(item, Exception):
                    raise ReplicaLost(f"{self.name}: {item}")
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.loop.cancel(rid)


class RemoteReplica:
    """Another member's replica, over its control endpoint."""

    def __init__(self, name: str, cluster: Cluster, signer: Signer, session: aiohttp.ClientSession):
        self.name, self.cluster, self.signer, self.session = name, cluster, signer, session
        self.url = cluster.members[name].url

    def routable(self) -> bool:
        peer = self.cluster.peers.get(self.name)
        return (
            peer is not None
            and self.name in self.cluster.members
            and self.cluster.alive(self.name)
            and peer.replica.get("state") == "ready"
        )

    async def generate(self, rid, prompt, generated, params, priority, timeout_s):
        message = {
            "from": self.cluster.me,
            "term": self.cluster.term,
            "request_id": rid,
            "prompt": prompt,
            "generated": generated,
            "params": dataclasses.asdict(params),
            "priority": priority,
            "timeout_s": timeout_s,
        }
        body, headers = self.signer.sign(message)
        url = self.url + "/_control/generate"
        response = None
        try:
            response = await self._watch(self.session.post(url, data=body, headers=headers))
            if response.status == 400:
                error = await response.json()
                raise RequestError(error.get("error", "refused"), param=error.get("param"))
            if response.status != 200:
                raise ReplicaLost(f"{self.name} answered {response.status}")
            stream, pending = response.content, b""
            while True:
                # what has arrived, at once; a wait (watched) only when nothing has: under load many
                # lines arrive together, and are read in one go
                data = stream.read_nowait()
                if not data and not stream.at_eof():
                    data = await self._watch(stream.readany())
                if not data:
                    raise ReplicaLost(f"{self.name} ended the stream early")
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    try:
                        out = decode_line(rid, line)
                    except LineError as e:
                        if e.kind == "request":
                            raise RequestError(str(e), param=e.param) from None
                        raise ReplicaLost(f"{self.name}: {e}") from None
                    yield out
                    if out.finish_reason is not None:
                        return
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            raise ReplicaLost(f"{self.name}: {type(e).__name__}: {e}") from None
        finally:
            if response is not None:
                response.close()  # ends the request there too, if it is still running

    async def _watch(self, awaitable):
        """``awaitable``'s result, unless this replica's member is declared dead first: a hung
        node still accepts connections (the kernel does) but never answers."""
        task = asyncio.ensure_future(awaitable)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.cluster.heartbeat_s * 2)
                if done:
                    return task.result()
                if not self.cluster.alive(self.name):
                    raise ReplicaLost(f"{self.name} stopped answering")
                peer = self.cluster.peers.get(self.name)
                if peer is None or peer.replica.get("state") == "stalled":
                    raise ReplicaLost(f"{self.name}: a step ran past the step deadline")
        finally:
            if not task.done():
                task.cancel()


class Router:
    """A member's front end for requests: the same calls as the local engine loop (submit,
    cancel, outstanding, drain), over every live replica of the cluster."""

    def __init__(self, local_loop, cluster: Cluster, signer: Signer, tokenizer, eos_ids, max_len, metrics):
        self.local_loop, self.cluster, self.signer = local_loop, cluster, signer
        self.tokenizer, self.eos_ids, self.max_len, self.metrics = tokenizer, eos_ids, max_len, metrics
        self.session: aiohttp.ClientSession | None = None
        self.replicas: dict = {}
        self.load: dict[str, int] = {}  # requests routed to each replica and not finished there
        self.lost: dict[str, float] = {}  # replicas taken out of routing, and since when
        self.queues: dict[str, asyncio.Queue] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.route_timeout_s = 30.0
        self.timings = RequestTimings(metrics)  # a member's metrics count every request it routes
        # where requests go (server.routing): the policy, and what each replica is believed to cache
        self.policy = RoutingPolicy()
        self.block_size = 16
        self.index = PrefixIndex(1 << 16)
        self.routed: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.front_draining = False
        self.replicas_of_own = True  # False: a front end with no replica (serve --no-replica)

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=2))
        if self.replicas_of_own:
            self.replicas[self.cluster.me] = LocalReplica(self.cluster.me, self.local_loop)
            self.load[self.cluster.me] = 0
        self.sync_replicas()

    def sync_replicas(self) -> None:
        """A replica for every member of the configuration with a model; one whose member left
        stays until its last request here has finished, out of routing."""
        if self.session is None:
            return  # not started: start() syncs
        for name, member in self.cluster.members.items():
            if name not in self.replicas and not member.witness and name != self.cluster.me:
                self.replicas[name] = RemoteReplica(name, self.cluster, self.signer, self.session)
                self.load.setdefault(name, 0)
        for name in [n for n in self.replicas if n != self.cluster.me and n not in self.cluster.members]:
            if self.load.get(name, 0) == 0:
                del self.replicas[name]
                self.load.pop(name, None)
                self.index.drop(name)

    async def stop(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        if self.session is not None:
            await self.session.close()

    # the engine loop's interface, as the HTTP handlers use it

    @property
    def draining(self) -> bool:
        """Whether this front end refuses new requests (it is shutting down)."""
        return self.front_draining

    @property
    def fatal(self):
        return None  # losing the local replica does not stop the front end: it routes elsewhere

    @property
    def task(self):
        return self.local_loop.task

    def outstanding(self) -> int:
        return len(self.queues)

    def submit(self, request_id, prompt, params: SamplingParams, priority, timeout_s=None, generated=None):
        if params.seed is None:  # fixed here, so that a request moved to another replica draws the same
            params = dataclasses.replace(params, seed=secrets.randbits(63))
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = queue
        self.tasks[request_id] = asyncio.create_task(
            self._drive(request_id, prompt, params, priority, timeout_s)
        )
        return queue

    def cancel(self, request_id: str) -> None:
        task = self.tasks.get(request_id)
        if task is not None and not task.done():
            task.cancel()

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests; give every request this member routed, to any replica,
        ``timeout_s`` to finish; fail the rest with ``ServerShutdown``."""
        self.local_loop.draining = self.front_draining = True
        deadline = time.monotonic() + timeout_s
        while self.queues and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = list(self.queues)
        for request_id in left:
            queue = self.queues.pop(request_id)
            self.tasks[request_id].cancel()
            queue.put_nowait(ServerShutdown.after(timeout_s))
        await self.local_loop.drain(max(0.0, deadline - time.monotonic()))
        return len(left)

    async def retire(self, notice_s: float, timeout_s: float) -> int:
        """Before this member leaves the cluster: its replica takes no new sequence (``/ready``
        turns 503 and every front end routes elsewhere) while this front end goes on taking its
        clients' requests for ``notice_s``, long enough for a load balancer's health checks to
        notice, and sends them to the other replicas; then it drains as on shutdown. Returns how
        many requests the drain failed."""
        self.local_loop.draining = True
        await asyncio.sleep(notice_s)
        return await self.drain(timeout_s)

    def replica_rows(self) -> list[dict]:
        return [
            {
                "name": n,
                "routable": self._routable(n),
                "outstanding": self.load[n],
                "routed": dict(self.routed[n]),  # requests sent there, by why ("cache", "load", "balance")
                "indexed_blocks": self.index.size(n),  # blocks the router believes it caches
            }
            for n in self.replicas
        ]

    # routing

    def _routable(self, name: str) -> bool:
        replica = self.replicas[name]
        if not replica.routable():
            return False
        lost = self.lost.get(name)
        if lost is not None:
            peer = self.cluster.peers.get(name)
            # back in routing once its member has answered a heartbeat, ready, since it was lost
            if peer is None or peer.last_ack is None or peer.last_ack <= lost:
                return False
            del self.lost[name]
        return True

    def any_routable(self) -> bool:
        return any(self._routable(n) for n in self.replicas)

    def _load(self) -> dict[str, int]:
        """Each replica's outstanding requests as far as this front end knows: its own routed
        ones, or the replica's whole count when that is larger (its member's last report, carried
        by the leader's heartbeats, counts the requests of every front end)."""
        load = dict(self.load)
        for name in load:
            if name == self.cluster.me:
                reported = self.local_loop.outstanding()
            else:
                peer = self.cluster.peers.get(name)
                reported = (peer.replica.get("outstanding") or 0) if peer is not None else 0
            load[name] = max(load[name], int(reported))
        return load

    async def _pick(self, deadline: float, tokens: list[int]) -> str:
        """A routable replica for a sequence whose known tokens are ``tokens`` (``server.routing``)."""
        hashes = prompt_hashes(tokens, self.block_size) if self.policy.policy == "cache-aware" else []
        while True:
            names = []
            for n in self.replicas:
                if self._routable(n):
                    names.append(n)
                else:
                    self.index.drop(n)  # out of routing: whatever it cached may be gone with it
            if names:
                name, why = self.policy.pick(
                    names, self._load(), self.index, hashes, len(tokens), self.block_size, self.cluster.me
                )
                self.routed[name][why] += 1
                self.index.insert(name, hashes)
                return name
            if time.monotonic() >= deadline:
                raise NoReplica("no live replica to run the request")
            await asyncio.sleep(0.05)

    async def _drive(self, rid, prompt, params: SamplingParams, priority, timeout_s) -> None:
        queue = self.queues[rid]
        seq = Sequence(0, prompt, params, self.eos_ids, self.tokenizer)
        self.timings.start(rid, len(prompt))

        def put(out: StepOutput) -> None:
            self.timings.observe(rid, out)
            queue.put_nowait(out)

        attempt = 0
        try:
            while seq.finish is None:
                name = await self._pick(time.monotonic() + self.route_timeout_s, prompt + seq.out)
                attempt += 1
                self.load[name] += 1
                try:
                    async for out in self.replicas[name].generate(
                        f"{rid}#{attempt}", prompt, list(seq.out), params, priority, timeout_s
                    ):
                        if out.finish_reason in ("timeout", "abort"):
                            put(StepOutput(rid, [], seq.text_delta(), out.finish_reason))
                            return
                        for i, token in enumerate(out.token_ids):
                            seq.append(token, self.max_len)
                            lp = [out.logprobs[i]] if out.logprobs else None
                            put(StepOutput(rid, [token], seq.text_delta(), seq.finish, lp, seq.stop_reason,
                                           out.cached_tokens))  # fmt: skip
                            if seq.finish is not None:
                                # its whole sequence is cached there now (a next turn starts with it)
                                self.index.insert(name, prompt_hashes(prompt + seq.out[:-1], self.block_size))
                                return
                        if out.finish_reason is not None:
                            # the replica ended it for a reason this side did not see (both sides
                            # apply the same rules, so this is not expected): its word stands
                            seq.finish = out.finish_reason
                            put(StepOutput(rid, [], seq.text_delta(), seq.finish, None, out.stop_reason))
                            return
                except ReplicaLost as e:
                    self.index.drop(name)  # whatever it cached is gone with it
                    if name not in self.lost:
                        self.lost[name] = time.monotonic()
                        self._count("failovers")
                    self._count("rerouted")
                    print(f"ringleader: request {rid} moves on from replica {e}", file=sys.stderr, flush=True)
                finally:
                    self.load[name] -= 1
                    if name not in self.cluster.members:
                        self.sync_replicas()  # its member left: forget it once nothing runs there
        except RequestError as e:
            queue.put_nowait(e)
        except NoReplica as e:
            queue.put_nowait(e)
        finally:
            self.timings.end(rid)
            self.queues.pop(rid, None)
            self.tasks.pop(rid, None)

    def _count(self, name: str) -> None:
        metric = self.metrics.get(name)
        if metric is not None:
            metric.inc()
