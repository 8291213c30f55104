"""
Measured speed on the current device, side by side with Hugging Face transformers on the same weights.

    python bench.py --quick          # under a minute on 2 CPU cores
    python bench.py                  # more repetitions, longer generations
    python bench.py --device=cuda --compile=True --dense_config=config/smollm2_135m.py \
        --moe_config=config/deepseek_moe.py --batch_size=8 --block_size=1024 --moe_tokens=16384

Every figure is the median of several timed rounds after warm-up; within a round the implementations being
compared take turns, so that drift in the machine's speed favours neither. Sections:
1. training step (forward + backward + AdamW) tokens/s and MFU: ours vs LlamaForCausalLM (dense config) and
   DeepseekV3ForCausalLM (MLA + MoE config), built through hf_format's mapping from the same weights;
2. greedy generation tokens/s with the KV cache at batch 1 and 8 (ours vs transformers' generate, checking
   that both compute the same logits) and KV-cache bytes per token;
3. the MoE layer alone (forward + backward on moe_tokens tokens): grouped GEMMs vs the sorted loop (the fallback
   where grouped GEMMs cannot run) vs a per-expert masked loop over all tokens, and against a dense SwiGLU with
   the same active FLOPs on the same tokens (the MoE's overhead; 1.0 would be none);
4. speculative decoding at batch 1 (greedy): the MLA + MoE config with one multi-token-prediction module, trained
   briefly on counting sequences, decoding with its MTP module drafting (generate.speculate) against plain
   decoding, checking that both give the same tokens, and the share of drafts accepted;
5. prepare.py tokenization tokens/s with 1 worker and with all cores.
Prints a markdown table and writes bench.json.
"""

import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import unittest.mock
from dataclasses import dataclass, replace

import torch

import model
from configurator import UserError, configure, from_settings, read_file, run_main
from device import autocast, peak_flops, pick_device, pick_dtype
from generate import KVCache, Sampling, generate, speculate
from hf_format import hf_config, hf_tensors
from model import MLP, ModelConfig, MoE, Transformer, swiglu
from tokenizer import COSMO2_VOCAB

@dataclass
class BenchConfig:
    """bench.py's settings (configurator.py: --key=value)."""
    device: str = "auto"                # auto: cuda, then mps, then cpu
    dtype: str = "auto"                 # auto: bfloat16 autocast on GPUs that support it, float32 on CPU
    compile: bool = False               # torch.compile our model (transformers' stays eager)
    quick: bool = False                 # fewer repetitions and shorter generations
    dense_config: str = "config/bench_dense.py"  # dense GQA (compared with LlamaForCausalLM)
    moe_config: str = "config/bench_moe.py"      # MLA + MoE (compared with DeepseekV3ForCausalLM)
    batch_size: int = 8                 # training-step batch
    block_size: int = 128               # training-step sequence length
    gen_tokens: int = 64                # new tokens per generation
    moe_tokens: int = 2048              # tokens through the MoE layer alone
    prepare: bool = True                # also time prepare.py's tokenizer on the offline corpus
    out: str = "bench.json"             # where the results go (JSON)


