"""The engine driver of a front end, with no transport in it, and the interface front ends use.

``EngineLoop`` owns one replica's engine. ``RequestFront`` is what a front end (HTTP today) sees
of where requests go: the engine loop of a single server, or a cluster leader's router
(``server.router.Router``) over every replica. Outputs arrive on the queue ``submit`` returns:
``StepOutput``s until one has a finish reason, or one exception (``RequestError`` for a request
the engine refused, ``ServerShutdown`` when the drain time ran out, the error of a failed step).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Protocol

from engine.errors import RequestError
from engine.request import SamplingParams, StepOutput
from engine.scheduler import Engine
from server.metrics import RequestTimings


class ServerShutdown(Exception):
    """Delivered to requests still running when the server's drain time is over."""

    @classmethod
    def after(cls, drain_s: float) -> ServerShutdown:
        return cls(f"the server shut down before the request finished (drain time {drain_s:g} s)")


class RequestFront(Protocol):
    """Where a front end's requests go."""

    @property
    def draining(self) -> bool: ...

    @property
    def fatal(self) -> BaseException | None: ...

    @property
    def task(self) -> asyncio.Task | None: ...

    def outstanding(self) -> int: ...

    def submit(
        self, request_id: str, prompt: list[int], params: SamplingParams, priority: int, timeout_s=None
    ) -> asyncio.Queue: ...

    def cancel(self, request_id: str) -> None: ...

    async def drain(self, timeout_s: float) -> int: ...


