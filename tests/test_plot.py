"""plot.py: the panels of a dense and of an MoE run (train.py's own metrics.jsonl), the image it writes, and a
run without metrics."""

import os

import matplotlib.image
import pytest

import plot
from conftest import MOE, metrics, run_inprocess, run_script


def test_plot_dense_run(trained):
    fig = plot.plot(metrics(trained), "dense")
    loss_ax = fig.axes[0]
    train_line, val_line = loss_ax.get_lines()
    assert list(val_line.get_ydata()) == [r["val_loss"] for r in metrics(trained) if "val_loss" in r]
    assert len(fig.axes) == 2


def test_plot_moe_run(data, tmp_path):
    out = run_inprocess(data, tmp_path / "moe", *MOE, "--max_iters=4", "--eval_interval=2", "--sample_tokens=0")
    fig = plot.plot(metrics(out), "moe")                      # MoE: loss, lr, MaxVio, expert load
    assert len([ax for ax in fig.axes if ax.get_title()]) == 4
    plot.main([out])
    assert matplotlib.image.imread(os.path.join(out, "metrics.png")).shape[:2] == (800, 1200)


def test_plot_without_metrics(tmp_path):
    r = run_script("plot.py", tmp_path)
    assert r.returncode != 0 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_help(capsys):
    for flag in ("-h", "--help"):
        with pytest.raises(SystemExit) as done:
            plot.main([flag])
        assert done.value.code == 0
        assert capsys.readouterr().out.startswith("Plot a training run: python plot.py out/cpu_moe")
