"""Process-group setup from the launcher's environment: torchrun's, or slurm's when started by srun.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. srun
without torchrun sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE (or
SLURM_TASKS_PER_NODE) and SLURM_JOB_NODELIST; the rendezvous host is then the first host of the
node list and the port comes from MASTER_PORT (default 29500). The backend is NCCL when every local
rank has its own GPU, gloo otherwise. Every group gets an explicit timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0


class LaunchError(RuntimeError):
    """The environment does not describe a usable distributed launch."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    @property
    def node_rank(self) -> int:
        return self.rank // self.local_world_size


def _int(env: dict, key: str) -> int:
    try:
        return int(env[key])
    except (KeyError, ValueError):
        raise LaunchError(f"environment variable {key}={env.get(key)!r} is not an integer") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """Hosts of a slurm node list such as ``gpu[01-03,07],login1`` (``scontrol show hostnames``)."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1))
    return hosts


def env_from(environ: dict | None = None) -> DistEnv:
    """Read the launch from torchrun's variables, else slurm's, else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        return DistEnv(
            rank=_int(env, "RANK"),
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            local_world_size=_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        # the step's own count first: an inherited SLURM_NTASKS_PER_NODE may describe the batch job
        per_node = (
            env.get("SLURM_STEP_TASKS_PER_NODE")
            or env.get("SLURM_TASKS_PER_NODE")
            or env.get("SLURM_NTASKS_PER_NODE", "1")
        )
        per_node = re.match(r"\d+", per_node)
        hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "127.0.0.1"))
        if not hosts:
            raise LaunchError(f"cannot read a host from SLURM_JOB_NODELIST={env.get('SLURM_JOB_NODELIST')!r}")
        return DistEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=_int(env, "SLURM_NTASKS"),
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            local_world_size=int(per_node.group()) if per_node else 1,
            master_addr=env.get("MASTER_ADDR", hosts[0]),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
        )
    return DistEnv(0, 1, 0, 1, "127.0.0.1", 29500)


def pick_device(env: DistEnv) -> torch.device:
    """One GPU per local rank when there are enough of them, else the CPU."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= env.local_world_size:
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def init(
    env: DistEnv | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, device: torch.device | None = None
) -> tuple[DistEnv, torch.device]:
    """Initialise the default process group (when world > 1) and return the launch and device
    (``device`` if given, else one GPU per local rank when there are enough, else the CPU)."""
    env = env or env_from()
    device = device or pick_device(env)
    if env.world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}"
            if "TORCHELASTIC_RUN_ID" not in os.environ
            else "env://",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return env, device


def new_group(ranks: list[int], timeout_s: float = DEFAULT_TIMEOUT_S):
    """A subgroup with an explicit timeout. Every rank must call this for every group, in order."""
    return dist.new_group(ranks=ranks, timeout=timedelta(seconds=timeout_s))


def exit_with_launcher(rank: int, interval_s: float = 1.0) -> None:
    """End this process when the launcher that started it (torchrun's agent) is gone.

    torchrun starts each worker in a session of its own; if the agent itself is killed (SIGKILL, a
    lost node), nothing stops the workers, and a rank whose peers are all alive would go on
    forever: serving ranks hear from their head every few seconds. A daemon thread notices the
    worker being re-parented and exits.
    """
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                print(
                    f"ringleader: error: rank {rank}: the launcher is gone; exiting",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def exit_lost_replica(rank: int, error: BaseException) -> None:
    """A torch.distributed error (a peer died, or hung past the timeout): say so in one line and
    exit at once, without any clean-up that could wait on the dead peer."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    print(f"ringleader: error: rank {rank}: lost the replica ({first}); exiting", file=sys.stderr, flush=True)
    os._exit(1)
