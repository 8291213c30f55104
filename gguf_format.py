"""
Our model in llama.cpp's GGUF format: dense GQA models as architecture `llama`, MLA models (MoE or dense) as
`deepseek2`, the tokenizer embedded, written by export.py and read back by pretrained.py (SmolLM2's file).
The facts below are llama.cpp's (its converter convert_hf_to_gguf.py and its loader, src/models/*.cpp):

- llama: each query/key head's rows are permuted from our half-rotation RoPE layout to interleaved pairs
  (the converter's LlamaModel.permute is hf_format.half_to_interleaved per head; interleaved_to_half undoes it).
- deepseek2: RoPE pairs adjacent dims too, so the rope rows of the query and kv_a projections are
  interleaved (as for DeepSeek-V3 in hf_format.py). MLA runs absorbed: W_kvb is stored split, as
  attn_k_b [H, kv_lora_rank, qk_nope] (W_UK transposed per head) and attn_v_b [H, v_head_dim, kv_lora_rank];
  the cache holds the latent and the RoPE key, "key_length" = kv_lora_rank + qk_rope and "value_length" =
  kv_lora_rank of one shared head. Every RMSNorm, the latent ones included, uses the file's rms epsilon, so
  no reparametrisation is needed. Routed experts are stacked [E, out, in] like ours; the balancing bias is
  exp_probs_b (selection only); sigmoid or softmax gating, weights normalised then scaled.
- The tokenizer: a byte-level BPE with cosmo2's pre-tokenizer (single digits, then GPT-2's regex) is
  llama.cpp's `gpt2` model with pre-tokenizer `smollm`; special tokens are CONTROL tokens.
"""

import json
import re
from pathlib import Path

import gguf
import numpy as np

from atomic import atomic_write
from configurator import UserError
from hf_format import STACKED, half_to_interleaved, mla_rope_interleaved, unfuse, without_mtp

OUTTYPES = ("f32", "f16", "bf16", "q8_0")

# ---- parameter names: ours <-> GGUF's. Per layer `layers.N.` <-> `blk.N.`; fused and stacked matrices
# ---- are split first (split_for_gguf), so the table names their parts ----
TOP_NAMES = [("tok_embeddings.weight", "token_embd.weight"), ("norm.weight", "output_norm.weight"),
             ("lm_head.weight", "output.weight")]
LAYER_NAMES = [
    ("attn_norm.weight", "attn_norm.weight"), ("ffn_norm.weight", "ffn_norm.weight"),
    ("attn.wq.weight", "attn_q.weight"), ("attn.wk.weight", "attn_k.weight"), ("attn.wv.weight", "attn_v.weight"),
    ("attn.wo.weight", "attn_output.weight"),
    ("attn.wq_a.weight", "attn_q_a.weight"), ("attn.q_norm.weight", "attn_q_a_norm.weight"),
    ("attn.wq_b.weight", "attn_q_b.weight"), ("attn.wkv_a.weight", "attn_kv_a_mqa.weight"),
    ("attn.kv_norm.weight", "attn_kv_a_norm.weight"),
    ("attn.wk_b", "attn_k_b.weight"), ("attn.wv_b", "attn_v_b.weight"),           # W_kvb, split
    ("ffn.gate_proj.weight", "ffn_gate.weight"), ("ffn.up_proj.weight", "ffn_up.weight"),
    ("ffn.down_proj.weight", "ffn_down.weight"),
    ("ffn.router.weight", "ffn_gate_inp.weight"), ("ffn.router.bias", "exp_probs_b.bias"),
    ("ffn.experts.gate_proj", "ffn_gate_exps.weight"), ("ffn.experts.up_proj", "ffn_up_exps.weight"),
    ("ffn.experts.down_proj", "ffn_down_exps.weight"),
    ("ffn.shared_experts.gate_proj.weight", "ffn_gate_shexp.weight"),
    ("ffn.shared_experts.up_proj.weight", "ffn_up_shexp.weight"),
    ("ffn.shared_experts.down_proj.weight", "ffn_down_shexp.weight"),
]


def gguf_name(name):
    """Ours (split) -> GGUF, e.g. layers.3.attn.wq.weight -> blk.3.attn_q.weight."""
    return _rename(name, 0, 1)


def our_name(name):
    """GGUF -> ours (split)."""
    return _rename(name, 1, 0)


