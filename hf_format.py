"""
Our model in Hugging Face transformers' format: the one map between our parameter names and those of
transformers' Llama / DeepSeek-V3 (and DeepSeek's own checkpoints), config.json from a ModelConfig, and our
state dict as transformers' tensors. export.py writes with it, pretrained.py reads Hub checkpoints with it,
bench.py builds its transformers twins with it (in the spirit of torchtitan's state_dict_adapter.py).

Two exact reparametrisations make the DeepSeek-V3 export compute our numbers:
- RoPE layout: our q_pe / k_pe use the half-rotation layout; DeepSeek-V3 checkpoints (and transformers'
  `rope_interleave=True`, its default) use interleaved pairs, so the rotary rows of the query and
  kv_a projections are permuted.
- transformers builds the MLA latent norms (q_a_layernorm, kv_a_layernorm) with eps 1e-6 whatever
  rms_norm_eps says, as DeepSeek's reference code does. RMSNorm(s*x, s^2*eps) = RMSNorm(x, eps), so
  scaling the rows that produce the latents by s = sqrt(1e-6 / norm_eps) keeps our eps exactly.
"""

import math
import re

import torch

from configurator import UserError

# ---- parameter names ----
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


# ---- config.json ----

def llama_config(cfg):
    if cfg.n_routed_experts:
        raise UserError("cannot export a GQA model with MoE layers: LlamaForCausalLM is dense and "
                        "DeepseekV3ForCausalLM needs MLA (use attention='mla' for MoE models)")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.gqa_head_dim,
        "attention_bias": False,
        "mlp_bias": False,
    }


def deepseek_v3_config(cfg):
    if cfg.n_routed_experts:  # the MoE settings transformers hard-codes
        if cfg.score_func != "sigmoid":
            raise UserError(f"cannot export score_func='{cfg.score_func}': DeepseekV3ForCausalLM routes with "
                            "sigmoid scores only")
        if cfg.n_shared_experts < 1:
            raise UserError("cannot export a MoE without shared experts: every DeepseekV3ForCausalLM MoE "
                            "layer has one shared MLP")
        if cfg.n_routed_experts < 2:
            raise UserError("cannot export a MoE with one routed expert: DeepseekV3ForCausalLM scores "
                            "expert groups by their top 2 experts")
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,  # the dense layers
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "q_lora_rank": cfg.q_lora_rank or None,  # None: a plain q_proj
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "rope_interleave": True,  # DeepSeek's layout; the rotary rows are permuted to match
        # a dense MLA model is all "first dense layers"
        "first_k_dense_replace": cfg.first_k_dense if cfg.n_routed_experts else cfg.n_layer,
        "n_routed_experts": cfg.n_routed_experts,
        "num_experts_per_tok": cfg.n_activated_experts,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        # transformers builds ONE shared MLP of width n_shared_experts * moe_intermediate_size, as we do
        "n_shared_experts": cfg.n_shared_experts,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",  # selection by score + e_score_correction_bias (loss-free balancing)
        "n_group": 1,               # no node-limited routing: one group holding every expert
        "topk_group": 1,
        "norm_topk_prob": True,     # combine weights normalised to sum 1 ...
        "routed_scaling_factor": cfg.route_scale,  # ... then scaled
        "num_nextn_predict_layers": 0,  # the MTP modules, if any, are left out (without_mtp)
        "attention_bias": False,
    }


def hf_config(cfg, eot_id, dtype):
    if cfg.attention == "gqa":
        config = llama_config(cfg)
    else:
        config = deepseek_v3_config(cfg)
    config.update({
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot_id,  # documents are separated (and so begin) with the end-of-text token
        "eos_token_id": eot_id,
        "dtype": str(dtype).removeprefix("torch."),
    })
    return config


# ---- weights ----

def half_to_interleaved(w, rope_dim):
    """Reorder the last rope_dim rows of w [..., rows, in] from half-rotation (x_0..x_h-1, y_0..y_h-1)
    to interleaved pairs (x_0, y_0, x_1, y_1, ...)."""
    h = rope_dim // 2
    return _reorder_rope_rows(w, rope_dim, torch.stack([torch.arange(h), torch.arange(h) + h], dim=1).flatten())


def mla_rope_interleaved(name, t, cfg):
    """An MLA parameter with its RoPE rows in DeepSeek's interleaved layout (transformers' and llama.cpp's alike):
    the query's last qk_rope_head_dim rows per head, and k_pe's rows at the end of W_kva; others as they are."""
    if name.endswith(("attn.wq.weight", "attn.wq_b.weight")):             # [H * (nope + rope), in]
        return half_to_interleaved(t.view(cfg.n_head, -1, t.size(-1)), cfg.qk_rope_head_dim).view(t.shape)
    if name.endswith("attn.wkv_a.weight"):                                # [kv_lora_rank + rope, in]
        return half_to_interleaved(t, cfg.qk_rope_head_dim)
    return t


def interleaved_to_half(w, rope_dim):
    """The inverse of half_to_interleaved."""
    return _reorder_rope_rows(w, rope_dim, torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)]))


def _reorder_rope_rows(w, rope_dim, order):
    w = w.clone()
    w[..., -rope_dim:, :] = w[..., -rope_dim:, :][..., order, :]
    return w


def without_mtp(state):
    """The main model's part of a state dict. Exports leave the multi-token-prediction modules out: transformers'
    DeepseekV3 and llama.cpp run the main model only (sample.py --speculative=True is what uses the modules)."""
    return {k: v for k, v in state.items() if not k.startswith("mtp.")}


def hf_tensors(model):
    """Our state dict under transformers names, with the MLA rows reparametrised (see the module docstring)."""
    cfg = model.config
    latent_scale = math.sqrt(1e-6 / cfg.norm_eps)
    tensors = {}
    for name, t in unfuse(without_mtp(model.state_dict()), cfg).items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # transformers re-ties it from the embedding
        t = t.detach().to("cpu")
        if cfg.attention == "mla":
            t = mla_rope_interleaved(name, t, cfg)
            if name.endswith("attn.wkv_a.weight"):                       # [kv_lora_rank + rope, in]
                t[:cfg.kv_lora_rank] *= latent_scale
            elif name.endswith("attn.wq_a.weight"):                      # [q_lora_rank, in]
                t = t * latent_scale
        tensors[hf_name(name)] = t.contiguous()
    return tensors
