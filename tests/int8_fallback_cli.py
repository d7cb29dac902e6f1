"""``python -m engine.cli`` with the packed int8 kernel refused, so that every Int8Linear runs the
float32 fallback product; started by torchrun from test_oracle_int8.py for a tp = 2 run."""

import sys

import engine.quant

engine.quant._has_packed_mm = lambda device, dtype: False

from engine.cli import main  # noqa: E402

sys.exit(main())
