"""memory.py: the bytes per parameter it measures are what float32 training holds (the parameter, its gradient and
AdamW's two moments, or Muon's one momentum), and its tables follow from them and the presets' own sizes."""

import re

import pytest

import memory


def test_measured_bytes_are_a_parameter_its_gradient_and_the_optimizer_s_state():
    float32 = 4  # (AdamW's step counts add 4 bytes per tensor: the 0.1%)
    measured = memory.measured_bytes()
    assert measured["muon"] == pytest.approx(((1 + 1 + 2) * float32, (1 + 1 + 1) * float32), rel=1e-3)
    assert measured["adamw"] == pytest.approx(((1 + 1 + 2) * float32, (1 + 1 + 2) * float32), rel=1e-3)


def test_the_tables_follow_from_the_measured_bytes_and_the_presets(capsys):
    memory.main(["--configs=config/customllm_1b.py"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| customllm_1b |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "1,061M"  # the config file's own count: 1,061,131,264 parameters
    ddp, *fsdp, adamw = [float(c.split()[0]) for c in cells[3:]]
    assert fsdp == pytest.approx([ddp / n for n in (2, 4, 8)], abs=0.006)  # FSDP: 1/N of it on each rank
    assert abs(adamw - 1_061_131_264 * 16 / 2**30) < 0.01  # AdamW: 16 bytes for every parameter
    assert 12 * 1_061_131_264 / 2**30 < ddp < adamw         # Muon: 12 for its matrices, 16 for the rest
    # 24 GiB on 8 GPUs under FSDP holds 8 x the model that one holds
    one, eight = (float(re.search(rf"\| 24 GiB \| {n} \| .*\| customllm_1b \(([\d.]+)B", out).group(1)) for n in (1, 8))
    assert abs(eight / one - 8) < 0.1