@dataclass
class Bench:
    """What every section needs: the settings, where it runs and in what precision, and the peak for MFU."""
    settings: BenchConfig
    device: torch.device
    dtype: str
    peak: float | None = None

    @property
    def ctx(self):
        return autocast(self.device, self.dtype)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def timed(fns, reps, warmup=1, sync=lambda: None):
    """Median seconds of each of fns over reps rounds, after warmup rounds. The functions take turns in
    every round, so that a machine that speeds up or slows down during the run favours none of them."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, fn_times in zip(fns, times):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            fn_times.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def twins(cfg, device):
    """Our model and the transformers model with the same weights, loaded from the files export.py writes."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    ours = Transformer(cfg)
    for moe in ours.moe_layers():  # a trained router has non-zero balancing biases
        moe.router.bias.uniform_(-0.01, 0.01)
    with tempfile.TemporaryDirectory() as hf_dir:
        with open(os.path.join(hf_dir, "config.json"), "w") as f:
            json.dump(hf_config(cfg, eot_id=0, dtype=torch.float32), f)
        save_file(hf_tensors(ours), os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa", dtype=torch.float32)
    return ours.to(device), hf.to(device)


def train_step_bench(ours, hf, cfg, bench):
    settings, device, peak = bench.settings, bench.device, bench.peak
    B, T = settings.batch_size, cfg.block_size
    x = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    y = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    compiled = torch.compile(ours) if settings.compile else ours

    def step(model, loss_of):
        # fused, as train.py and transformers' Trainer use it
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))

        def run():
            with bench.ctx:
                loss = loss_of(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    ours_step = step(compiled, lambda m: m(x, y)[1].total)
    hf_step = step(hf, lambda m: m(input_ids=x, labels=x).loss)  # labels shifted inside: T-1 targets
    reps = 5 if settings.quick else 9
    rows = {}
    seconds = timed([ours_step, hf_step], reps, warmup=2, sync=bench.sync)
    for name, s in zip(("ours", "transformers"), seconds):
        tok_s = B * T / s
        rows[name] = dict(tokens_per_s=tok_s, mfu=ours.flops_per_token(T) * tok_s / peak if peak else None)
    ours.pop_expert_counts()
    return rows


def kv_bytes_per_token(ours, hf, cfg, device):
    caches = [KVCache(4) for _ in ours.layers]
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        ours.trunk(prompt, caches)
        past = hf(input_ids=prompt, use_cache=True).past_key_values
    hf_bytes = sum(t[0, :, -1].numel() * t.element_size() for layer in past.layers for t in (layer.keys, layer.values))
    return sum(c.bytes_per_token() for c in caches), hf_bytes


def generation_bench(ours, hf, cfg, bench):
    settings, device = bench.settings, bench.device
    n_new = 32 if settings.quick else settings.gen_tokens
    reps = 5
    rows = {}
    for B in (1, 8):
        prompt = torch.randint(1, cfg.vocab_size, (B, 16), device=device)
        with torch.no_grad():  # the same weights give the same logits, checked in float32 (greedy tokens can tie)
            diff = (ours(prompt)[0] - hf(prompt).logits).abs().max().item()
        with bench.ctx, torch.no_grad():
            t_ours, t_hf = timed([lambda: generate(ours, prompt, n_new, Sampling(temperature=0)),
                                  lambda: hf.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new,
                                                      do_sample=False, eos_token_id=None, pad_token_id=0)],
                                 reps, sync=bench.sync)
        rows[f"batch {B}"] = dict(ours=B * n_new / t_ours, transformers=B * n_new / t_hf, max_logit_diff=diff)
    return rows


def masked_moe(moe, x):
    """The naive baseline: every routed expert runs on every token; a mask zeroes the unchosen ones."""
    weights, indices, _ = moe.router(x)
    y = moe.shared_experts(x) if moe.shared_experts is not None else torch.zeros_like(x)
    for e, (gate_up, down) in enumerate(zip(moe.experts.gate_up_proj.unbind(0), moe.experts.down_proj.unbind(0))):
        w = (weights * (indices == e)).sum(-1, keepdim=True)               # [N, 1], 0 unless chosen
        y = y + w.to(x.dtype) * swiglu(x, gate_up, down)
    return y


def sorted_loop(moe, x):
    """The MoE layer with its experts run one after the other on their slices: the fallback path."""
    with unittest.mock.patch.object(model, "grouped_mm_runs", lambda device, dtype: False):
        return moe(x)


