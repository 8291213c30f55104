"""
Plot a training run: python plot.py out/cpu_moe  ->  out/cpu_moe/metrics.png

Panels: train and validation loss against tokens seen, the learning rate, and for MoE models the
MaxVio of each MoE layer over training and the last logged expert load of each layer as a heatmap
(tokens routed to each expert over the last log interval, divided by the mean: 1 is a perfect balance).
"""

import json
import os
import sys

from atomic import atomic_write
from configurator import UserError, run_main


def read_metrics(path):
    """The records of a metrics.jsonl file written by train.py (a line cut short by a kill is skipped)."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: give the out_dir of a train.py run")
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                pass  # a line cut short by a kill: the rest of the log still plots
    if not any("loss" in r for r in records):
        raise UserError(f"{path} has no training steps logged yet: train longer than log_interval steps")
    return records


def plot(records, title):
    """A matplotlib figure of the run (Agg backend: no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    moe = [r for r in train if "max_vio_layers" in r]
    fig, axes = plt.subplots(2 if moe else 1, 2, figsize=(12, 8 if moe else 4), squeeze=False)
    fig.suptitle(title)

    ax = axes[0, 0]
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train")
    ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    ax.set(xlabel="tokens seen", ylabel="loss", title="loss")
    ax.legend()

    ax = axes[0, 1]
    ax.plot([r["tokens"] for r in train], [r["lr"] for r in train])
    ax.set(xlabel="tokens seen", ylabel="learning rate", title="learning rate")

    if moe:
        ax = axes[1, 0]
        layers = list(zip(*[r["max_vio_layers"] for r in moe]))
        for i, vio in enumerate(layers):  # MoE layers in order; the dense first layers are not counted
            ax.plot([r["tokens"] for r in moe], vio, label=f"MoE layer {i}")
        ax.set(xlabel="tokens seen", ylabel="MaxVio", title="MaxVio per step batch (0 = balanced)")
        ax.legend(fontsize="small")

        ax = axes[1, 1]
        counts = moe[-1]["expert_counts"]
        load = [[c / max(sum(row) / len(row), 1e-9) for c in row] for row in counts]
        im = ax.imshow(load, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(load)))
        ax.set(xlabel="expert", ylabel="MoE layer", title=f"expert load / mean, last interval (iter {moe[-1]['iter']})")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):  # its one setting is the run's directory
        print(__doc__.strip())
        raise SystemExit(0)
    if len(argv) != 1:
        raise UserError("usage: python plot.py OUT_DIR (the out_dir of a train.py run)")
    out_dir = argv[0]
    records = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    fig = plot(records, title=out_dir)
    path = os.path.join(out_dir, "metrics.png")
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or type(e).__name__})")
    print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
