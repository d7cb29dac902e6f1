"""What this host offers: CPU cores, memory, and the NVIDIA GPUs that NVML reports.

NVML (``pynvml``, from nvidia-ml-py) is optional at run time: on a machine without an NVIDIA driver
``nvmlInit`` raises, and ``describe`` reports no GPUs together with the reason instead of failing.
"""

from __future__ import annotations

import os
import platform

import psutil


def gpus() -> tuple[list[dict], str | None]:
    """(one dict per GPU, None) from NVML, or ([], why NVML is unavailable)."""
    try:
        import pynvml
    except ImportError as e:
        return [], f"pynvml not importable ({e})"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return [], f"NVML unavailable ({e})"
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            try:
                utilization = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except pynvml.NVMLError:
                utilization = None
            out.append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "memory_total_bytes": int(mem.total),
                    "memory_used_bytes": int(mem.used),
                    "utilization_percent": utilization,
                }
            )
        return out, None
    except pynvml.NVMLError as e:
        return [], f"NVML query failed ({e})"
    finally:
        pynvml.nvmlShutdown()


def describe() -> dict:
    import torch

    devices, nvml_error = gpus()
    vm = psutil.virtual_memory()
    return {
        "host": platform.node(),
        "cpu_cores": os.cpu_count(),
        "memory_total_bytes": int(vm.total),
        "memory_available_bytes": int(vm.available),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpus": devices,
        "nvml_error": nvml_error,
    }
