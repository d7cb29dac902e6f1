"""The prefix cache's changes as the gateway's KV events (``SubscribeKvEvents`` of the gRPC worker
service, ``server.grpc_service``): numbered ``KvEventBatch``es of blocks stored, evicted and
cleared, snapshots of the cached blocks for a subscriber without a usable cursor, and the engine's
load on every batch and as heartbeats while idle (the messages of ``smg_grpc_proto``'s common.proto).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import time
from dataclasses import dataclass, field

import grpc
from smg_grpc_proto.generated import common_pb2

from engine.kv_cache import KVEvent
from server.engine_loop import EngineLoop, ServerShutdown

HEARTBEAT_S = 1.0  # a KV-event subscriber hears the engine's load at least this often
HISTORY_BATCHES = 4096  # KV-event batches kept for resuming subscribers and for slow ones to catch up
SNAPSHOT_CHUNK_TOKENS = 1 << 16  # token ids per snapshot chunk: what bounds a chunk's message size
DEVICE, LOCAL = common_pb2.KV_CACHE_TIER_DEVICE, common_pb2.KV_CACHE_LOCALITY_LOCAL


class Refused(Exception):
    """A gRPC call ended with a status: a request the service refuses, or a stream it must end;
    the proto field at fault, where there is one."""

    def __init__(self, code: grpc.StatusCode, field_name: str | None, message: str):
        super().__init__(f"{field_name}: {message}" if field_name else message)
        self.code, self.field = code, field_name


def _stored(blocks: list[tuple[int, tuple[int, ...]]], parent: int | None, block_size: int):
    """A KvBlocksStored: ``blocks`` (hash, token ids), a chain after ``parent``, on this device."""
    stored = common_pb2.KvBlocksStored(
        blocks=[common_pb2.KvBlock(block_hash=h, token_ids=t, block_size=block_size) for h, t in blocks],
        tier=DEVICE,
        locality=LOCAL,
    )
    if parent is not None:
        stored.parent_block_hash = parent
    return stored


def kv_event(event_id: int, event: KVEvent, block_size: int) -> common_pb2.KvCacheEvent:
    """One of the allocator's ``KVEvent``s ("stored", "removed" or "cleared") on the wire."""
    if event.kind == "stored":
        stored = _stored(list(zip(event.hashes, event.tokens)), event.parent, block_size)
        return common_pb2.KvCacheEvent(event_id=event_id, stored=stored)
    if event.kind == "removed":
        removed = common_pb2.KvBlocksRemoved(block_hashes=event.hashes, tier=DEVICE, locality=LOCAL)
        return common_pb2.KvCacheEvent(event_id=event_id, removed=removed)
    return common_pb2.KvCacheEvent(event_id=event_id, cleared=common_pb2.KvCacheCleared())


def snapshot_batches(blocks: list, seq: int, block_size: int, chunk_blocks: int) -> list:
    """The cache state ``blocks`` (``allocator.cached_blocks()``: hash, parent, token ids, parents
    first) taken at sequence ``seq`` >= 1, as KvSnapshotChunk batches numbered consecutively up to
    ``seq``: chunk 0 opens with a Cleared event, then Stored events list every block, one event per
    run of a chain, all with event_id 0. At most ``chunk_blocks`` blocks a chunk, unless ``seq``
    leaves fewer numbers than that takes chunks: then fewer, larger ones."""
    count = max(1, min(math.ceil(len(blocks) / chunk_blocks), seq))
    per = math.ceil(len(blocks) / count)
    now, batches = time.time(), []
    for index in range(count):
        events = [common_pb2.KvCacheEvent(cleared=common_pb2.KvCacheCleared())] if index == 0 else []
        run: list[tuple[int, tuple[int, ...]]] = []
        parent = None
        for h, before, tokens in blocks[index * per : (index + 1) * per]:
            if run and before != run[-1][0]:
                events.append(common_pb2.KvCacheEvent(stored=_stored(run, parent, block_size)))
                run = []
            if not run:
                parent = before
            run.append((h, tokens))
        if run:
            events.append(common_pb2.KvCacheEvent(stored=_stored(run, parent, block_size)))
        chunk = common_pb2.KvSnapshotChunk(index=index, count=count, blocks=len(blocks), unknown_before=0)
        number = seq - count + 1 + index
        batches.append(
            common_pb2.KvEventBatch(
                sequence_number=number, timestamp=now, events=events, dp_rank=0, snapshot=chunk
            )
        )
    return batches


