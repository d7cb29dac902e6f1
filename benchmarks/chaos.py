"""Chaos benchmark: repeat each fault on an emulated three-node cluster under steady load.

Three nodes (separate ``./launch.sh serve --cluster`` processes on this host, one replica each,
the tiny demo model) serve a steady load of streaming and non-streaming greedy requests from the
official openai client, sent through a proxy that follows ``/ready``. Each repetition of a fault:

- ``follower``: SIGKILL a follower. Detection: until the leader's ``/cluster`` shows it dead.
  Failover: until the leader no longer routes to it. Then the node is started again (rejoin).
- ``leader``: SIGKILL the leader. Detection: until a survivor has started an election (its term
  went up). Failover: until a new leader answers ``/ready`` 200. Then the old leader is restarted.
- ``pause``: SIGSTOP the leader for twice its lease, then SIGCONT. Detection and failover as for
  ``leader``; the old leader must have stepped down.

Every completed request is checked against the model's greedy output. The clients never retry on
their own (the openai client with ``max_retries=0``). After a follower fault nothing is retried:
any error counts as failed. After a leader fault a request whose connection broke, or that was
answered 502/503 while there was no leader, is sent again by its client thread, and each such
retry is counted ("client retries"). Reported per fault: the median and max of detection and
failover times, requests sent, completed, failed and lost (sent but neither completed nor failed:
must be 0), client retries, requests the leader moved to another replica
(``ringleader_rerouted_requests_total``), and the output-token throughput in the 3 s before the
fault, from the fault until the cluster had recovered, and in the 3 s after.

    python benchmarks/chaos.py --repeats 10
    python benchmarks/chaos.py --faults follower --repeats 3 --result-json chaos.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.testing.cluster import LEASE_MS, NAMES, Cluster, Load, Proxy, expected_outputs, member  # noqa: E402

REROUTED = "ringleader_rerouted_requests_total"

WINDOW_S = 3.0


def _wait(predicate, timeout: float, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return None


def _routable(cluster: Cluster, leader: str, name: str) -> bool:
    return bool(cluster.replica(leader, name).get("routable"))


def one(kind: str, cluster: Cluster, proxy: Proxy, expected: dict, workers: int) -> dict:
    leader = cluster.heal()
    term = (cluster.state(leader) or {}).get("term", 0)
    rerouted = cluster.counter(leader, REROUTED)
    load = Load(proxy, expected, workers=workers, retry=kind != "follower")
    time.sleep(WINDOW_S)
    fault = time.monotonic()
    if kind == "follower":
        victim = next(n for n in NAMES if n != leader)
        cluster.nodes[victim].proc.send_signal(signal.SIGKILL)
        _wait(lambda: member(cluster.state(leader), victim).get("alive") is False, 10)
        detection = time.monotonic() - fault
        _wait(lambda: not _routable(cluster, leader, victim), 10)
        failover = time.monotonic() - fault
        moved = int(cluster.counter(leader, REROUTED) - rerouted)
    else:
        victim = leader
        node = cluster.nodes[leader]
        node.proc.send_signal(signal.SIGKILL if kind == "leader" else signal.SIGSTOP)
        others = [n for n in NAMES if n != leader]
        _wait(lambda: any((cluster.state(n) or {}).get("term", 0) > term for n in others), 10)
        detection = time.monotonic() - fault
        new = cluster.leader(timeout=10, among=others)
        failover = time.monotonic() - fault
        if kind == "pause":
            time.sleep(max(0.0, 2 * LEASE_MS / 1000 - (time.monotonic() - fault)))
            node.proc.send_signal(signal.SIGCONT)
            if not _wait(lambda: (cluster.state(leader) or {}).get("role") not in (None, "leader"), 10):
                raise RuntimeError("the paused leader did not step down")
        assert new != leader
        moved = None  # the dead leader's counters went with it; its clients retry
    recovered = time.monotonic()
    time.sleep(WINDOW_S)
    end = time.monotonic()
    figures = load.finish()
    if load.wrong:
        raise RuntimeError(f"{len(load.wrong)} outputs differ from the model's greedy output")
    if proxy.two_leaders():
        raise RuntimeError("two nodes answered /ready 200 in one poll round")
    return {
        "fault": kind,
        "victim": victim,
        "detection_s": round(detection, 3),
        "failover_s": round(failover, 3),
        **figures,
        "rerouted": moved,
        "tok_s_before": round(load.tokens_per_s(fault - WINDOW_S, fault), 1),
        "tok_s_during": round(load.tokens_per_s(fault, recovered), 1) if recovered - fault > 0.2 else None,
        "tok_s_after": round(load.tokens_per_s(recovered, end), 1),
    }


def summarise(runs: list[dict]) -> dict:
    def stat(key):
        values = [r[key] for r in runs if r[key] is not None]
        return (round(statistics.median(values), 3), round(max(values), 3)) if values else (None, None)

    total = {k: sum(r[k] for r in runs) for k in ("sent", "completed", "failed", "lost", "retried")}
    moved = [r["rerouted"] for r in runs if r["rerouted"] is not None]
    total["rerouted"] = int(sum(moved)) if moved else None
    return {
        "fault": runs[0]["fault"],
        "repeats": len(runs),
        "detection_s": stat("detection_s"),
        "failover_s": stat("failover_s"),
        **total,
        "tok_s_before": stat("tok_s_before")[0],
        "tok_s_during": stat("tok_s_during")[0],
        "tok_s_after": stat("tok_s_after")[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", default="follower,leader,pause")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4, help="client threads (half stream)")
    parser.add_argument("--model", default=None, help="checkpoint (default: the tiny demo, built here)")
    parser.add_argument("--result-json", default=None)
    args = parser.parse_args()
    kinds = [k.strip() for k in args.faults.split(",")]
    unknown = set(kinds) - {"follower", "leader", "pause"}
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from engine.demo import build_demo

            model = build_demo(Path(tmp) / "tiny", preset="tiny")
        expected = expected_outputs(model)
        cluster = Cluster(model)
        proxy = Proxy(cluster)
        results = {}
        try:
            for kind in kinds:
                runs = []
                for _ in range(args.repeats):
                    try:
                        run = one(kind, cluster, proxy, expected, args.workers)
                    except (AssertionError, RuntimeError):
                        for name, node in cluster.nodes.items():
                            print(f"--- {name} (exit {node.proc.poll()}):\n{''.join(node.lines[-15:])}")
                        raise
                    print(json.dumps(run), flush=True)
                    runs.append(run)
                results[kind] = {"runs": runs, "summary": summarise(runs)}
        finally:
            proxy.stop()
            cluster.stop()
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    print(f"\n{command}\n{datetime.date.today()}, {os.cpu_count()} CPUs\n")
    print("| fault | repeats | detection s (median / max) | failover s (median / max) | sent | completed | "
          "failed | lost | client retries | rerouted | tok/s before | during | after |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind in kinds:
        s = results[kind]["summary"]
        cells = [kind, s["repeats"], "{} / {}".format(*s["detection_s"]), "{} / {}".format(*s["failover_s"])]
        cells += [s[k] for k in ("sent", "completed", "failed", "lost", "retried")]
        cells += ["-" if s["rerouted"] is None else s["rerouted"]]
        cells += [s[k] for k in ("tok_s_before", "tok_s_during", "tok_s_after")]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if args.result_json:
        Path(args.result_json).write_text(json.dumps({"command": command, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
