"""
Export a checkpoint to a Hugging Face transformers directory that loads with no custom code:

    python export_hf.py --out_dir=out                # writes out/hf
    python export_hf.py --out_dir=out --hf_dir=somewhere/else

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("out/hf")

Dense GQA models become LlamaForCausalLM; MLA models (DeepSeekMoE or dense) become
DeepseekV3ForCausalLM. The directory holds config.json, model.safetensors, generation_config.json,
tokenizer.json and tokenizer_config.json. transformers itself is not needed to export, only to load.

Two exact reparametrisations make the DeepSeek-V3 export compute our numbers:
- RoPE layout: our q_pe / k_pe use the half-rotation layout; DeepSeek-V3 checkpoints (and transformers'
  `rope_interleave=True`, its default) use interleaved pairs, so the rotary rows of the query and
  kv_a projections are permuted.
- transformers builds the MLA latent norms (q_a_layernorm, kv_a_layernorm) with eps 1e-6 whatever
  rms_norm_eps says, as DeepSeek's reference code does. RMSNorm(s*x, s^2*eps) = RMSNorm(x, eps), so
  scaling the rows that produce the latents by s = sqrt(1e-6 / norm_eps) keeps our eps exactly.
"""

import json
import math
import os

import torch
from safetensors.torch import save_file

import train
from configurator import UserError, configure, run_main
import prepare
from pretrained import hf_name, unfuse
from sample import checkpoint_tokenizer

DEFAULTS = dict(
    out_dir="out",  # the directory holding ckpt.pt
    hf_dir="",      # where to write the transformers files; "" means out_dir/hf
)

# ---- config.json ----

def llama_config(c):
    if c.n_routed_experts:
        raise UserError("cannot export a GQA model with MoE layers: LlamaForCausalLM is dense and "
                        "DeepseekV3ForCausalLM needs MLA (use attention='mla' for MoE models)")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.n_embd,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "head_dim": c.gqa_head_dim,
        "attention_bias": False,
        "mlp_bias": False,
    }


def deepseek_v3_config(c):
    if c.n_routed_experts:  # the MoE settings transformers hard-codes
        if c.score_func != "sigmoid":
            raise UserError(f"cannot export score_func='{c.score_func}': DeepseekV3ForCausalLM routes with "
                            "sigmoid scores only")
        if c.n_shared_experts < 1:
            raise UserError("cannot export a MoE without shared experts: every DeepseekV3ForCausalLM MoE "
                            "layer has one shared MLP")
        if c.n_routed_experts < 2:
            raise UserError("cannot export a MoE with one routed expert: DeepseekV3ForCausalLM scores "
                            "expert groups by their top 2 experts")
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": c.n_embd,
        "intermediate_size": c.intermediate_size,  # the dense layers
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_head,
        "q_lora_rank": c.q_lora_rank or None,  # None: a plain q_proj
        "kv_lora_rank": c.kv_lora_rank,
        "qk_nope_head_dim": c.qk_nope_head_dim,
        "qk_rope_head_dim": c.qk_rope_head_dim,
        "v_head_dim": c.v_head_dim,
        "rope_interleave": True,  # DeepSeek's layout; the rotary rows are permuted to match
        # a dense MLA model is all "first dense layers"
        "first_k_dense_replace": c.first_k_dense if c.n_routed_experts else c.n_layer,
        "n_routed_experts": c.n_routed_experts,
        "num_experts_per_tok": c.n_activated_experts,
        "moe_intermediate_size": c.moe_intermediate_size,
        # transformers builds ONE shared MLP of width n_shared_experts * moe_intermediate_size, as we do
        "n_shared_experts": c.n_shared_experts,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",  # selection by score + e_score_correction_bias (loss-free balancing)
        "n_group": 1,               # no node-limited routing: one group holding every expert
        "topk_group": 1,
        "norm_topk_prob": True,     # combine weights normalised to sum 1 ...
        "routed_scaling_factor": c.route_scale,  # ... then scaled
        "num_nextn_predict_layers": 0,  # no multi-token-prediction module
        "attention_bias": False,
    }


def hf_config(c, eot_id, dtype):
    if c.attention == "gqa":
        config = llama_config(c)
    else:
        config = deepseek_v3_config(c)
    config.update({
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": c.tie_embeddings,
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
    order = torch.stack([torch.arange(h), torch.arange(h) + h], dim=1).flatten()
    w = w.clone()
    w[..., -rope_dim:, :] = w[..., -rope_dim:, :][..., order, :]
    return w


def hf_tensors(model):
    """Our state dict under transformers names, with the MLA rows reparametrised (see the module docstring)."""
    c = model.config
    latent_scale = math.sqrt(1e-6 / c.norm_eps)
    tensors = {}
    for name, t in unfuse(model.state_dict(), c).items():
        if name == "lm_head.weight" and c.tie_embeddings:
            continue  # transformers re-ties it from the embedding
        t = t.detach().to("cpu")
        if c.attention == "mla":
            if name.endswith(("attn.wq.weight", "attn.wq_b.weight")):  # [H * (nope + rope), in]
                t = half_to_interleaved(t.view(c.n_head, -1, t.size(-1)), c.qk_rope_head_dim).view(t.shape)
            elif name.endswith("attn.wkv_a.weight"):                     # [kv_lora_rank + rope, in]
                t = half_to_interleaved(t, c.qk_rope_head_dim)
                t[:c.kv_lora_rank] *= latent_scale
            elif name.endswith("attn.wq_a.weight"):                      # [q_lora_rank, in]
                t = t * latent_scale
        tensors[hf_name(name)] = t.contiguous()
    return tensors


# ---- files ----

def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


def export(model, tokenizer, hf_dir):
    """Write model + tokenizer as a transformers directory; refuses (UserError) what transformers cannot represent."""
    c = model.config
    eot_id = prepare.eot_id(tokenizer)
    eot = tokenizer.id_to_token(eot_id)
    dtype = next(model.parameters()).dtype
    config = hf_config(c, eot_id, dtype)  # refuses before anything is written
    tensors = hf_tensors(model)
    os.makedirs(hf_dir, exist_ok=True)
    path = os.path.join(hf_dir, "model.safetensors")
    save_file(tensors, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)
    write_json(os.path.join(hf_dir, "config.json"), config)
    write_json(os.path.join(hf_dir, "generation_config.json"),
               {"bos_token_id": eot_id, "eos_token_id": eot_id})
    path = os.path.join(hf_dir, "tokenizer.json")
    tokenizer.save(path + ".tmp")
    os.replace(path + ".tmp", path)
    write_json(os.path.join(hf_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot, "eos_token": eot, "unk_token": eot,
        "model_max_length": c.block_size,
        "clean_up_tokenization_spaces": False,
    })


def main(argv=None):
    cfg = configure(DEFAULTS, argv)
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    if not os.path.isfile(ckpt_path):
        raise UserError(f"no checkpoint at {ckpt_path}: train one first (python train.py) or pass --out_dir=DIR")
    ckpt = train.load_checkpoint(ckpt_path)
    model = train.model_from_checkpoint(ckpt)
    hf_dir = cfg["hf_dir"] or os.path.join(cfg["out_dir"], "hf")
    export(model, checkpoint_tokenizer(ckpt), hf_dir)
    kind = "LlamaForCausalLM" if model.config.attention == "gqa" else "DeepseekV3ForCausalLM"
    print(f"wrote {kind} ({model.num_params():,} parameters) to {hf_dir}")


if __name__ == "__main__":
    run_main(main)