@dataclass(eq=False)
class KvSubscriber:
    """One SubscribeKvEvents stream's place in the publisher's batches."""

    position: int  # the last publisher batch the stream covers: sent, or taken in its snapshot
    early_load: bool  # load_records_before_first_batch
    sent: int | None = None  # the last sequence number sent on the stream (None: nothing yet)
    chunks: collections.deque = field(default_factory=collections.deque)  # its snapshot, still to send
    ready: bool = True  # False until its snapshot is taken
    load_changed: bool = False  # the engine's load changed with no batch to carry it
    samples: int = 0  # load records sent
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class KvEventPublisher:
    """The engine's prefix-cache changes as numbered ``KvEventBatch``es, for every SubscribeKvEvents
    stream.

    Collection starts with the first subscriber: from then on the allocator records its events
    (``BlockAllocator.events``) and, after every engine step and every batch of calls between steps
    (``EngineLoop.after_step``, so never while a step runs), what it recorded becomes one batch,
    numbered from 1, its events numbered too. The first numbers go to the state collection starts
    from (as many as its snapshot takes chunks). The last ``HISTORY_BATCHES`` batches are kept: a
    stream that resumes after a sequence still in them gets exactly the batches after it; any other
    (start 0, a cursor older than the history or from an earlier life of the server) gets a
    snapshot of the live blocks, taken between steps and numbered to end at the sequence it was
    taken at, then the batches after that. Every stream reads from the one history, so a stream
    that falls out of it is ended (RESOURCE_EXHAUSTED) rather than buffered.

    Every batch a stream sends carries the engine's load read as it is sent (``EngineLoad``; the
    telemetry beyond the routing core on the stream's first record and on load_only ones); a
    load_only batch, numbered as the last batch the stream sent (0 before the first, and only to a
    subscriber that asks for records that early), goes out when a step admitted or finished
    requests without a KV event, and at least every ``HEARTBEAT_S`` while nothing else does."""

    def __init__(self, engine, loop: EngineLoop, history: int = HISTORY_BATCHES):
        self.engine, self.loop = engine, loop
        self.allocator = engine.allocator
        self.on = False
        self.closed = False
        self.seq = 0  # the last sequence number published
        self.history: collections.deque = collections.deque(maxlen=history)
        self.subscribers: set[KvSubscriber] = set()
        self.chunk_blocks = max(1, SNAPSHOT_CHUNK_TOKENS // engine.block_size)
        self._event_ids = itertools.count(1)
        self._core: tuple | None = None  # running and waiting last seen, to tell when they change

    def _publish(self) -> None:
        """Number what the allocator recorded since the last call as one batch, and wake the
        streams it concerns. Only between steps."""
        events = self.allocator.events
        if events:
            self.allocator.events = []
            self.seq += 1
            bs = self.engine.block_size
            batch = common_pb2.KvEventBatch(
                sequence_number=self.seq,
                timestamp=time.time(),
                events=[kv_event(next(self._event_ids), e, bs) for e in events],
                dp_rank=0,
            )
            self.history.append(batch)
        stats = self.engine.stats()
        core = (stats.running, stats.waiting)  # an admission or a completion (usage rides on the rest)
        changed, self._core = core != self._core, core
        if events or changed:
            for sub in self.subscribers:
                sub.load_changed = sub.load_changed or changed
                sub.wake.set()

    def _attach_snapshot(self, sub: KvSubscriber) -> list:
        """Subscribe ``sub`` at the current sequence and return the live blocks (between steps).
        The first call turns collection on."""
        if self.on:
            self._publish()  # what the calls before this one changed is in the state: number it first
        blocks = self.allocator.cached_blocks()
        if not self.on:
            self.allocator.events = []
            self.loop.after_step.append(self._publish)
            self.seq = max(1, math.ceil(len(blocks) / self.chunk_blocks))
            self.on = True
        sub.position = self.seq
        self.subscribers.add(sub)
        return blocks

    async def _take_snapshot(self, sub: KvSubscriber) -> None:
        try:
            blocks = await self.loop.between_steps(lambda engine: self._attach_snapshot(sub))
            bs = self.engine.block_size
            chunks = await asyncio.to_thread(snapshot_batches, blocks, sub.position, bs, self.chunk_blocks)
            sub.chunks.extend(chunks)
            sub.ready = True
        finally:
            sub.wake.set()

    def _covers(self, start: int) -> bool:
        """Whether every batch after sequence ``start`` is in the history."""
        if not self.on or not 0 < start <= self.seq:
            return False
        first = self.history[0].sequence_number if self.history else self.seq + 1
        return start >= first - 1

    def _next_batch(self, sub: KvSubscriber):
        """The publisher's batch after ``sub.position``, or None when it has none yet."""
        if sub.position >= self.seq:
            return None
        first = self.history[0].sequence_number
        if sub.position + 1 < first:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                None,
                f"the subscriber fell {self.seq - sub.position} batches behind, more than the "
                f"{self.history.maxlen} this server keeps; subscribe again with start_sequence_number 0",
            )
        return self.history[sub.position + 1 - first]

    def _load(self, sub: KvSubscriber, load_only: bool) -> common_pb2.EngineLoad:
        """The engine's load now, as a record of ``sub``'s stream."""
        engine, stats = self.engine, self.engine.stats()
        full = load_only or sub.samples == 0
        sub.samples += 1
        load = common_pb2.EngineLoad(
            running_requests=stats.running,
            waiting_requests=stats.waiting,
            token_usage=stats.kv_usage,
            active_token_usage=stats.kv_usage,  # kv_usage leaves out the cached blocks that are free
            gen_throughput=0.0,
            max_running_requests=engine.max_running,
            age_ms=0,
            sample=sub.samples,
            load_only=load_only,
        )
        if full:
            load.num_used_tokens = (stats.usable_blocks - stats.free_blocks) * engine.block_size
            load.max_total_num_tokens = stats.usable_blocks * engine.block_size
            if stats.prefix_cache_queries:
                load.cache_hit_rate = stats.prefix_cache_hits / stats.prefix_cache_queries
        return load

    async def stream(self, start: int, early_load: bool):
        """The batches of one SubscribeKvEvents stream, until the server drains or closes (or the
        caller stops iterating); ``Refused`` when the stream must end with an error."""
        sub = KvSubscriber(start, early_load)
        snapshot = None
        if self._covers(start):
            sub.sent = start
            self.subscribers.add(sub)
        else:
            sub.ready = False
            snapshot = asyncio.ensure_future(self._take_snapshot(sub))
        last_record = -math.inf
        try:
            while True:
                sub.wake.clear()
                if snapshot is not None and snapshot.done():
                    snapshot.result()  # ServerShutdown when the engine loop stopped first
                    snapshot = None
                if self.loop.fatal is not None:
                    raise Refused(grpc.StatusCode.UNAVAILABLE, None, f"the replica failed: {self.loop.fatal}")
                if self.closed or self.loop.draining:
                    return
                sent = False
                while sub.ready:
                    if sub.chunks:
                        batch = sub.chunks.popleft()
                    else:
                        batch = self._next_batch(sub)
                        if batch is None:
                            break
                        sub.position = batch.sequence_number
                    record = common_pb2.KvEventBatch()
                    record.CopyFrom(batch)
                    record.load.CopyFrom(self._load(sub, False))
                    sub.sent, sent = batch.sequence_number, True
                    yield record
                now = time.monotonic()
                may_send_load = sub.sent is not None or early_load
                if sent:
                    last_record, sub.load_changed = now, False
                elif may_send_load and (sub.load_changed or now - last_record >= HEARTBEAT_S):
                    last_record, sub.load_changed = now, False
                    yield common_pb2.KvEventBatch(
                        sequence_number=sub.sent or 0,
                        timestamp=time.time(),
                        dp_rank=0,
                        load=self._load(sub, True),
                    )
                wait = HEARTBEAT_S
                if may_send_load:
                    wait = max(0.0, last_record + HEARTBEAT_S - time.monotonic())
                # asyncio.wait, not wait_for: before Python 3.12, wait_for returns normally when the
                # event is set as the stream is cancelled, and the cancelled stream would go on
                woken = asyncio.ensure_future(sub.wake.wait())
                try:
                    await asyncio.wait((woken,), timeout=wait)
                finally:
                    woken.cancel()
        finally:
            if snapshot is not None:
                snapshot.cancel()
            self.subscribers.discard(sub)

    def _stop(self) -> None:
        if self._publish in self.loop.after_step:
            self.loop.after_step.remove(self._publish)
        self.allocator.events = None
        self.on = False

    async def close(self) -> None:
        """End every stream and stop collecting events."""
        self.closed = True
        for sub in self.subscribers:
            sub.wake.set()
        if not self.on:
            return
        try:
            await self.loop.between_steps(lambda engine: self._stop())
        except ServerShutdown:  # no step will run again: leave the allocator's list, drop the hook
            if self._publish in self.loop.after_step:
                self.loop.after_step.remove(self._publish)