def _rename(name, src, dst):
    m = re.match((r"layers\.(\d+)\.(.*)", r"blk\.(\d+)\.(.*)")[src], name)
    prefix, rest, table = (("layers.{}.", "blk.{}.")[dst].format(m[1]), m[2], LAYER_NAMES) if m else ("", name, TOP_NAMES)
    for pair in table:
        if rest == pair[src]:
            return prefix + pair[dst]
    raise KeyError(f"no GGUF counterpart for {name}")


# ---- the model ----

def check_representable(cfg):
    """Refuse (one line) what llama.cpp's llama / deepseek2 cannot compute as we do."""
    if cfg.attention == "gqa" and cfg.n_routed_experts:
        raise UserError("cannot export a GQA model with MoE layers to GGUF: llama.cpp's llama has no shared experts "
                        "or loss-free routing bias (use attention='mla', exported as deepseek2)")
    if cfg.attention == "mla" and cfg.n_routed_experts:
        if cfg.n_shared_experts < 1:
            raise UserError("cannot export a MoE without shared experts to GGUF: llama.cpp's deepseek2 expects them")
        if cfg.route_scale <= 0:
            raise UserError(f"cannot export route_scale={cfg.route_scale} to GGUF: llama.cpp reads a scale of 0 as 1")


def gguf_metadata(cfg):
    """(architecture, {key without the architecture's prefix: value}) for llama.cpp."""
    check_representable(cfg)
    common = {"context_length": cfg.block_size, "embedding_length": cfg.n_embd, "block_count": cfg.n_layer,
              "feed_forward_length": cfg.intermediate_size, "attention.head_count": cfg.n_head,
              "attention.layer_norm_rms_epsilon": cfg.norm_eps, "rope.freq_base": cfg.rope_theta,
              "vocab_size": cfg.vocab_size}
    if cfg.attention == "gqa":
        return "llama", {**common, "attention.head_count_kv": cfg.n_kv_head, "rope.dimension_count": cfg.gqa_head_dim,
                         "attention.key_length": cfg.gqa_head_dim, "attention.value_length": cfg.gqa_head_dim}
    moe = cfg.n_routed_experts > 0
    return "deepseek2", {
        **common,
        "attention.head_count_kv": 1,                       # the absorbed form: one latent head for all
        "attention.q_lora_rank": cfg.q_lora_rank,           # also when 0: then a plain attn_q
        "attention.kv_lora_rank": cfg.kv_lora_rank,
        "attention.key_length": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
        "attention.value_length": cfg.kv_lora_rank,
        "attention.key_length_mla": cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
        "attention.value_length_mla": cfg.v_head_dim,
        "rope.dimension_count": cfg.qk_rope_head_dim,
        "leading_dense_block_count": cfg.first_k_dense if moe else cfg.n_layer,
        "expert_count": cfg.n_routed_experts, "expert_used_count": cfg.n_activated_experts if moe else 0,
        "expert_shared_count": cfg.n_shared_experts if moe else 0,
        "expert_feed_forward_length": cfg.moe_intermediate_size if moe else 0,
        "expert_weights_scale": cfg.route_scale, "expert_weights_norm": True,
        "expert_gating_func": 2 if cfg.score_func == "sigmoid" else 1,
    }


