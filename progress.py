"""
What a training run reports as it goes, written by rank 0 only: the progress bar and the lines above it,
out_dir/metrics.jsonl (one record per log_interval steps with the interval's means, and one per evaluation),
out_dir/samples.jsonl, and Weights & Biases when asked. A resumed run keeps the records up to its checkpoint and
writes the steps after it again.
"""

import dataclasses
import json
import os
from dataclasses import dataclass

import torch
from tqdm import tqdm

from atomic import atomic_write
from configurator import UserError


@dataclass
class StepResult:
    """One optimizer step, as all ranks together saw it."""
    loss: float                         # the main head's cross-entropy, averaged over the step's micro-batches
    mtp: list                           # each MTP module's cross-entropy [mtp_depth]
    aux: float                          # the MoE sequence-wise auxiliary loss (0 without)
    grad_norm: float                    # before clipping
    stop: bool                          # some rank was signalled to stop
    vio: torch.Tensor                   # MaxVio of each MoE layer [layers] (empty for a dense model)
    counts: torch.Tensor                # tokens each expert received [layers, E]


@dataclass
class EvalResult:
    """One evaluation on the fixed validation batches."""
    loss: float                         # the main head's mean cross-entropy, as StepResult.loss
    bpb: float | None                   # bits per byte of the text targets (None without a tokenizer)
    mtp: list                           # each MTP module's mean cross-entropy
    samples: list                       # [(prompt, continuation)]


@dataclass
class Rate:
    """What turns a step's time into tokens/s and MFU."""
    tokens_per_step: int
    flops_per_token: float
    peak: float | None                  # FLOP/s of all ranks together in the run's precision (None: no MFU)
    measured: bool = False              # the peak was measured here (a CPU), so it is a lower bound of the true one

    def mfu(self, tokens_per_s):
        if not self.peak:
            return None
        flops = self.flops_per_token * tokens_per_s
        if self.measured and flops > self.peak:  # the measurement caught a slow moment: this step proves more
            self.peak = flops
        return flops / self.peak


class Progress:
    """The bar, and the metrics and samples logs of one run."""

    def __init__(self, cfg, state, master, rate):
        self.master, self.rate = master, rate
        self.interval, self.max_iters = cfg.log_interval, cfg.max_iters
        wandb = start_wandb(cfg, master)
        self.metrics = JsonLog(os.path.join(cfg.out_dir, "metrics.jsonl"), state.start_iter, master, wandb)
        self.samples = JsonLog(os.path.join(cfg.out_dir, "samples.jsonl"), state.start_iter, master)
        self.bar = tqdm(total=self.max_iters, initial=state.iter_num, disable=not master, dynamic_ncols=True,
                        desc="train")
        self.window = []                # (StepResult, seconds) of the steps since the last record

    def say(self, text):
        if self.master:
            tqdm.write(text)

    def step(self, state, result, lr, seconds):
        """A finished step: on the bar, and in the interval's means, logged at the interval's end."""
        self.window.append((result, seconds))
        tok_s = self.rate.tokens_per_step / seconds
        mfu = self.rate.mfu(tok_s)
        self.bar.update(1)
        self.bar.set_postfix_str(f"loss {result.loss:.4f}" + "".join(f" mtp{k} {m:.4f}" for k, m in enumerate(result.mtp, 1))
                                 + f" lr {lr:.2e} {tok_s:,.0f} tok/s" + (f" MFU {mfu:.1%}" if mfu else "")
                                 + (f" MaxVio {result.vio.mean().item():.2f}" if result.vio.numel() else ""))
        if state.iter_num % self.interval == 0 or state.iter_num == self.max_iters:
            self.metrics.write({"iter": state.iter_num, "tokens": state.tokens_seen, **interval_means(self.window, self.rate),
                                "lr": lr, "grad_norm": result.grad_norm})
            self.window = []

    def evaluation(self, state, result):
        """Print and log an evaluation's results."""
        self.say(f"iter {state.iter_num}: val loss {result.loss:.4f}"
                 + (f", {result.bpb:.3f} bits per byte" if result.bpb else "")
                 + (f"; MTP modules {', '.join(f'{m:.4f}' for m in result.mtp)}" if result.mtp else ""))
        record = {"iter": state.iter_num, "tokens": state.tokens_seen, "val_loss": result.loss, "val_bpb": result.bpb}
        self.metrics.write({**record, "val_mtp_losses": result.mtp} if result.mtp else record)
        for prompt, text in result.samples:
            self.say("  > " + " ".join((prompt + text).split()))  # one line each on the terminal; the file keeps the text
            self.samples.write({"iter": state.iter_num, "prompt": prompt, "text": text})

    def close(self):
        self.bar.close()
        if self.metrics.wandb is not None:
            self.metrics.wandb.finish()
            self.metrics.wandb = None


def interval_means(window, rate):
    """A log record's means over the steps of an interval: the losses, the speed, and for an MoE the MaxVio of
    each layer (each step's batch's, averaged; max_vio is the mean of the layers) and the experts' token counts."""
    n, seconds = len(window), sum(s for _, s in window)
    steps = [r for r, _ in window]
    tok_s = n * rate.tokens_per_step / seconds
    record = {"loss": sum(r.loss for r in steps) / n, "tokens_per_sec": tok_s, "mfu": rate.mfu(tok_s)}
    if steps[0].mtp:  # each MTP module's cross-entropy; the loss above is the main head's
        record["mtp_losses"] = [sum(r.mtp[k] for r in steps) / n for k in range(len(steps[0].mtp))]
    if any(r.aux for r in steps):
        record["aux_loss"] = sum(r.aux for r in steps) / n
    if steps[0].vio.numel():
        per_layer = sum(r.vio for r in steps) / n
        record.update(max_vio=per_layer.mean().item(), max_vio_layers=per_layer.tolist(),
                      expert_counts=sum(r.counts for r in steps).tolist())
    return record


class JsonLog:
    """A JSON-lines file in out_dir, written by rank 0. A fresh run starts it anew at its first record (a run
    stopped before that leaves no empty file); a resumed one keeps the lines up to its checkpoint, since it redoes
    the steps after it."""

    def __init__(self, path, start_iter, master, wandb=None):
        self.path, self.master, self.wandb = path, master, wandb
        self.mode = "a" if start_iter else "w"
        if master and start_iter:
            keep_records_until(path, start_iter)

    def write(self, record):
        if self.master:
            with open(self.path, self.mode) as f:
                self.mode = "a"
                f.write(json.dumps(record) + "\n")
            if self.wandb is not None:
                self.wandb.log({k: v for k, v in record.items() if k != "expert_counts"}, step=record["iter"])


def keep_records_until(path, iter_num):
    """Drop a log's lines after iter_num: a resumed run redoes those steps and logs them again."""
    if not os.path.isfile(path):
        return
    lines = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["iter"] <= iter_num:
                    lines.append(line)
            except (ValueError, KeyError, TypeError):
                pass  # e.g. a line cut short by a kill: dropped
    with atomic_write(path) as f:
        f.writelines(lines)


def start_wandb(cfg, master):
    """The wandb module, its run started, when wandb_log asks for it (rank 0 only); else None."""
    if not (cfg.wandb_log and master):
        return None
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_log=True needs the wandb package: pip install wandb")
    wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=dataclasses.asdict(cfg))
    return wandb
