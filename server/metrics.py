"""Per-request latency and token metrics, with vLLM's meanings, for whoever hands out a request's
tokens: the engine loop of a single server, or a cluster leader's router."""

from __future__ import annotations

import collections
import time

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engine.request import StepOutput


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


class RequestRate:
    """Requests accepted per second over about the last ``window_s``, from the samples of the
    accepted-requests counter that the scrapes take (the first over the time since the start)."""

    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self.samples: collections.deque[tuple[float, float]] = collections.deque([(time.monotonic(), 0.0)])

    def update(self, total: float) -> float:
        now = time.monotonic()
        while len(self.samples) > 1 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()  # keep the newest sample at least a window old, and all younger
        then, before = self.samples[0]
        self.samples.append((now, total))
        return (total - before) / (now - then) if now > then else 0.0


def make_metrics() -> dict:
    """The server's Prometheus registry and metrics, with vLLM's names under the ``ringleader_``
    prefix (the cluster's are added by ``server.cluster.cluster_metrics``)."""
    registry = CollectorRegistry()
    latency_buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
    r = registry
    process = psutil.Process()
    process.cpu_percent(interval=None)  # the first call only starts the measurement
    return {
        "registry": registry,
        "process": process,
        "requests": Counter("ringleader_requests", "completion requests accepted", registry=r),
        "steps": Counter("ringleader_engine_steps", "engine steps run", registry=r),
        "running": Gauge("ringleader_num_requests_running", "sequences in the running batch", registry=r),
        "waiting": Gauge("ringleader_num_requests_waiting", "sequences waiting to start", registry=r),
        "free_blocks": Gauge("ringleader_free_kv_blocks", "free KV cache blocks", registry=r),
        "cached_free_blocks": Gauge(
            "ringleader_cached_free_kv_blocks", "free KV cache blocks that hold a cached prefix", registry=r
        ),
        "prefix_cache_queries": Counter(
            "ringleader_prefix_cache_queries", "tokens looked up in the prefix cache", registry=r
        ),
        "prefix_cache_hits": Counter(
            "ringleader_prefix_cache_hits", "tokens found in the prefix cache", registry=r
        ),
        "engine_totals": {},
        "kv_usage": Gauge("ringleader_kv_cache_usage_perc", "fraction of KV cache blocks in use", registry=r),
        # what an autoscaler reads (README, "Scaling a cluster"): this member as a front end
        "in_flight": Gauge(
            "ringleader_front_end_requests_in_flight",
            "requests this member accepted from its clients and has not finished, wherever they run",
            registry=r,
        ),
        "request_rate": Gauge(
            "ringleader_request_rate_per_second",
            "requests this member accepted per second, over about the last minute",
            registry=r,
        ),
        "rate_window": RequestRate(),
        "prompt_tokens": Counter("ringleader_prompt_tokens", "prompt tokens received", registry=r),
        "generation_tokens": Counter("ringleader_generation_tokens", "tokens generated", registry=r),
        "finished": Counter(
            "ringleader_request_success", "finished requests", ["finished_reason"], registry=r
        ),
        # server.response_cache: every deterministic request's lookup is one of hit, miss or error
        "response_cache_hits": Counter(
            "ringleader_response_cache_hits", "requests answered from the response cache", registry=r
        ),
        "response_cache_misses": Counter(
            "ringleader_response_cache_misses", "deterministic requests computed, then stored", registry=r
        ),
        "response_cache_errors": Counter(
            "ringleader_response_cache_errors",
            "response cache lookups and stores that failed or were skipped after a failure",
            registry=r,
        ),
        "ttft": Histogram(
            "ringleader_time_to_first_token_seconds",
            "time to first token",
            buckets=latency_buckets,
            registry=r,
        ),  # fmt: skip
        "itl": Histogram(
            "ringleader_inter_token_latency_seconds",
            "time between tokens",
            buckets=latency_buckets,
            registry=r,
        ),  # fmt: skip
        "e2e": Histogram(
            "ringleader_e2e_request_latency_seconds", "request latency", buckets=latency_buckets, registry=r
        ),  # fmt: skip
        "queue_time": Histogram(
            "ringleader_request_queue_time_seconds",
            "time before admission",
            buckets=latency_buckets,
            registry=r,
        ),  # fmt: skip
        "cpu": Gauge("ringleader_process_cpu_percent", "CPU use of the server process", registry=r),
        "rss": Gauge("ringleader_process_resident_memory_bytes", "resident memory of the server", registry=r),
        "gpu_memory": Gauge(
            "ringleader_gpu_memory_used_bytes", "GPU memory in use (NVML)", ["gpu"], registry=r
        ),
        "gpu_util": Gauge(
            "ringleader_gpu_utilization_percent", "GPU utilisation (NVML)", ["gpu"], registry=r
        ),
    }
