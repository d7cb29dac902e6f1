"""The CPU products of a decode step, each way the engine can lay them out, side by side.

For the projection shapes of a model (a demo preset or a checkpoint) and a range of row counts,
times x [rows, in] @ W [in, out] as the BLAS does it (``plain``), as T blocks of output columns
multiplied as a batch (``columns``), as T slices of the input dimension whose partial products
are summed (``split-k``, ``engine.model.split_k_matmul``), T being the thread count, and, over the
same weights stored [out, in], as T blocks of output rows (``row blocks``: the eager product of a
``Linear`` turned by rows, as a compiled CPU decoder's prefill runs it); with
``--compiled`` the split-K also inside a compiled function, as the engine writes it (baddbmm,
which inductor leaves to the BLAS) and as a bmm (which inductor turns into its own loop), and the
product by rows of the [out, in] weight as a compiled CPU decode step writes it up to
``REDUCTION_MAX_ROWS`` rows (``engine.model.by_rows_matmul``: a multiply-and-sum per output). Every
weight is one of ``--copies`` copies cycled through, so that the weights stream from memory as a
model's do rather than sit in the cache; ``sum`` reads the same weights with ``torch.sum``, the
speed of reading them and nothing else. ``engine.model.Linear`` picks, per row count, the layout
these figures favour.

The output head ([vocab, hidden], nn.Linear's layout, as ``engine.model.Head`` keeps it) is timed
as F.linear against the split-K of that layout.

With ``--int8`` the table is that of the int8 projections (``engine.quant.Int8Linear``) instead:
the packed int8 kernel, the weights converted to float for the call and then F.linear, and the
float weights' F.linear, per row count.

    python benchmarks/matmul.py --preset demo-150m --rows 1,2,4,8,16
    python benchmarks/matmul.py --preset demo-150m --rows 1,16,32,64 --head-vocab 32000
    python benchmarks/matmul.py --preset demo --rows 1,16 --compiled
    python benchmarks/matmul.py --preset demo-150m --rows 16,32,64,128,256,512 --int8
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import ModelConfig  # noqa: E402
from engine.demo import PRESETS  # noqa: E402
from engine.model import by_rows_matmul, split_k_matmul  # noqa: E402
from engine.quant import Int8Linear, quantize_channels  # noqa: E402


def shapes(args) -> tuple[dict[str, tuple[int, int]], tuple[int, int]]:
    """The projections' [in, out] shapes, and the head's [vocab, hidden]."""
    if args.model:
        cfg = ModelConfig.from_hf(args.model)
        h, i, d, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.vocab_size
        heads, kv = cfg.num_heads, cfg.num_kv_heads
    else:
        p = PRESETS[args.preset]
        h, i, vocab = p["hidden_size"], p["intermediate_size"], p["vocab_size"]
        heads, kv = p["num_attention_heads"], p["num_key_value_heads"]
        d = p.get("head_dim", h // heads)
    projections = {
        "qkv": (h, (heads + 2 * kv) * d),
        "o": (heads * d, h),
        "gate_up": (h, 2 * i),
        "down": (i, h),
    }
    return projections, (args.head_vocab or vocab, h)


def columns(x: torch.Tensor, w: torch.Tensor, threads: int) -> torch.Tensor:
    n_in, n_out = w.shape
    blocks = w.view(n_in, threads, n_out // threads).transpose(0, 1)
    y = torch.bmm(x.expand(threads, -1, -1), blocks)
    return y.transpose(0, 1).reshape(x.shape[0], n_out)


def row_blocks(x: torch.Tensor, w: torch.Tensor, threads: int) -> torch.Tensor:
    """x @ w.T for w [out, in] as T contiguous blocks of output rows multiplied as a batch: the
    eager product of a ``Linear`` stored by rows."""
    n_out, n_in = w.shape
    blocks = w.view(threads, n_out // threads, n_in).transpose(1, 2)
    y = torch.bmm(x.expand(threads, -1, -1), blocks)
    return y.transpose(0, 1).reshape(x.shape[0], n_out)


def split_k_bmm(x: torch.Tensor, w: torch.Tensor, threads: int) -> torch.Tensor:
    n_in, n_out = w.shape
    xs = x.view(x.shape[0], threads, n_in // threads).transpose(0, 1)
    return torch.bmm(xs, w.view(threads, n_in // threads, n_out)).sum(0)


def best_us(fn, x, weights, repeats: int) -> float:
    fn(x, weights)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x, weights)
        best = min(best, time.perf_counter() - t)
    return best / len(weights) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the demo preset below)")
    parser.add_argument("--preset", default="demo-150m", choices=sorted(PRESETS))
    parser.add_argument("--rows", default="1,2,4,8,16,32")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--copies", type=int, default=0, help="weights cycled through (default: 256 MB of them, at most 64)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compiled", action="store_true", help="also time the split-K compiled")
    parser.add_argument("--head-vocab", type=int, default=0, help="the head's rows (default: the model's)")
    parser.add_argument("--int8", action="store_true", help="time the int8 projections' products instead")
    args = parser.parse_args()
    if args.int8:
        return int8_table(args)
    torch.set_num_threads(T := args.threads)

    layouts = {
        "plain": lambda x, ws: [x @ w for w in ws],
        "columns": lambda x, ws: [columns(x, w, T) for w in ws],
        "split-k": lambda x, ws: [split_k_matmul(x, w, T) for w in ws],
    }
    layouts["row blocks"] = lambda x, ws: [row_blocks(x, w, T) for w in ws]
    by_rows = {"row blocks"}  # the layouts given the weights as [out, in]
    if args.compiled:
        torch._dynamo.config.recompile_limit = 1024  # one graph per shape and row count
        layouts["split-k compiled"] = torch.compile(layouts["split-k"], dynamic=False)
        layouts["split-k as bmm, compiled"] = torch.compile(
            lambda x, ws: [split_k_bmm(x, w, T) for w in ws], dynamic=False
        )
        layouts["by rows, compiled"] = torch.compile(
            lambda x, ws: [by_rows_matmul(x, w, x.shape[0]) for w in ws], dynamic=False
        )
        by_rows.add("by rows, compiled")
    layouts["sum"] = lambda x, ws: [w.sum() for w in ws]
    print(f"torch {torch.__version__}, {T} threads; microseconds per product (GB/s of weight read)")
    head_layouts = {
        "F.linear": lambda x, ws: [torch.nn.functional.linear(x, w) for w in ws],
        "split-k": lambda x, ws: [split_k_matmul(x, w, T, transposed=True) for w in ws],
        "sum": layouts["sum"],
    }
    projections, head = shapes(args)
    with torch.inference_mode():
        for name, shape, timed in [(n, s, layouts) for n, s in projections.items()] + [
            ("head", head, head_layouts)
        ]:
            copies = args.copies or min(64, max(2, (256 << 20) // (shape[0] * shape[1] * 4)))
            weights = [torch.randn(*shape) for _ in range(copies)]
            turned = [w.t().contiguous() for w in weights] if timed is layouts else []
            for rows in [int(r) for r in args.rows.split(",")]:
                x = torch.randn(rows, shape[0] if timed is layouts else shape[1])
                cells = []
                for layout, fn in timed.items():
                    us = best_us(fn, x, turned if layout in by_rows else weights, args.repeats)
                    cells.append(f"{layout} {us:7.0f} ({shape[0] * shape[1] * 4 / us / 1e3:5.1f})")
                print(f"{name:>7} {shape[0]:>5}x{shape[1]:<5} rows {rows:>3}: " + "  ".join(cells))
    return 0


def dequantized(m: Int8Linear, dtype: torch.dtype) -> torch.Tensor:
    """``m``'s weights as q * scales [out, in] in ``dtype``, converted for one call."""
    return m.qweight.to(dtype).mul_(m.scales.to(dtype)[:, None])


