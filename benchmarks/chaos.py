"""Chaos benchmark: repeat each fault on an emulated three-node cluster under steady load.

Three nodes (separate ``./launch.sh serve --cluster`` processes on this host, one replica each,
the tiny demo model, every one a front end) serve a steady load of streaming and non-streaming
greedy requests from the official openai client, the client threads spread over the members (as a
load balancer would spread them). Each repetition of a fault:

- ``follower``: SIGKILL a follower. Detection: until the leader's ``/cluster`` shows it dead.
  Failover: until no survivor routes to it. Then the node is started again (rejoin).
- ``leader``: SIGKILL the leader. Detection: until a survivor has started an election (its term
  went up). Failover: until a new leader leads. Then the old leader is restarted.
- ``pause``: SIGSTOP the leader for twice its lease, then SIGCONT. Detection and failover as for
  ``leader``; the old leader must have stepped down.
- ``join``: a fourth member starts with ``--join`` (through a follower). Detection: until every
  member holds the committed configuration with it; failover: until its replica has run tokens for
  the others' clients. Then it leaves again (not measured).
- ``leave``: a fourth member joins (not measured), takes requests, and leaves with ``python -m
  server.members leave``. Detection: until it has exited; failover: until every member holds the
  committed configuration without it. Its replica's requests must finish (no failure).

Every completed request is checked against the model's greedy output. The clients never retry on
their own (the openai client with ``max_retries=0``). A request whose connection broke, or that was
answered 502/503, is sent again by its client thread (to another member) and each such retry is
counted, by where its client was: the clients of the victim (whose connections break with it) and
the clients of the survivors (target: none). Reported per fault: the median and max of detection
and failover times, requests sent, completed, failed and lost (sent but neither completed nor
failed: must be 0), survivors' client failures and retries, the victim's client retries, requests
the survivors moved to another replica (``ringleader_rerouted_requests_total``), and the
output-token throughput in the 3 s before the fault, from the fault until the cluster had
recovered, and in the 3 s after. A proxy polls every member all along, and a round in which two
members said they led fails the run.

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.testing.cluster import (  # noqa: E402
    LEASE_MS,
    NAMES,
    SECRET,
    Cluster,
    Load,
    Members,
    Proxy,
    expected_outputs,
    member,
)

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


def _committed(cluster: Cluster, name: str) -> set[str]:
    config = (cluster.state(name) or {}).get("config") or {}
    return set(config.get("members") or []) if config.get("id") == config.get("committed") else set()


def _operator(*args: str) -> None:
    env = {**os.environ, "RINGLEADER_CLUSTER_SECRET": SECRET}
    done = subprocess.run([sys.executable, "-m", "server.members", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"members {' '.join(args)}: {done.stderr.strip()}")


def _membership(kind: str, cluster: Cluster, leader: str, fault: float) -> tuple[float, float]:
    """(detection, failover) seconds of a join or a leave of a fourth member, started at ``fault``
    (see the module's docstring)."""
    name = f"j{int(fault * 1000) % 100000}"
    via = next(n for n in NAMES if n != leader)
    if kind == "leave":
        cluster.join(name, via=via)
        if not _wait(lambda: cluster.counter(name, "ringleader_generation_tokens_total") > 0, 10):
            raise RuntimeError(f"{name} got no requests after joining")
        fault = time.monotonic()
        _operator("leave", cluster.url(name))
        cluster.nodes[name].proc.wait(timeout=60)
        detection = time.monotonic() - fault
        if not _wait(lambda: all(_committed(cluster, n) == set(NAMES) for n in NAMES), 10):
            raise RuntimeError(f"the configuration without {name} was not committed everywhere")
        failover = time.monotonic() - fault
        cluster.forget(name)
        return detection, failover
    cluster.join(name, via=via, wait=False)
    everyone = {*NAMES, name}
    if not _wait(lambda: all(_committed(cluster, n) == everyone for n in everyone), 120):
        raise RuntimeError(f"the configuration with {name} was not committed everywhere")
    detection = time.monotonic() - fault
    if not _wait(lambda: cluster.counter(name, "ringleader_generation_tokens_total") > 0, 10):
        raise RuntimeError(f"{name} got no requests after joining")
    failover = time.monotonic() - fault
    _operator("leave", cluster.url(name))
    cluster.nodes[name].proc.wait(timeout=60)
    _wait(lambda: all(_committed(cluster, n) == set(NAMES) for n in NAMES), 10)
    cluster.forget(name)
    return detection, failover


def one(kind: str, cluster: Cluster, proxy: Proxy, expected: dict, workers: int) -> dict:
    leader = cluster.heal()
    term = (cluster.state(leader) or {}).get("term", 0)
    victim = next(n for n in NAMES if n != leader) if kind == "follower" else None if kind in (
        "join", "leave") else leader  # fmt: skip
    others = [n for n in NAMES if n != victim]  # the members whose clients must see nothing
    rerouted = cluster.total(REROUTED, others)
    polled = len(proxy.polls)
    load = Load(Members(cluster, NAMES), expected, workers=workers, retry=True)
    time.sleep(WINDOW_S)
    fault = time.monotonic()
    if kind in ("join", "leave"):
        detection, failover = _membership(kind, cluster, leader, fault)
    elif kind == "follower":
        cluster.nodes[victim].proc.send_signal(signal.SIGKILL)
        _wait(lambda: member(cluster.state(leader), victim).get("alive") is False, 10)
        detection = time.monotonic() - fault
        _wait(lambda: not any(cluster.replica(n, victim).get("routable") for n in others), 10)
        failover = time.monotonic() - fault
    else:
        node = cluster.nodes[leader]
        node.proc.send_signal(signal.SIGKILL if kind == "leader" else signal.SIGSTOP)
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
    recovered = time.monotonic()
    time.sleep(WINDOW_S)
    end = time.monotonic()
    moved = int(cluster.total(REROUTED, others) - rerouted)
    figures = load.finish()
    if load.wrong:
        raise RuntimeError(f"{len(load.wrong)} outputs differ from the model's greedy output")
    if [p for p in proxy.polls[polled:] if len(p[2]) > 1]:
        raise RuntimeError("two members said they led in one poll round")
    mine = f"{victim}:" if victim else "\0"  # a join or a leave has no victim: every client counts
    return {
        "fault": kind,
        "victim": victim,
        "detection_s": round(detection, 3),
        "failover_s": round(failover, 3),
        **figures,
        "survivor_failed": sum(not e.startswith(mine) for e in load.errors),
        "survivor_retried": sum(not r.startswith(mine) for r in load.retries),
        "victim_retried": sum(r.startswith(mine) for r in load.retries),
        "rerouted": moved,
        "tok_s_before": round(load.tokens_per_s(fault - WINDOW_S, fault), 1),
        "tok_s_during": round(load.tokens_per_s(fault, recovered), 1) if recovered - fault > 0.2 else None,
        "tok_s_after": round(load.tokens_per_s(recovered, end), 1),
    }


def summarise(runs: list[dict]) -> dict:
    def stat(key):
        values = [r[key] for r in runs if r[key] is not None]
        return (round(statistics.median(values), 3), round(max(values), 3)) if values else (None, None)

    keys = ("sent", "completed", "failed", "lost", "survivor_failed", "survivor_retried", "victim_retried",
            "rerouted")  # fmt: skip
    total = {k: sum(r[k] for r in runs) for k in keys}
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
    parser.add_argument("--faults", default="follower,leader,pause,join,leave")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--workers", type=int, default=6, help="client threads over the members")
    parser.add_argument("--model", default=None, help="checkpoint (default: the tiny demo, built here)")
    parser.add_argument("--result-json", default=None)
    args = parser.parse_args()
    kinds = [k.strip() for k in args.faults.split(",")]
    unknown = set(kinds) - {"follower", "leader", "pause", "join", "leave"}
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
          "failed | lost | survivors' clients: failed / retried | victim's clients: retried | rerouted | "
          "tok/s before | during | after |")  # fmt: skip
    print("| --- |" + " ---: |" * 13)
    for kind in kinds:
        s = results[kind]["summary"]
        cells = [kind, s["repeats"], "{} / {}".format(*s["detection_s"]), "{} / {}".format(*s["failover_s"])]
        cells += [s[k] for k in ("sent", "completed", "failed", "lost")]
        cells += [f"{s['survivor_failed']} / {s['survivor_retried']}", s["victim_retried"], s["rerouted"]]
        cells += [s[k] for k in ("tok_s_before", "tok_s_during", "tok_s_after")]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if args.result_json:
        Path(args.result_json).write_text(json.dumps({"command": command, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
