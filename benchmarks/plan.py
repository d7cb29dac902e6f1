"""Plan all-reduce and tensor-parallel overhead for clusters no test machine has: 8 to 1024 GPUs.

The alpha-beta model of comm/cost.py with two levels of links: NVLink inside a node of 8 GPUs,
InfiniBand between nodes. For each size it prints every topology's predicted all-reduce time at
the message sizes a tensor-parallel decode step sends, and the per-token overhead of tp for a
Llama-70B-shaped model (80 layers, hidden 8192, bf16, 2 all-reduces per layer). The link figures
default to the H100 entry of topologies/gpus.py. For whole deployments (layouts, memory, decode
and TTFT, throughput) run the planner: ``python -m engine.planner`` (``./launch.sh plan``).

    python benchmarks/plan.py
    python benchmarks/plan.py --nvlink-gbs 450 --ib-gbs 50 --batch 1,64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from comm.cost import Link, predict_two_level  # noqa: E402
from topologies.gpus import GPUS  # noqa: E402
from topologies.schedule import TOPOLOGIES, chunks_for  # noqa: E402

H100 = GPUS["H100"]

SOURCES = """link figures (per GPU, one direction) and where they come from:
  NVLink: {nv:.0f} GB/s, alpha {nva:.1f} us. NVIDIA's H100 SXM datasheet gives 900 GB/s of NVLink
          bandwidth per GPU, counted both ways (450 GB/s each way). The latency is an assumption
          of the order nccl-tests report for small intra-node all-reduces (a few microseconds).
  IB:     {ib:.0f} GB/s, alpha {iba:.1f} us. One 400 Gb/s NDR InfiniBand port per GPU (NVIDIA
          ConnectX-7 datasheet: 400 Gb/s = 50 GB/s), as in DGX H100 nodes with eight of them. The
          latency is an assumption: about a microsecond of switch and wire plus software overhead.
Override them with --nvlink-gbs/--nvlink-us/--ib-gbs/--ib-us."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nvlink-gbs", type=float, default=H100.nvlink / 1e9)
    parser.add_argument("--nvlink-us", type=float, default=H100.nvlink_alpha * 1e6)
    parser.add_argument("--ib-gbs", type=float, default=H100.network / 1e9)
    parser.add_argument("--ib-us", type=float, default=H100.network_alpha * 1e6)
    parser.add_argument("--per-node", type=int, default=H100.per_node)
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--batch", default="1,64")
    args = parser.parse_args()
    intra = Link(args.nvlink_us * 1e-6, 1 / (args.nvlink_gbs * 1e9))
    inter = Link(args.ib_us * 1e-6, 1 / (args.ib_gbs * 1e9))
    print(SOURCES.format(nv=args.nvlink_gbs, nva=args.nvlink_us, ib=args.ib_gbs, iba=args.ib_us))
    batches = [int(b) for b in args.batch.split(",")]
    print(
        f"\nmodel: {args.layers} layers x 2 all-reduces of batch x {args.hidden} bf16 values per token; "
        f"{args.per_node} GPUs per node\n"
    )
    head = (
        f"{'ranks':>6} {'bytes':>9} "
        + " ".join(f"{t:>13}" for t in TOPOLOGIES)
        + "   best   tp overhead/token"
    )
    print(head + "\n" + "-" * len(head))
    n = 8
    while n <= 1024:
        for batch in batches:
            nbytes = batch * args.hidden * 2
            times = {}
            for t in TOPOLOGIES:
                chunks = chunks_for(t, nbytes, n)
                times[t] = predict_two_level(t, n, args.per_node, nbytes, intra, inter, chunks)
            best = min(times, key=times.get)
            overhead = 2 * args.layers * times[best]
            cells = " ".join(f"{times[t] * 1e6:10.1f} us" for t in TOPOLOGIES)
            print(f"{n:>6} {nbytes:>9} {cells}   {best:<12} {overhead * 1e3:8.3f} ms")
        n *= 2


if __name__ == "__main__":
    main()
