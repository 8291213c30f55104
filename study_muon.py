"""
Time to loss, AdamW against Muon (optim.py), on a dense GQA model and an MLA + MoE model at CPU size.

    python prepare.py --name=muon_bpe4096 --tokenizer=bpe:4096    # the offline corpus, a 4096-token BPE
    python study_muon.py                                          # about 30 minutes on 2 CPU cores
    python study_muon.py --steps=40 --seeds=1 --families=dense    # a quick look

A 4096-token vocabulary and a width of 192 put most of the FLOPs in the hidden matrices (at the demo's 49152-wide
head the head takes ~90%, and Muon does not train the head). For each family, train.py runs as a subprocess:
1. the learning-rate sweep on seed 0: AdamW's learning_rate over `adamw_lrs`, then Muon's muon_lr_ratio over
   `muon_ratios` with the AdamW groups at AdamW's best learning_rate; the best runs are seed 0 of step 2;
2. both optimizers at their best on seeds 1.., AdamW and Muon of a seed running side by side (one thread each), so
   that the machine's drift, and the other work on it, fall on both alike; step times come from these runs;
3. (dense only, `variants`) Muon at its best with the fused matrices orthogonalized whole (muon_split_fused=False).
Reported: val loss at equal steps (mean and spread over the seeds), the steps and seconds Muon needs to reach the
same seed's AdamW final val loss (linear between evaluations), and one Muon step's time over one AdamW step's (the
median of the logged step times). Writes a markdown table (out/muon_study/study.md) and a plot of both curves
(docs/muon_study.png); the runs' out_dirs stay under out/muon_study/, and a study run again reuses the runs that
finished (delete the directory to start over).
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from atomic import atomic_write
from configurator import UserError, configure, run_main

DEFAULTS = dict(
    dataset="muon_bpe4096",             # prepare.py --name=muon_bpe4096 --tokenizer=bpe:4096
    families="dense,mla_moe",           # which of FAMILIES to study
    steps=200,                          # optimizer steps per run (the LR schedule's length too)
    seeds=3,                            # seeds 0.. of the final comparison
    adamw_lrs="1e-3,3e-3,1e-2",         # AdamW's learning_rate sweep
    muon_ratios="1,3,9",                # Muon's muon_lr_ratio sweep (match_rms_adamw scale)
    variants=True,                      # the fused-matrix and scale-rule comparisons (dense)
    jobs=2,                             # runs side by side, one thread each (an even number: pairs run together)
    out="out/muon_study",               # the runs' out_dirs and study.md
    plot="docs/muon_study.png",         # the curves
)

# every run: float32 on one CPU thread, 8 x 64 tokens a step, warmup then cosine to lr / 10, 16 fixed val batches
COMMON = ["--device=cpu", "--dtype=float32", "--compile=False", "--vocab_size=4096", "--block_size=64",
          "--batch_size=8", "--warmup_iters=20", "--eval_iters=16", "--log_interval=1", "--sample_tokens=0",
          "--n_layer=4", "--n_embd=192", "--n_head=6", "--intermediate_size=512"]
FAMILIES = {
    "dense": ["--attention=gqa", "--n_kv_head=2"],
    "mla_moe": ["--attention=mla", "--q_lora_rank=0", "--kv_lora_rank=64", "--qk_nope_head_dim=32",
                "--qk_rope_head_dim=16", "--v_head_dim=32", "--n_routed_experts=8", "--n_activated_experts=2",
                "--n_shared_experts=1", "--moe_intermediate_size=128", "--first_k_dense=1",
                "--bias_update_rate=1e-2", "--aux_loss_alpha=1e-4"],
}


def main(argv=None):
    settings = configure(dict(DEFAULTS), argv)
    families = settings["families"].split(",")
    if not os.path.isfile(os.path.join("data", settings["dataset"], "meta.json")):
        raise UserError(f"no data/{settings['dataset']}: run python prepare.py --name={settings['dataset']} "
                        "--tokenizer=bpe:4096 first")
    if unknown := set(families) - set(FAMILIES):
        raise UserError(f"unknown families {sorted(unknown)}: pick from {sorted(FAMILIES)}")
    results = {family: study(family, settings) for family in families}
    table = report(results, settings)
    path = os.path.join(settings["out"], "study.md")
    with atomic_write(path, "w") as f:
        f.write(table)
    plot(results, settings["plot"])
    print(table + f"\nwrote {path} and {settings['plot']}")


def study(family, settings):
    """The sweep, the seeds and (dense) the variants of one family: {"best": {...}, "runs": {name: [records]}}."""
    lrs = [float(x) for x in settings["adamw_lrs"].split(",")]
    ratios = [float(x) for x in settings["muon_ratios"].split(",")]
    adamw = runs(settings, [(family, "adamw", f"lr{lr:g}", 0, [f"--learning_rate={lr}"]) for lr in lrs])
    lr = lrs[min(range(len(lrs)), key=lambda i: final(adamw[i]))]
    base = [f"--learning_rate={lr}", "--optimizer=muon"]
    muon = runs(settings, [(family, "muon", f"ratio{r:g}", 0, [*base, f"--muon_lr_ratio={r}"]) for r in ratios])
    ratio = ratios[min(range(len(ratios)), key=lambda i: final(muon[i]))]
    sweep = {**{f"adamw lr={x:g}": final(r) for x, r in zip(lrs, adamw)},
             **{f"muon ratio={x:g}": final(r) for x, r in zip(ratios, muon)}}
    best = {"adamw": [f"--learning_rate={lr}"], "muon": [*base, f"--muon_lr_ratio={ratio}"]}
    if settings["variants"] and family == "dense":
        best["muon_whole_fused"] = [*best["muon"], "--muon_split_fused=False"]
    swept = {"adamw": adamw[lrs.index(lr)], "muon": muon[ratios.index(ratio)]}  # seed 0 of the comparison
    jobs = [(family, name, "best", seed, args) for seed in range(settings["seeds"]) for name, args in best.items()
            if seed or name not in swept]
    finals = runs(settings, jobs)
    by_name = {name: ([swept[name]] if name in swept else []) + [r for (_, n, _, _, _), r in zip(jobs, finals)
                                                                  if n == name] for name in best}
    return {"best": {"adamw lr": lr, "muon ratio": ratio}, "sweep": sweep, "runs": by_name}


def runs(settings, jobs):
    """train.py for each (family, name, tag, seed, args), `jobs` at a time in the given order: the metrics of each."""
    def one(job):
        family, name, tag, seed, args = job
        out = os.path.join(settings["out"], family, f"{name}_{tag}_seed{seed}")
        done = os.path.join(out, "metrics.jsonl")
        if os.path.isfile(done) and any(json.loads(line).get("iter") == settings["steps"] and "val_loss" in line
                                        for line in open(done)):
            return read_metrics(done)  # finished by an earlier, interrupted study: the same settings, the same run
        shutil.rmtree(out, ignore_errors=True)  # a run cut short starts again
        cmd = [sys.executable, "train.py", *COMMON, *FAMILIES[family], *args, f"--dataset={settings['dataset']}",
               f"--out_dir={out}", f"--seed={seed}", f"--max_iters={settings['steps']}",
               f"--lr_decay_iters={settings['steps']}", f"--eval_interval={max(settings['steps'] // 8, 1)}",
               f"--min_lr={lr_of(args) / 10}"]
        r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        if r.returncode:
            raise UserError(f"{' '.join(cmd)} failed: {r.stderr.strip().splitlines()[-1:]}")
        records = read_metrics(done)
        print(f"{family} {name} {tag} seed {seed}: val loss {final(records):.4f}", flush=True)
        return records
    with ThreadPoolExecutor(settings["jobs"]) as pool:
        return list(pool.map(one, jobs))


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def lr_of(args):
    return next(float(a.split("=")[1]) for a in args if a.startswith("--learning_rate="))


def final(records):
    return [r["val_loss"] for r in records if "val_loss" in r][-1]


def curve(records):
    """[(step, val loss)] and each training step's seconds, from its logged tokens/s."""
    val = [(r["iter"], r["val_loss"]) for r in records if "val_loss" in r]
    steps = [r for r in records if "loss" in r]
    tokens = steps[0]["tokens"]  # the first step's tokens: tokens per step
    return val, [tokens / r["tokens_per_sec"] for r in steps]


