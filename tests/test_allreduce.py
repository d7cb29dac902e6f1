"""Hand-written all-reduces in real processes on gloo, against the backend's own."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.parametrize("n", [2, 3, 4])
def test_every_topology_matches_native_bitwise_identical_across_ranks(n, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
    cmd += [str(ROOT / "tests" / "allreduce_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    problems = [p for r in range(n) for p in json.loads((tmp_path / f"rank{r}.json").read_text())]
    assert problems == []
