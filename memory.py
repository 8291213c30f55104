"""
How many bytes of parameters, gradients and optimizer state a training run holds on each rank, under DDP and under
FSDP, for every preset in config/, and which presets fit a GPU of 24 GB or 80 GB with N GPUs.

    python memory.py                    # Muon (the default optimizer) and AdamW, N = 1, 2, 4, 8

The bytes per parameter of each kind are measured: one training step of a small MLA + MoE model on the CPU with the
run's optimizer, then every parameter, gradient and optimizer state tensor counted, as train.py's startup line
`memory of rank 0` counts them (optim.held_bytes). Muon's matrices hold a momentum, AdamW's parameters two moments.
The presets' parameters are counted by kind on the meta device (no memory). Under DDP every rank holds all of it;
FSDP divides it by the ranks (train.py's line on 2 CPU ranks says so: tests/test_fsdp.py). The tables are computed
from those figures and leave out the activations, bfloat16 copies of the block being computed under FSDP, the CUDA
context and the allocator's slack: "fits" means that this part alone takes at most the GPU's memory.
"""

import glob
import os
from dataclasses import dataclass

import torch

from configurator import configure, from_settings, read_file, run_main
from device import Job
from model import ModelConfig, Transformer
from optim import build_optimizer, held_bytes, muon_groups
from tokenizer import COSMO2_VOCAB

GPUS_GB = (24, 80)
RANKS = (1, 2, 4, 8)


@dataclass
class MemoryConfig:
    """memory.py's settings (configurator.py: --key=value)."""
    configs: str = "config/*.py"        # the presets (a glob); those without a model of their own are skipped


@dataclass
class OptimizerSettings:
    """What optim.build_optimizer reads of train.py's settings: its defaults."""
    optimizer: str
    learning_rate: float = 6e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    muon_lr_ratio: float = 1.0
    muon_momentum: float = 0.95
    muon_scale: str = "match_rms_adamw"
    muon_split_fused: bool = True


def measured_bytes():
    """{optimizer: (bytes per parameter that Muon would leave to AdamW, bytes per parameter that Muon trains)} after
    one step of a small MLA + MoE model on the CPU in float32, for optimizer "muon" and "adamw"."""
    cfg = ModelConfig(vocab_size=256, block_size=32, n_layer=2, n_embd=64, n_head=4, intermediate_size=128,
                      attention="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                      n_routed_experts=4, n_activated_experts=2, moe_intermediate_size=32, first_k_dense=1)
    result = {}
    for name in ("muon", "adamw"):
        torch.manual_seed(0)
        model = Transformer(cfg)
        optimizer = build_optimizer(model, OptimizerSettings(name), Job(torch.device("cpu"), "float32"))
        x = torch.randint(cfg.vocab_size, (2, cfg.block_size + 1))
        model(x[:, :-1], x[:, 1:])[1].total.backward()
        optimizer.step()
        matrices = {id(p) for g in muon_groups(model, True) for p in g["params"]}
        kinds = [[p for p in model.parameters() if (id(p) in matrices) == is_matrix] for is_matrix in (False, True)]
        result[name] = tuple(sum(held_bytes(ps, optimizer).values()) / sum(p.numel() for p in ps) for ps in kinds)
    return result


def preset_counts(path):
    """(parameters trained by AdamW, by Muon) of a preset's model, counted on the meta device; None when the file
    sets no model of its own (fine-tuning presets, a config that only changes training settings)."""
    settings = read_file(path)
    if "n_layer" not in settings:
        return None
    with torch.device("meta"):
        model = Transformer(from_settings(ModelConfig, {"vocab_size": COSMO2_VOCAB, **settings}, where=path))
    muon = sum(p.numel() for g in muon_groups(model, True) for p in g["params"])
    return model.num_params() - muon, muon


def main(argv=None):
    settings = configure(MemoryConfig(), argv)
    per_param = measured_bytes()
    print("measured bytes per parameter (parameter, gradient and optimizer state in float32): "
          + "; ".join(f"--optimizer={k}: {a:.2f} for the embedding, head, norms and routers, {m:.2f} for the hidden "
                      "matrices" for k, (a, m) in per_param.items()))
    presets = {os.path.basename(p)[:-3]: c for p in sorted(glob.glob(settings.configs)) if (c := preset_counts(p))}
    presets = dict(sorted(presets.items(), key=lambda kv: sum(kv[1])))
    gib = {(name, opt): (a * per_param[opt][0] + m * per_param[opt][1]) / 2**30
           for name, (a, m) in presets.items() for opt in per_param}
    print("\n| preset | parameters | hidden matrices | Muon: DDP, every rank | "
          + " | ".join(f"Muon: FSDP over {n}" for n in RANKS[1:]) + " | AdamW: DDP |")
    print("|---" * (4 + len(RANKS)) + "|")
    for name, (a, m) in presets.items():
        cells = " | ".join(f"{gib[name, 'muon'] / n:.2f} GiB" for n in RANKS[1:])
        print(f"| {name} | {(a + m) / 1e6:,.0f}M | {m / (a + m):.0%} | {gib[name, 'muon']:.2f} GiB | {cells} | "
              f"{gib[name, 'adamw']:.2f} GiB |")
    largest = max(presets, key=lambda name: sum(presets[name]))
    rate = gib[largest, "muon"] * 2**30 / sum(presets[largest])
    print(f"\nwhat fits (computed from the measured bytes, before activations): the largest preset with Muon, and the "
          f"largest model at {largest}'s {rate:.1f} bytes per parameter with Muon")
    print("\n| GPU | GPUs | DDP | FSDP |\n|---|---|---|---|")
    for memory in GPUS_GB:
        for n in RANKS:
            cells = [fits(presets, gib, memory * share) + f" ({memory * share * 2**30 / rate / 1e9:,.1f}B parameters)"
                     for share in (1, n)]
            print(f"| {memory} GiB | {n} | {cells[0]} | {cells[1]} |")


def fits(presets, gib, memory):
    """The largest preset whose training state (Muon) takes at most `memory` GiB, or "none"."""
    return max(((sum(presets[p]), p) for p in presets if gib[p, "muon"] <= memory), default=(0, "none"))[1]


if __name__ == "__main__":
    run_main(main)
