"""Per-request latency and token metrics, with vLLM's meanings, for whoever hands out a request's
tokens: the engine loop of a single server, or a cluster leader's router."""

from __future__ import annotations

import time

from engine.scheduler import StepOutput


class RequestTimings:
    """Time to first token, time between tokens, end-to-end latency and (where the engine says
    when it admitted the request) queue time; prompt and generation token totals; finished
    requests by reason. Requests not ``start``-ed here are not observed."""

    def __init__(self, metrics: dict):
        self.metrics = metrics
        self.timing: dict[str, list] = {}  # request id -> [submitted, last token]

    def start(self, request_id: str, prompt_len: int) -> None:
        self.timing[request_id] = [time.monotonic(), None]
        self.metrics["prompt_tokens"].inc(prompt_len)

    def observe(self, request_id: str, out: StepOutput, admitted: float | None = None) -> None:
        m, now, timing = self.metrics, time.monotonic(), self.timing.get(request_id)
        if timing is None:
            return
        submitted, last = timing
        if out.token_ids:
            m["generation_tokens"].inc(len(out.token_ids))
            if last is None:
                m["ttft"].observe(now - submitted)
                if admitted is not None:
                    m["queue_time"].observe(max(0.0, admitted - submitted))
            else:
                m["itl"].observe(now - last)
            timing[1] = now
        if out.finish_reason is not None:
            m["e2e"].observe(now - submitted)
            m["finished"].labels(finished_reason=out.finish_reason).inc()

    def end(self, request_id: str) -> None:
        self.timing.pop(request_id, None)