def int8_table(args) -> int:
    """The int8 projections' products against the float one, per shape and row count."""
    torch.set_num_threads(args.threads)
    linear = torch.nn.functional.linear
    layouts = {  # each over (module, its float weights) pairs
        "int8 kernel": lambda x, pairs: [
            torch._weight_int8pack_mm(x.to(m.compute_dtype), m.qweight, m.scales).float() for m, _ in pairs
        ],
        "dequantized": lambda x, pairs: [linear(x, dequantized(m, x.dtype)) for m, _ in pairs],
        "float": lambda x, pairs: [linear(x, w) for _, w in pairs],
    }
    print(f"torch {torch.__version__}, {args.threads} threads; microseconds per product")
    projections, _ = shapes(args)
    with torch.inference_mode():
        for name, (n_in, n_out) in projections.items():
            copies = args.copies or min(64, max(2, (256 << 20) // (n_in * n_out * 4)))
            weights = [torch.randn(n_out, n_in) for _ in range(copies)]
            pairs = [(Int8Linear(*quantize_channels(w), None, torch.float32), w) for w in weights]
            if not pairs[0][0].packed_mm:
                print("this torch has no packed int8 kernel for the CPU")
                return 1
            for rows in [int(r) for r in args.rows.split(",")]:
                x = torch.randn(rows, n_in)
                cells = [
                    f"{layout} {best_us(fn, x, pairs, args.repeats):7.0f}" for layout, fn in layouts.items()
                ]
                print(f"{name:>7} {n_in:>5}x{n_out:<5} rows {rows:>3}: " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