def moe_layer_bench(cfg, bench):
    settings, device, dtype, ctx = bench.settings, bench.device, bench.dtype, bench.ctx
    reps = 3 if settings.quick else 7
    N = settings.moe_tokens
    tol = 1e-4 if dtype == "float32" else 5e-2  # relative: float32, or half precision's 8 to 11 mantissa bits
    rows = {}
    for E, k in ((8, 2), (16, 2), (64, 6)):
        torch.manual_seed(0)
        moe = MoE(replace(cfg, n_routed_experts=E, n_activated_experts=k)).to(device)
        dense = MLP(cfg.n_embd, (cfg.n_shared_experts + k) * cfg.moe_intermediate_size).to(device)
        x = torch.randn(1, N, cfg.n_embd, device=device, requires_grad=True)
        with ctx, torch.no_grad():  # the three MoE variants compute the same function on the same inputs
            ref = masked_moe(moe, x[0]).float()
            diff = max(((y.float() - ref).abs().max() / ref.abs().max()).item()
                       for y in (moe(x)[0], sorted_loop(moe, x)[0]))
            assert diff <= tol, f"MoE paths disagree by {diff:.1e} (relative)"

        def fwd_bwd(f):
            def run():
                with ctx:
                    y = f()
                y.float().square().mean().backward()
            return run
        times = timed([fwd_bwd(lambda: moe(x)), fwd_bwd(lambda: sorted_loop(moe, x)),
                       fwd_bwd(lambda: masked_moe(moe, x[0])), fwd_bwd(lambda: dense(x))], reps, sync=bench.sync)
        rows[f"{E} experts, top-{k}"] = dict(zip(("grouped_ms", "sorted_loop_ms", "masked_loop_ms", "dense_ms"),
                                                 (t * 1e3 for t in times)), max_rel_diff=diff)
    return rows


def counting(batch, length, generator, period=64):
    """Sequences that count up by one modulo period, jumping to a random token 10% of the time: a model learns
    them in a few dozen steps, and then its next tokens, and its MTP module's, are mostly right."""
    jumps = torch.rand(batch, length, generator=generator) < 0.1
    steps = torch.where(jumps, torch.randint(0, period, (batch, length), generator=generator), 1)
    return (torch.randint(0, period, (batch, 1), generator=generator) + steps.cumsum(1)) % period


def speculative_bench(cfg, bench):
    """Greedy decoding at batch 1 of cfg with one MTP module trained on counting sequences: plain (generate) against
    speculative (speculate, the MTP module drafting one token that the main model checks with the next one)."""
    settings, device, ctx = bench.settings, bench.device, bench.ctx
    torch.manual_seed(0)
    model = Transformer(replace(cfg, mtp_depth=1)).to(device)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=device.type in ("cuda", "cpu"))
    steps = 40 if settings.quick else 150
    for _ in range(steps):
        batch = counting(8, 33, generator).to(device)
        with ctx:
            _, losses = model(batch[:, :-1], batch[:, 1:])
        losses.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_router_bias(model.pop_expert_counts())
    trained = dict(train_steps=steps, loss=losses.total.item(), mtp_loss=losses.mtp[0].item())
    model.eval()
    n_new = 32 if settings.quick else settings.gen_tokens
    prompt = counting(1, 16, generator).to(device)
    drafts, greedy = {}, Sampling(temperature=0)
    with ctx, torch.no_grad():
        plain = generate(model, prompt, n_new, greedy)
        speculative = torch.cat([prompt, *speculate(model, prompt, n_new, greedy, stats=drafts)], dim=1)
        t_plain, t_speculative = timed([lambda: generate(model, prompt, n_new, greedy),
                                        lambda: list(speculate(model, prompt, n_new, greedy))], 5, sync=bench.sync)
    return dict(plain=n_new / t_plain, speculative=n_new / t_speculative, same_tokens=torch.equal(plain, speculative),
                acceptance=drafts["accepted"] / max(drafts["drafted"], 1), **drafts, **trained)


def prepare_bench(quick):
    """prepare.py on the offline corpus with 1 worker and all cores; tokens/s as it reports them."""
    rows = {}
    for workers in sorted({1, os.cpu_count()}):
        name = f"_bench_prepare_{workers}"  # under data/, removed afterwards
        cmd = [sys.executable, "prepare.py", f"--name={name}", f"--num_proc={workers}", "--overwrite"]
        if quick:
            cmd.append("--max_tokens=300000")
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        shutil.rmtree(os.path.join("data", name), ignore_errors=True)
        found = re.findall(r"([\d,.]+) tokens/s", out.stdout + out.stderr)
        rows[f"{workers} worker(s)"] = float(found[-1].replace(",", "")) if out.returncode == 0 and found else None
    return rows


