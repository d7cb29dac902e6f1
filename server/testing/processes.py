"""``./launch.sh`` in a subprocess on a free loopback port, and the ports such servers take."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: launch.sh is there
# ports that the README's examples use (HTTP, gRPC, the witness, torchrun's rendezvous): a user may
# be running one of them on this machine, and a test must not take it
EXAMPLE_PORTS = frozenset({8000, 8100, 50051, *range(29400, 29600)})


def free_port() -> int:
    """A free port below the kernel's ephemeral range, so that no connection the servers' ranks
    open among themselves meanwhile can take it before the server binds it, and none of the
    README's example ports."""
    low = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except OSError:
        pass
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        if port in EXAMPLE_PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


class LaunchedServer:
    """Starts ``./launch.sh serve ARGS`` on a free port (or, with ``plain``, ``./launch.sh`` with no
    arguments, the port given by RINGLEADER_PORT) and waits until ``/ready`` answers 200.
    ``stop()`` sends SIGTERM and returns (exit status, everything the server wrote to stderr)."""

    def __init__(
        self,
        *args: str,
        env: dict | None = None,
        ready_timeout: float = 120.0,
        plain: bool = False,
        port: int | None = None,
        ready_path: str = "/ready",
        command: str = "serve",
        defer: bool = False,
    ):
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "RINGLEADER_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
        if plain:
            full_env["RINGLEADER_PORT"] = str(self.port)
            cmd = [str(ROOT / "launch.sh")]
        else:
            cmd = [str(ROOT / "launch.sh"), command, *args, "--port", str(self.port)]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.terminated = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ready_path, self.ready_timeout = ready_path, ready_timeout
        if not defer:
            self.wait()

    def wait(self) -> None:
        """Until ``ready_path`` answers 200 (or the server exits: RuntimeError)."""
        ready_timeout, ready_path = self.ready_timeout, self.ready_path
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.stderr}")
            try:
                with urllib.request.urlopen(self.base + ready_path, timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server not ready after {ready_timeout} s:\n{self.stderr}")
            time.sleep(0.2)

    def answers_ready(self) -> bool:
        """Whether ``/ready`` answers 200 now (in a cluster: whether this member serves)."""
        try:
            with urllib.request.urlopen(self.base + "/ready", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def leads(self) -> bool:
        """Whether this member says it leads with a live lease (``GET /cluster``'s ``leading``)."""
        import json

        try:
            with urllib.request.urlopen(self.base + "/cluster", timeout=1) as r:
                return bool(json.loads(r.read()).get("leading"))
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def terminate(self) -> None:
        """SIGTERM, once: a second one while the server shuts down would cut that short."""
        if not self.terminated and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self, timeout: float = 60.0) -> tuple[int, str]:
        self.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(timeout=10)
        return self.proc.returncode, self.stderr

    def kill(self) -> None:
        """SIGKILL the server and every process under it (torchrun's workers have sessions of
        their own, so the process group alone would miss them)."""
        import psutil

        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
