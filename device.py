"""
Where the work runs and in what precision, shared by train.py, sample.py and bench.py: the device ("auto" is
cuda, then mps, then cpu), the autocast dtype ("auto" is bfloat16 on GPUs that have it, float16 with a
GradScaler on older ones, float32 elsewhere; train.py's auto on a CPU with fast bfloat16 matmuls times this
model's step both ways, `auto_cpu_dtype`), and the peak FLOP/s of that precision that MFU is measured against.
"""

import contextlib
import functools
import time
from dataclasses import dataclass

import torch

from configurator import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# dense bfloat16 (= float16) tensor-core peaks from the datasheets (no sparsity), for MFU; checked in this order.
# float32 matmuls run as TF32 (train.py allows it), whose dense peak is half of these on each of these GPUs.
GPU_PEAK_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
                  ("L40S", 362e12), ("L4", 121e12)]

# dtype=auto on a CPU takes bfloat16 autocast only where it makes this model's step at least this much faster
BF16_GAIN = 1.1


@dataclass
class Job:
    """Where this process works and how: its device, precision (a DTYPES name), whether it compiles the model, and
    its place among the ranks (DDP or FSDP) with its share of a step's batch_size x gradient_accumulation_steps
    sequences."""
    device: torch.device
    dtype: str
    compile: bool = False
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    micro_steps: int = 1                # micro-batches this rank runs per optimizer step
    micro_batch: int = 1                # sequences per micro-batch on this rank
    fsdp: bool = False                  # the model, its gradients and optimizer state sharded across the ranks

    @property
    def distributed(self):
        """More than one rank: DDP, or FSDP."""
        return self.world > 1

    @property
    def master(self):
        return self.rank == 0


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
    GPUs, float32 elsewhere (train.py then lets auto_cpu_dtype choose for its model on a CPU)."""
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


def peak_flops(device, dtype):
    """FLOP/s of the precision `dtype` (a name) that MFU is measured against, and where the number comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS:
            if key in name:
                kind = "tf32" if dtype == "float32" else "bf16/fp16"
                flops = flops / 2 if dtype == "float32" else flops
                return flops, f"{name} datasheet {kind} dense peak {flops / 1e12:.0f} TFLOP/s"
        return None, f"{name}: peak unknown, no MFU"
    if device.type == "cpu":
        best = cpu_matmul_peak(torch.get_num_threads(), dtype)
        return best, f"measured {dtype} matmul peak {best / 1e9:.1f} GFLOP/s"
    return None, "no MFU on this device"


@functools.cache  # once per process, thread count and precision (the tests run many trainings in one process)
def cpu_matmul_peak(threads, dtype="float32"):
    """The best square matmul rate this CPU reaches in a precision, measured in about 0.3 s (no RNG used): of
    1024 x 1024 matrices, or smaller ones where a product takes long (a precision the CPU only emulates)."""
    for n in (256, 512, 1024):
        a = torch.ones(n, n, dtype=DTYPES[dtype])
        a @ a  # the first product of a size prepares its kernel
        t0 = time.perf_counter()
        a @ a
        if time.perf_counter() - t0 > 0.01:
            break
    best = 0.0
    for _ in range(3):
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < 0.1:
            a @ a
            k += 1
        best = max(best, 2 * n ** 3 * k / (time.perf_counter() - t0))
    return best


def auto_cpu_dtype(time_step, peaks, flops_per_step):
    """(dtype name, why) for dtype=auto on a CPU: bfloat16 autocast where a training step of this model runs at
    least BF16_GAIN times as fast as in float32, else float32 (the more accurate; a tie is noise).

    time_step(dtype) -> seconds of one step; peaks: {dtype: matmul FLOP/s}. Where bfloat16 matmuls are no faster
    than float32 ones (no native bfloat16) nothing is timed. Where a float32 step would take over a minute at
    half the peak, the matmul peaks decide instead of two minutes of timing. The first step of each precision
    prepares its kernels; the next two alternate, and the faster of each counts."""
    f32, bf16 = peaks["float32"], peaks["bfloat16"]
    if bf16 < BF16_GAIN * f32:
        return "float32", f"bfloat16 matmuls run at {bf16 / 1e9:.1f} GFLOP/s here, float32 at {f32 / 1e9:.1f}"
    if flops_per_step / (0.5 * f32) > 60:
        return "bfloat16", f"bfloat16 matmuls run {bf16 / f32:.2f}x as fast as float32 here (too large a step to time)"
    seconds = {"float32": [], "bfloat16": []}
    for dtype in ("float32", "bfloat16", "float32", "bfloat16", "float32", "bfloat16"):
        seconds[dtype].append(time_step(dtype))
    ratio = min(seconds["float32"][1:]) / min(seconds["bfloat16"][1:])
    return "bfloat16" if ratio >= BF16_GAIN else "float32", \
        f"a training step of this model runs {ratio:.2f}x as fast in bfloat16 as in float32 here"