def table(results):
    lines = [f"Machine: {results['machine']}; peak: {results['peak']}", "",
             "| what | ours | transformers | ratio |", "| --- | --- | --- | --- |"]
    for family, rows in results["train"].items():
        o, h = rows["ours"], rows["transformers"]
        mfu = f", MFU {o['mfu']:.1%}" if o["mfu"] else ""
        lines.append(f"| train step, {family} (tokens/s) | {o['tokens_per_s']:,.0f}{mfu} | "
                     f"{h['tokens_per_s']:,.0f} | {o['tokens_per_s'] / h['tokens_per_s']:.2f}x |")
    for family, rows in results["generate"].items():
        for batch, r in rows.items():
            same = "" if r["max_logit_diff"] < 1e-3 else f" (logits differ by {r['max_logit_diff']:.1e}!)"
            lines.append(f"| generate, {family}, {batch} (tokens/s) | {r['ours']:,.0f} | {r['transformers']:,.0f} | "
                         f"{r['ours'] / r['transformers']:.2f}x{same} |")
    for family, (ours_b, hf_b) in results["kv_bytes_per_token"].items():
        lines.append(f"| KV cache, {family} (bytes/token, all layers) | {ours_b:,} | {hf_b:,} | |")
    lines += ["", f"| MoE layer, forward + backward, {results['moe_tokens']:,} tokens | grouped GEMMs (ms) | sorted loop "
              "(ms) | masked loop (ms) | dense SwiGLU, same active FLOPs (ms) | overhead vs dense |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results["moe_layer"].items():
        lines.append(f"| {name} | {r['grouped_ms']:.1f} | {r['sorted_loop_ms']:.1f} | {r['masked_loop_ms']:.1f} | "
                     f"{r['dense_ms']:.1f} | {r['grouped_ms'] / r['dense_ms']:.2f}x |")
    r = results["speculative"]
    same = "" if r["same_tokens"] else " (tokens differ!)"
    lines += ["", "| speculative decoding, MLA + MoE + 1 MTP module, batch 1, greedy | plain (tokens/s) | speculative "
              "(tokens/s) | ratio | drafts accepted |", "| --- | --- | --- | --- | --- |",
              f"| trained {r['train_steps']} steps on counting sequences | {r['plain']:,.0f} | {r['speculative']:,.0f} | "
              f"{r['speculative'] / r['plain']:.2f}x{same} | {r['acceptance']:.1%} ({r['accepted']} of {r['drafted']}) |"]
    if results.get("prepare"):
        lines += ["", "| prepare.py tokenization | tokens/s |", "| --- | --- |"]
        lines += [f"| {k} | {v:,.0f} |" if v else f"| {k} | failed |" for k, v in results["prepare"].items()]
    return "\n".join(lines)


def main(argv=None):
    settings = configure(BenchConfig(), argv)
    if importlib.util.find_spec("transformers") is None:
        raise UserError("bench.py compares against transformers: pip install -r requirements-dev.txt")
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    peak, peak_note = peak_flops(device, dtype)
    bench = Bench(settings, device, dtype, peak)
    results = dict(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                           f"torch {torch.__version__}, {device.type}"
                           + (f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
                           + f", {dtype}",
                   peak=peak_note, peak_flops=peak, train={}, generate={}, kv_bytes_per_token={},
                   moe_tokens=settings.moe_tokens)
    for family, path in (("dense GQA", settings.dense_config), ("MLA + MoE", settings.moe_config)):
        settings_of = {"vocab_size": COSMO2_VOCAB, **read_file(path), "block_size": settings.block_size}
        cfg = from_settings(ModelConfig, settings_of, where=path)  # a training preset's vocabulary is its data's
        print(f"{family}: {path}, {cfg.n_layer} layers, width {cfg.n_embd}", file=sys.stderr)
        ours, hf = twins(cfg, device)
        ours.eval(), hf.eval()  # generation first, while both still hold the same weights
        results["kv_bytes_per_token"][family] = kv_bytes_per_token(ours, hf, cfg, device)
        results["generate"][family] = generation_bench(ours, hf, cfg, bench)
        ours.train(), hf.train()
        results["train"][family] = train_step_bench(ours, hf, cfg, bench)
        if family == "MLA + MoE":
            results["moe_layer"] = moe_layer_bench(cfg, bench)
            results["speculative"] = speculative_bench(cfg, bench)
    if settings.prepare:
        results["prepare"] = prepare_bench(settings.quick)
    print(table(results))
    with open(settings.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    run_main(main)
