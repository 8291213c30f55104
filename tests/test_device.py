"""device.py: the precision dtype=auto picks on a CPU (from injected timings), and the peak MFU is measured against
for each precision, on a CPU and on a GPU."""

import pytest
import torch

import device
from device import BF16_GAIN, auto_cpu_dtype, peak_flops

FAST = {"float32": 100e9, "bfloat16": 400e9}  # matmul peaks of a CPU with native bfloat16
SMALL = 1e9                                    # FLOPs of a step that is quick to time


def timings(seconds):
    """time_step for auto_cpu_dtype: returns the next of seconds[dtype] at each call, and records the calls."""
    calls = []

    def time_step(dtype):
        calls.append(dtype)
        return seconds[dtype][sum(c == dtype for c in calls) - 1]
    return time_step, calls


def test_no_native_bfloat16_means_float32_without_timing():
    time_step, calls = timings({})
    dtype, why = auto_cpu_dtype(time_step, {"float32": 100e9, "bfloat16": 0.7e9}, SMALL)
    assert dtype == "float32" and calls == [] and "0.7 GFLOP/s" in why


def test_bfloat16_when_this_model_s_step_is_faster_in_it_the_first_step_of_each_not_counted():
    # the first bfloat16 step prepares its kernels (slow); then it is 1.5x as fast
    time_step, calls = timings({"float32": [3.0, 3.0, 3.1], "bfloat16": [50.0, 2.0, 2.1]})
    dtype, why = auto_cpu_dtype(time_step, FAST, SMALL)
    assert dtype == "bfloat16" and "1.50x" in why
    assert calls == ["float32", "bfloat16"] * 3  # interleaved, so that the machine's drift favours neither


@pytest.mark.parametrize("ratio, expected", [(BF16_GAIN - 0.02, "float32"), (BF16_GAIN + 0.02, "bfloat16"),
                                             (0.7, "float32")])  # the demo's case: casts cost more than they gain
def test_float32_unless_bfloat16_gains_enough(ratio, expected):
    time_step, _ = timings({"float32": [1.0, 1.0, 1.0], "bfloat16": [1.0, 1 / ratio, 1 / ratio]})
    assert auto_cpu_dtype(time_step, FAST, SMALL)[0] == expected


def test_a_step_too_long_to_time_is_decided_by_the_matmul_peaks():
    time_step, calls = timings({})
    flops = 61 * 0.5 * FAST["float32"]  # over a minute at half the float32 peak
    assert auto_cpu_dtype(time_step, FAST, flops)[0] == "bfloat16" and calls == []


def test_cpu_peak_is_the_peak_of_the_precision_in_use():
    threads = torch.get_num_threads()
    for dtype in ("float32", "bfloat16"):
        flops, note = peak_flops(torch.device("cpu"), dtype)
        assert flops == device.cpu_matmul_peak(threads, dtype) > 0 and f"measured {dtype} matmul peak" in note


@pytest.mark.parametrize("dtype, expected", [("bfloat16", 989e12), ("float16", 989e12), ("float32", 989e12 / 2)])
def test_gpu_peak_is_the_datasheet_s_for_the_precision(monkeypatch, dtype, expected):
    """An H100's dense peaks: 989 TFLOP/s in bfloat16 or float16, 494.5 in TF32 (float32 matmuls)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda"), dtype)[0] == expected