class EngineLoop:
    """Owns the engine: the only code that calls it. One task (``run``) hands new requests and
    cancellations to the engine between steps and runs each step in a worker thread, so the event
    loop never blocks on the model; every step's outputs go to the waiting queues."""

    def __init__(self, engine: Engine, metrics: dict):
        self.engine, self.metrics = engine, metrics
        self.incoming: list[tuple[str, list[int], SamplingParams, int]] = []
        self.cancels: list[str] = []
        self.calls: list[tuple] = []  # (function, future): run on the engine between two steps
        self.after_step: list = []  # functions called (no arguments) after every step, between steps
        self.queues: dict[str, asyncio.Queue] = {}
        self.wake = asyncio.Event()
        self.steps = 0
        self.task: asyncio.Task | None = None
        self.timings = RequestTimings(metrics)
        self.draining = False
        self.stopping = False
        self.idle = asyncio.Event()  # set whenever no request is outstanding
        self.fatal: BaseException | None = None  # why the replica can no longer run steps
        self.on_fatal = None  # called with that error
        self.step_started: float | None = None  # when the step in progress began
        self.step_deadline_s: float | None = None  # a step running longer is a hung replica
        # every step runs on this one thread: torch's intra-op (OpenMP) threads belong to the thread
        # that calls into torch, and steps handed to whichever thread of a shared pool is free keep
        # a team of them per caller, the idle team spinning on the cores the busy one needs
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine-step")

    def stalled(self) -> bool:
        """A step has run past the step deadline: a rank of the replica hangs."""
        started, deadline = self.step_started, self.step_deadline_s
        return started is not None and deadline is not None and time.monotonic() - started > deadline

    def submit(
        self, request_id, prompt, params, priority, timeout_s=None, generated=None, observe=True
    ) -> asyncio.Queue:
        """Queue a request; its outputs (or an exception) arrive on the returned queue. ``observe``:
        count it in the latency metrics (not when a cluster's router already does)."""
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = queue
        self.idle.clear()
        if observe:
            self.timings.start(request_id, len(prompt))
        self.incoming.append((request_id, prompt, params, priority, timeout_s, generated))
        self.wake.set()
        return queue

    async def drain(self, timeout_s: float) -> int:
        """Stop taking requests, give the running ones ``timeout_s`` to finish, then fail the rest
        with ``ServerShutdown``. Returns how many were failed."""
        self.draining = True
        if self.queues:
            try:
                await asyncio.wait_for(self.idle.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        left = list(self.queues)
        for request_id in left:
            self.cancel(request_id)
            self._deliver(
                request_id,
                ServerShutdown.after(timeout_s),
            )
        return len(left)

    def cancel(self, request_id: str) -> None:
        if request_id in self.queues:
            self.cancels.append(request_id)
            self.wake.set()

    def outstanding(self) -> int:
        return len(self.queues)

    async def between_steps(self, fn):
        """Run ``fn(engine)`` between two steps (never while one runs) and return what it returns."""
        if self.stopping or self.fatal is not None or self.task is None or self.task.done():
            raise ServerShutdown("the engine loop is not running")
        future = asyncio.get_running_loop().create_future()
        self.calls.append((fn, future))
        self.wake.set()
        return await future

    def stop(self) -> None:
        """End the loop after the step in progress (a step is never cut off halfway: on a
        multi-rank replica the other ranks are in the middle of it too)."""
        self.stopping = True
        self.wake.set()

    async def _sleep(self, seconds: float | None) -> bool:
        """Wait for news (True) or ``seconds`` (False)."""
        self.wake.clear()
        try:
            await asyncio.wait_for(self.wake.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.executor.shutdown(wait=False)
            for _, future in self.calls:
                if not future.done():
                    future.set_exception(ServerShutdown("the engine loop has stopped"))
            self.calls.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        keepalive = self.engine.keepalive_s
        while not self.stopping:
            self._run_calls()
            idle = not (self.incoming or self.cancels or self.engine.has_work())
            held = 0.0 if idle or self.incoming or self.cancels else self.engine.idle_for()
            if idle or held > 0:
                # nothing to do, or new requests held back to batch them (max wait); a replica on
                # other ranks hears from the head at least every keepalive interval
                delay = held or None
                if keepalive is not None:
                    delay = keepalive if delay is None else min(delay, keepalive)
                if not await self._sleep(delay) and idle and keepalive is not None:
                    await loop.run_in_executor(self.executor, self.engine.keepalive)
                continue
            for request_id, prompt, params, priority, timeout_s, generated in self.incoming:
                try:
                    self.engine.add_request(request_id, prompt, params, priority, timeout_s, generated)
                except RequestError as e:
                    self._deliver(request_id, e)
            self.incoming.clear()
            for request_id in self.cancels:
                self.engine.abort(request_id)
            self.cancels.clear()
            if not self.engine.has_work():
                continue
            try:
                self.step_started = time.monotonic()
                outputs = await loop.run_in_executor(self.executor, self.engine.step)
            except Exception as e:
                # a failed step fails its requests, never the server; a replica that lost a rank
                # cannot run another step, so the server stops serving (and says so on /ready)
                for request_id in list(self.queues):
                    self.engine.abort(request_id)
                    self._deliver(request_id, e)
                if self.engine.distributed:
                    self.fatal = e
                    if self.on_fatal is not None:
                        self.on_fatal(e)
                    return
                continue
            finally:
                self.step_started = None
            self.steps += 1
            self.metrics["steps"].inc()
            for out in outputs:
                self._deliver(out.request_id, out)
            for fn in self.after_step:
                fn()

    def _run_calls(self) -> None:
        calls, self.calls = self.calls, []
        for fn, future in calls:
            if future.done():
                continue
            try:
                future.set_result(fn(self.engine))
            except Exception as e:
                future.set_exception(e)
        if calls:
            for fn in self.after_step:
                fn()

    def _deliver(self, request_id: str, item) -> None:
        queue = self.queues.get(request_id)
        if queue is None:
            return
        queue.put_nowait(item)
        if isinstance(item, StepOutput):
            self.timings.observe(request_id, item, self.engine.admitted_at(request_id))
        if not isinstance(item, StepOutput) or item.finish_reason is not None:
            del self.queues[request_id]
            self.timings.end(request_id)
            self.engine.forget(request_id)
            if not self.queues:
                self.idle.set()
