"""Accelerators the deployment planner knows, each figure with where it comes from.

Pure data: one ``GPU`` per kind, SXM parts in 8-GPU HGX/DGX nodes. Bandwidths are bytes per second
in one direction; NVIDIA quotes NVLink bandwidth counting both directions, so the table halves it.
Memory is the datasheet's "GB" read as 10^9 bytes, which is less than the devices report (an
H100 80GB shows 81559 MiB = 85.5e9 bytes in nvidia-smi): the memory plan errs on the safe side.
Flops are dense bf16 tensor-core figures (the datasheets' headline numbers assume 2:4 sparsity and
are twice these). Latencies are not on any datasheet: they are stated assumptions.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
TB = 1e12

NVLINK_ALPHA = 3e-6  # seconds per message inside a node
NETWORK_ALPHA = 6e-6  # seconds per message between nodes
LATENCY_SOURCE = (
    "assumption: latency of the order nccl-tests report for small all-reduces, a few microseconds "
    "inside a node over NVLink and about twice that between nodes over InfiniBand"
)


@dataclass(frozen=True)
class GPU:
    name: str
    memory: float  # HBM bytes
    bandwidth: float  # HBM bytes/s
    flops: float  # dense bf16 flop/s
    nvlink: float  # bytes/s per GPU, one direction
    network: float  # bytes/s per GPU between nodes, one direction
    per_node: int
    sources: dict[str, str]
    nvlink_alpha: float = NVLINK_ALPHA
    network_alpha: float = NETWORK_ALPHA


H100_SHEET = "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column"
H200_SHEET = "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column"
A100_SHEET = "NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM column"
B200_SHEET = "NVIDIA DGX B200 datasheet (per GPU: the system's figure over its 8 GPUs)"
CX7 = "one 400 Gb/s ConnectX-7 port (NDR InfiniBand) per GPU, as DGX {0} nodes have (DGX {0} datasheet)"

GPUS: dict[str, GPU] = {
    "H100": GPU(
        "H100",
        memory=80 * GB,
        bandwidth=3.35 * TB,
        flops=989e12,
        nvlink=450 * GB,
        network=50 * GB,
        per_node=8,
        sources={
            "memory": f"{H100_SHEET}: 80GB HBM3",
            "bandwidth": f"{H100_SHEET}: GPU memory bandwidth 3.35 TB/s",
            "flops": f"{H100_SHEET}: BF16 Tensor Core 1,979 TFLOPS with sparsity, 989 dense",
            "nvlink": f"{H100_SHEET}: NVLink 900 GB/s (both directions)",
            "network": CX7.format("H100"),
        },
    ),
    "H200": GPU(
        "H200",
        memory=141 * GB,
        bandwidth=4.8 * TB,
        flops=989e12,
        nvlink=450 * GB,
        network=50 * GB,
        per_node=8,
        sources={
            "memory": f"{H200_SHEET}: 141GB HBM3e",
            "bandwidth": f"{H200_SHEET}: GPU memory bandwidth 4.8 TB/s",
            "flops": f"{H200_SHEET}: BF16 Tensor Core 1,979 TFLOPS with sparsity, 989 dense",
            "nvlink": f"{H200_SHEET}: NVLink 900 GB/s (both directions)",
            "network": CX7.format("H200"),
        },
    ),
    "A100": GPU(
        "A100",
        memory=80 * GB,
        bandwidth=2.039 * TB,
        flops=312e12,
        nvlink=300 * GB,
        network=25 * GB,
        per_node=8,
        sources={
            "memory": f"{A100_SHEET}: 80GB HBM2e",
            "bandwidth": f"{A100_SHEET}: GPU memory bandwidth 2,039 GB/s",
            "flops": f"{A100_SHEET}: BF16 Tensor Core 312 TFLOPS (624 with sparsity)",
            "nvlink": f"{A100_SHEET}: NVLink 600 GB/s (both directions)",
            "network": "one 200 Gb/s ConnectX-6 port (HDR InfiniBand) per GPU, as DGX A100 nodes have "
            "(DGX A100 datasheet)",
        },
    ),
    "B200": GPU(
        "B200",
        memory=180 * GB,
        bandwidth=8 * TB,
        flops=2.25e15,
        nvlink=900 * GB,
        network=50 * GB,
        per_node=8,
        sources={
            "memory": f"{B200_SHEET}: 1,440GB total GPU memory",
            "bandwidth": f"{B200_SHEET}: 64 TB/s HBM3e bandwidth",
            "flops": "NVIDIA HGX B200 datasheet: FP16/BF16 Tensor Core 4.5 PFLOPS per GPU with sparsity, "
            "2.25 dense",
            "nvlink": f"{B200_SHEET}: 14.4 TB/s aggregate NVLink bandwidth (1.8 TB/s per GPU, both "
            "directions)",
            "network": CX7.format("B200"),
        },
    ),
}


def gpu(name: str) -> GPU:
    """The table's entry for ``name`` (case-insensitive); a clear error for any other."""
    found = GPUS.get(name.upper())
    if found is None:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return found
