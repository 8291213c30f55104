"""
Where the work runs and in what precision, shared by train.py, sample.py and bench.py: the device ("auto" is
cuda, then mps, then cpu), the autocast dtype ("auto" is bfloat16 on GPUs that have it, float16 with a
GradScaler on older ones, float32 elsewhere), and the peak FLOP/s that MFU is measured against.
"""

import contextlib
import functools
import time

import torch

from configurator import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# dense bfloat16 tensor-core peaks from the datasheets (no sparsity), for MFU; checked in this order
GPU_PEAK_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
                  ("L40S", 362e12), ("L4", 121e12)]


def pick_device(name):
    """torch.device for a `device` setting: "auto" is cuda, then mps, then cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if (device.type == "cuda" and not torch.cuda.is_available()) or \
            (device.type == "mps" and not torch.backends.mps.is_available()):
        raise UserError(f"device={name} is not available here: use --device=cpu")
    return device


def pick_dtype(name, device):
    """The precision name for a `dtype` setting: "auto" is bfloat16 on GPUs that have it, float16 on older
    GPUs, float32 elsewhere (bfloat16 matmuls on CPUs without AMX are far slower than float32)."""
    if name == "auto":
        if device.type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if name not in DTYPES:
        raise UserError(f"dtype must be auto, {', '.join(DTYPES)}, not {name!r}")
    return name


def autocast(device, dtype):
    """The autocast context for a dtype name: none for float32, else torch.autocast on the device."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def peak_flops(device):
    """FLOP/s that MFU is measured against, and where the number comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS:
            if key in name:
                return flops, f"{name} datasheet bf16 dense peak {flops / 1e12:.0f} TFLOP/s"
        return None, f"{name}: peak unknown, no MFU"
    if device.type == "cpu":
        best = cpu_matmul_peak(torch.get_num_threads())
        return best, f"measured float32 matmul peak {best / 1e9:.1f} GFLOP/s"
    return None, "no MFU on this device"


@functools.cache  # once per process and thread count (the tests run many trainings in one process)
def cpu_matmul_peak(threads):
    """The best float32 matmul rate this CPU reaches, measured in ~0.3 s (no RNG used)."""
    a = torch.ones(1024, 1024)
    best = 0.0
    for _ in range(3):
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 0.1:
            a @ a
            n += 1
        best = max(best, 2 * 1024 ** 3 * n / (time.perf_counter() - t0))
    return best
