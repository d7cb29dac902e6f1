import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """The demo checkpoint builder's 'tiny' preset: a real HF directory with a sentencepiece tokenizer."""
    from engine.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny")
