"""``python -m server.members`` (``./launch.sh members``): change a running cluster's membership.

    ./launch.sh members show   http://host1:8000
    ./launch.sh members leave  http://host2:8000          # drain host2's member, remove it, stop it
    ./launch.sh members remove http://host1:8000 n3       # remove the dead member n3 by name

A new member joins by itself: ``./launch.sh serve --model DIR --join http://host1:8000 --name n4``.
The requests are signed with the cluster secret (``--cluster-secret`` or RINGLEADER_CLUSTER_SECRET),
as the members' own control messages are; any member's URL will do, a member that does not lead
names the leader and the request goes there. A change the leader refuses (another change is not
committed yet, it would leave no live majority, no such member) is printed with the leader's reason
and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

from server.cluster import Signer


def _post(url: str, signer: Signer, message: dict, timeout: float = 30.0) -> tuple[int | None, dict]:
    body, headers = signer.sign({**message, "from": "operator", "term": 0})
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {}
    except (OSError, ValueError) as e:
        return None, {"error": f"{url}: {e}"}


def _state(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/cluster", timeout=5) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def show(url: str) -> int:
    state = _state(url)
    if state is None:
        print(f"ringleader members: error: {url} does not answer /cluster", file=sys.stderr)
        return 1
    config = state.get("config") or {}
    print(f"configuration {config.get('id')} (committed: {config.get('committed')}), "
          f"term {state.get('term')}, leader {state.get('leader')}")  # fmt: skip
    if state.get("change"):
        change = state["change"]
        print(f"change in progress: {', '.join(change['from'])} -> {', '.join(change['to'])}")
    for m in state.get("members") or []:
        kind = "witness" if m.get("witness") else "member"
        replica = (m.get("replica") or {}).get("state", "-")
        alive = {True: "alive", False: "dead", None: "?"}[m.get("alive")]
        role = m.get("role", "?")
        print(f"  {m['name']:<12} {m['url']:<32} {kind:<8} {role:<10} {alive:<6} replica {replica}")
    return 0


def remove(url: str, name: str, signer: Signer) -> int:
    target = url.rstrip("/")
    for _ in range(20):
        status, answer = _post(target + "/_control/remove", signer, {"member": name})
        if status == 200:
            print(f"removed {name}: configuration {answer.get('config')} is "
                  f"{', '.join(row[0] for row in answer.get('members') or [])}")  # fmt: skip
            return 0
        if not answer.get("retry") and status is not None:
            print(
                f"ringleader members: error: {answer.get('error') or f'answered {status}'}", file=sys.stderr
            )
            return 1
        target = (answer.get("leader") or target).rstrip("/")
        time.sleep(0.5)
    print(f"ringleader members: error: no leader removed {name} ({answer.get('error')})", file=sys.stderr)
    return 1


def leave(url: str, signer: Signer, timeout_s: float) -> int:
    status, answer = _post(url.rstrip("/") + "/_control/leave", signer, {})
    if status != 202:
        print(f"ringleader members: error: {answer.get('error') or f'answered {status}'}", file=sys.stderr)
        return 1
    print(f"{answer.get('leaving')} is draining and leaving the cluster", flush=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _state(url) is None:
            print(f"{answer.get('leaving')} has left and stopped")
            return 0
        time.sleep(0.5)
    print(f"ringleader members: error: {url} still answers after {timeout_s:g} s", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ringleader members", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster-secret", default=os.environ.get("RINGLEADER_CLUSTER_SECRET"))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("show", help="the configuration and every member").add_argument("url")
    leaving = sub.add_parser("leave", help="drain a member, remove it from the configuration, stop it")
    leaving.add_argument("url", help="the leaving member's URL")
    leaving.add_argument("--timeout", type=float, default=120.0, help="seconds to wait until it has stopped")
    removing = sub.add_parser("remove", help="remove a member (a dead one) by name")
    removing.add_argument("url", help="any member's URL")
    removing.add_argument("name")
    args = parser.parse_args(argv)
    if args.command == "show":
        return show(args.url)
    if not args.cluster_secret:
        parser.error("--cluster-secret or RINGLEADER_CLUSTER_SECRET is needed to sign the request")
    signer = Signer(args.cluster_secret)
    if args.command == "leave":
        return leave(args.url, signer, args.timeout)
    return remove(args.url, args.name, signer)


if __name__ == "__main__":
    sys.exit(main())