def reach(val, target):
    """The first (fractional) step where the val curve [(step, loss)] is at or below target, else None."""
    for (s0, l0), (s1, l1) in zip(val, val[1:]):
        if l1 <= target:
            return s1 if l0 == l1 else s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return None


def summary(runs_):
    """Mean and spread (min-max) over seeds of the val loss at each evaluation, and the median step time of the
    runs of seeds 1.. (those ran side by side with the other optimizer's; seed 0 is the sweep's)."""
    curves = [curve(r) for r in runs_]
    steps = [s for s, _ in curves[0][0]]
    losses = [[c[0][i][1] for c in curves] for i in range(len(steps))]
    step_time = statistics.median(t for _, times in curves[1:] or curves for t in times)
    return steps, losses, step_time


def report(results, settings):
    lines = [f"{settings['steps']} steps of 8 x 64 tokens, float32, one thread per run, AdamW and Muon of a seed side "
             "by side; val loss on 16 fixed batches (8k tokens) of the seed; mean [min, max] over "
             f"{settings['seeds']} seeds", ""]
    for family, res in results.items():
        lines += [f"### {family}: AdamW lr {res['best']['adamw lr']:g}, Muon ratio {res['best']['muon ratio']:g}", "",
                  "sweep (seed 0, final val loss): " + ", ".join(f"{k} {v:.4f}" for k, v in res["sweep"].items()),
                  ""]
        adamw = res["runs"]["adamw"]
        steps, base, base_time = summary(adamw)
        lines += ["| run | val loss at " + " | ".join(str(s) for s in steps[2::2]) +
                  " | steps to AdamW's final | seconds to it | step time |",
                  "|---" * (len(steps[2::2]) + 4) + "|"]
        for name, group in res["runs"].items():
            _, losses, step_time = summary(group)
            cells = [f"{statistics.mean(l):.3f} [{min(l):.3f}, {max(l):.3f}]" for l in losses[2::2]]
            hits = [reach(curve(m)[0], final(a)) for m, a in zip(group, adamw)]  # the same seed's AdamW final
            # seconds at the side-by-side runs' step times: the sweep's seed 0 ran under other load
            secs = [h * step_time for h in hits if h is not None]
            adamw_secs = steps[-1] * base_time
            reached = f"{statistics.mean(hits):.0f} ({statistics.mean(hits) / steps[-1]:.2f}x)" \
                if all(h is not None for h in hits) else f"{sum(h is not None for h in hits)}/{len(hits)} seeds"
            timed = f"{statistics.mean(secs):.0f} s ({statistics.mean(secs) / adamw_secs:.2f}x)" if secs else "-"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {reached} | {timed} | "
                         f"{step_time * 1e3:.0f} ms ({step_time / base_time:.2f}x) |")
        lines.append("")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (family, res) in zip(axes[0], results.items()):
        for name in ("adamw", "muon"):
            steps, losses, _ = summary(res["runs"][name])
            mean = [statistics.mean(l) for l in losses]
            ax.plot(steps[1:], mean[1:], "o-", label=name)
            ax.fill_between(steps[1:], [min(l) for l in losses[1:]], [max(l) for l in losses[1:]], alpha=0.25)
        ax.set(xlabel="step", ylabel="val loss", title=f"{family}: mean and range over seeds")
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


if __name__ == "__main__":
    run_main(main)