def split_for_gguf(state, cfg):
    """Our state dict as llama.cpp stores it: fused matrices apart, routed experts still stacked, RoPE rows in
    its layout, W_kvb split (MLA). {our (split) name: float32 tensor}."""
    state = {k: v.detach().float().cpu() for k, v in state.items()
             if not (k == "lm_head.weight" and cfg.tie_embeddings)}  # absent output.weight: llama.cpp ties
    experts = {k: state.pop(k) for k in list(state) if STACKED.fullmatch(k)}
    out = unfuse(state, cfg)                                               # W_q, W_k, W_v; W_gate, W_up
    for name, t in experts.items():                                        # [E, out, in]
        if name.endswith("gate_up_proj"):
            out[name[:-len("gate_up_proj")] + "gate_proj"], out[name[:-len("gate_up_proj")] + "up_proj"] = t.chunk(2, 1)
        else:
            out[name] = t
    for name, t in list(out.items()):
        if cfg.attention == "gqa" and name.endswith(("attn.wq.weight", "attn.wk.weight")):  # [heads * D, in]
            D = cfg.gqa_head_dim
            out[name] = half_to_interleaved(t.view(-1, D, t.size(-1)), D).view(t.shape)  # every row rotates
        elif cfg.attention == "mla" and name.endswith(("attn.wq.weight", "attn.wq_b.weight", "attn.wkv_a.weight")):
            out[name] = mla_rope_interleaved(name, t, cfg)
        elif name.endswith("attn.wkv_b.weight"):                           # [H * (nope + v), C]
            k_b, v_b = out.pop(name).view(cfg.n_head, -1, cfg.kv_lora_rank).split(
                [cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
            out[name[:-len("wkv_b.weight")] + "wk_b"] = k_b.transpose(1, 2)  # [H, C, nope]: W_UK^T per head
            out[name[:-len("wkv_b.weight")] + "wv_b"] = v_b                  # [H, v, C]
    return {k: v.contiguous() for k, v in out.items()}


def encode(name, t, outtype):
    """(numpy data, GGML type) of GGUF tensor `name` in the output type. As llama.cpp's converter does, vectors,
    the router and biases stay float32, and a matrix whose rows Q8_0 cannot cut into blocks of 32 is float16."""
    T = gguf.GGMLQuantizationType
    a = t.numpy()
    if outtype == "f32" or a.ndim == 1 or name.endswith("ffn_gate_inp.weight") or not name.endswith(".weight"):
        return a, T.F32
    if outtype == "q8_0" and a.shape[-1] % 32 == 0:
        return gguf.quants.quantize(a, T.Q8_0), T.Q8_0
    if outtype == "bf16":
        return gguf.quants.quantize(a, T.BF16), T.BF16
    return a.astype(np.float16), T.F16


# ---- the tokenizer ----

def gguf_tokenizer(tok, eot, vocab_size):
    """llama.cpp's tokenizer metadata for a `tokenizers` tokenizer, or a UserError saying why it cannot be.
    llama.cpp sizes the embedding by the token list, so a model with more rows than the tokenizer has tokens
    (train.py allows it) gets placeholder tokens of type UNUSED for the rest."""
    spec = json.loads(tok.to_str())
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    smollm = (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
              and steps[1].get("type") == "ByteLevel" and steps[1].get("use_regex", True)
              and not steps[1].get("add_prefix_space", False) and spec.get("normalizer") is None)
    if model.get("type") != "BPE" or not smollm:
        raise UserError(f"cannot export this tokenizer to GGUF: llama.cpp reads byte-level BPEs with cosmo2's "
                        f"pre-tokenizer (cosmo2 and prepare.py's bpe:N), not a {model.get('type')} model with "
                        f"{[s.get('type') for s in steps]}")
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise UserError(f"the tokenizer has {size} tokens, more than the model's vocab_size {vocab_size}")
    tokens = [f"<|unused_{i}|>" for i in range(vocab_size)]
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        tokens[i] = token
    added = {a["id"]: a["special"] for a in spec.get("added_tokens", [])}
    # 1 normal, 3 control (special added tokens), 4 user-defined (other added tokens), 5 unused (padding)
    types = [5 if i >= size else 1 if i not in added else 3 if added[i] else 4 for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"model": "gpt2", "pre": "smollm", "tokens": tokens, "token_type": types, "merges": merges, "eot": eot}


def write_gguf(model, tok, eot, path, outtype):
    """Write model + tokenizer as one GGUF file at `path`: refusals first, then a temporary name, renamed at the end."""
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype={outtype}: use one of {', '.join(OUTTYPES)}")
    cfg = model.config
    arch, keys = gguf_metadata(cfg)
    vocab = gguf_tokenizer(tok, eot, cfg.vocab_size)
    writer = gguf.GGUFWriter(None, arch)  # the file is named when written: atomic_write's temporary one
    writer.add_name(f"nano-deepseek {arch}")
    for key, value in keys.items():
        add = writer.add_bool if isinstance(value, bool) else writer.add_float32 if isinstance(value, float) \
            else writer.add_uint32
        add(f"{arch}.{key}", value)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["token_type"])
    writer.add_token_merges(vocab["merges"])
    for add in (writer.add_bos_token_id, writer.add_eos_token_id, writer.add_unk_token_id, writer.add_pad_token_id):
        add(eot)  # documents are separated, and so begin, with end-of-text
    writer.add_add_bos_token(False)  # training never put one in front: the prompt is fed as it is
    for name, t in split_for_gguf(without_mtp(model.state_dict()), cfg).items():
        data, qtype = encode(gguf_name(name), t, outtype)
        writer.add_tensor(gguf_name(name), data, raw_dtype=qtype)  # Q8_0's shape is read off its bytes
    with atomic_write(path, "wb") as f:  # a full disk or Ctrl-C: no half-written file left behind
        try:
            writer.write_header_to_file(Path(f.name))  # the writer opens the temporary file by name
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
