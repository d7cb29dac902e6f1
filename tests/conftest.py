import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _state_home(tmp_path_factory):
    """Cluster members started by the tests keep their terms and votes under the session's
    temporary folder (their default state directory is under $XDG_STATE_HOME), not in $HOME."""
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """The demo checkpoint builder's 'tiny' preset: a real HF directory with a sentencepiece tokenizer."""
    from engine.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny")
