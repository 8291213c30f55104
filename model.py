"""
A DeepSeek-style decoder-only Transformer in one file.

- RMSNorm and RoPE (half-rotation layout, as in Llama: the rotary dims are split into two halves
  that are rotated against each other; DeepSeek's interleaved-pairs layout is a fixed permutation).
- Attention: grouped-query attention (GQA; MHA and MQA are its two ends) or DeepSeek-V2/V3
  multi-head latent attention (MLA), which caches one compressed latent per token. MLA's values, narrower than
  its queries and keys, run unpadded where cuDNN's kernel takes unequal head sizes, and zero-padded elsewhere.
- Feed-forward: SwiGLU, or DeepSeekMoE (shared + fine-grained routed experts) with the
  auxiliary-loss-free balancing of DeepSeek-V3 (a per-expert bias that steers selection only); the
  routed experts are stacked weights run with grouped GEMMs, without host syncs (torchtitan, nanochat).
- Multi-token prediction (DeepSeek-V3): mtp_depth sequential modules predict the tokens after the next one; they
  add a weighted loss in training, and draft tokens for speculative decoding (generate.py).
- The loss: the output head and the cross-entropy computed together over chunks of positions, so that the
  logits of a whole batch (and their gradient) are never held (LinearCrossEntropy).

The architecture and its loss only: decoding, the KV cache and the samplers live in generate.py.

References: nanoGPT's model.py (structure), DeepSeek-V3 inference/model.py and the DeepSeek-V2/V3
papers (MLA, MoE, loss-free balancing), Llama / SmolLM2 (GQA, RoPE, SwiGLU).
"""

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass
class ModelConfig:
    vocab_size: int = 0              # tokens; 0 = the dataset's (train.py reads meta.json), cosmo2's is 49152
    block_size: int = 1024           # longest sequence (RoPE table size)
    n_layer: int = 12                # transformer blocks
    n_embd: int = 768                # model width
    n_head: int = 12                 # query heads
    n_kv_head: int = 4               # GQA key/value heads (n_head = MHA, 1 = MQA)
    head_dim: int = 0                # GQA head size; 0 means n_embd // n_head
    intermediate_size: int = 2048    # dense SwiGLU width
    attention: str = "gqa"           # "gqa" or "mla"
    q_lora_rank: int = 0             # MLA query compression rank; 0 = plain query projection
    kv_lora_rank: int = 512          # MLA compressed key/value latent size (what is cached)
    qk_nope_head_dim: int = 128      # MLA per-head query/key dims without RoPE
    qk_rope_head_dim: int = 64       # MLA per-head query/key dims with RoPE (key part shared by heads)
    v_head_dim: int = 128            # MLA per-head value size
    n_routed_experts: int = 0        # routed experts per MoE layer; 0 = dense model
    n_shared_experts: int = 1        # experts every token goes through
    n_activated_experts: int = 2     # routed experts per token (top-k)
    moe_intermediate_size: int = 512 # SwiGLU width of each expert
    first_k_dense: int = 1           # the first k layers keep a dense SwiGLU
    score_func: str = "sigmoid"      # router scores: "sigmoid" (DeepSeek-V3) or "softmax" (V2)
    route_scale: float = 1.0         # combine weights are normalised to 1, then scaled by this
    bias_update_rate: float = 1e-3   # loss-free balancing step gamma; 0 turns balancing off
    aux_loss_alpha: float = 0.0      # sequence-wise auxiliary balance loss weight (V3 uses 1e-4)
    rope_theta: float = 10000.0      # RoPE base
    norm_eps: float = 1e-5           # RMSNorm epsilon
    tie_embeddings: bool = True      # share the token embedding with the LM head
    dropout: float = 0.0             # residual and attention dropout (0 for pretraining)
    init_std: float = 0.02           # std of the normal initialisation
    mtp_depth: int = 0               # multi-token prediction modules D (DeepSeek-V3 section 2.2); 0 = off
    mtp_loss_weight: float = 0.3     # lambda of the MTP losses (DeepSeek-V3: 0.3 early in training, 0.1 later)

    def __post_init__(self):
        if self.attention not in ("gqa", "mla"):
            raise ValueError(f"attention must be 'gqa' or 'mla', got {self.attention!r}")
        if self.score_func not in ("sigmoid", "softmax"):
            raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {self.score_func!r}")
        if self.attention == "gqa" and self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.n_routed_experts and not 0 < self.n_activated_experts <= self.n_routed_experts:
            raise ValueError("n_activated_experts must be in [1, n_routed_experts]")
        if self.rope_dim % 2:
            raise ValueError("the RoPE dimension must be even")
        if not 0 <= self.mtp_depth < self.block_size:
            raise ValueError(f"mtp_depth must be in [0, block_size), got {self.mtp_depth}")

    @property
    def gqa_head_dim(self):
        return self.head_dim or self.n_embd // self.n_head

    @property
    def rope_dim(self):
        return self.qk_rope_head_dim if self.attention == "mla" else self.gqa_head_dim

    def is_moe_layer(self, i):
        return self.n_routed_experts > 0 and i >= self.first_k_dense


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) * weight, in float32: the mean of squares under- or overflows in half precision
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


def rope_tables(dim, max_len, theta):
    """cos and sin of position * inv_freq, each [max_len, dim]: the angles repeat over the two halves,
    and sin carries the rotation's minus sign on the first half (see apply_rope)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # [max_len, dim // 2]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1).float(), torch.cat([-sin, sin], dim=-1).float()


def apply_rope(x, cos, sin):
    """Rotate x [..., T, dim] by position: dim i pairs with dim i + dim/2, (x1, x2) -> (x1 cos - x2 sin,
    x2 cos + x1 sin). Rolling x by dim/2 swaps its halves, so this is x * cos + roll(x) * sin."""
    xf = x.float()  # rotated in float32 under autocast too, like the norms
    return (xf * cos + xf.roll(x.size(-1) // 2, dims=-1) * sin).type_as(x)


@torch.compiler.assume_constant_result  # a fact about the machine: no graph break, no guard
def unpadded_attention_runs(device, dtype, qk_dim, v_dim):
    """Whether attend runs a value head smaller than the query/key head (MLA: 128 and 192 in DeepSeek-V3) unpadded,
    with cuDNN's fused kernel: on CUDA GPUs where PyTorch's own check, which knows the GPU and the cuDNN version,
    accepts these head sizes in this dtype, forward and backward. Elsewhere (CPUs, whose flash kernel needs one head
    size; float32; older GPUs or cuDNN) attend pads the values to the query's size: (qk_dim - v_dim) / v_dim more
    work on them, but a fused kernel instead of the slow math fallback."""
    return device.type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled() and \
        cudnn_takes_unequal_heads(device, dtype, qk_dim, v_dim)


@functools.cache  # asked once per device, dtype and head sizes (apart: dynamo would trace into a cached function)
def cudnn_takes_unequal_heads(device, dtype, qk_dim, v_dim):
    # a causal training-shaped probe, with gradients: the backward's limits count too
    q = torch.zeros(1, 1, 256, qk_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.zeros(1, 1, 256, v_dim, device=device, dtype=dtype, requires_grad=True)
    return torch.backends.cuda.can_use_cudnn_attention(torch.backends.cuda.SDPAParams(q, q, v, None, 0.0, True, False))


# SDPA's kernels for unpadded values, in the order tried: cuDNN's, then the memory-efficient one (which takes unequal
# head sizes too, should cuDNN refuse a call's shapes), then the math fallback (the only one on a CPU)
UNEQUAL_HEAD_KERNELS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attend(q, k, v, start_pos, *, scale=None, dropout_p=0.0):
    """Causal attention of q, k [B, H or Hkv, T or S, d] over v [B, Hkv, S, dv <= d], S = start_pos + T.

    Query i sits at absolute position start_pos + i and sees keys 0..start_pos + i. K/V heads are
    shared by groups of query heads (GQA) without being repeated in memory.
    """
    T, S, dv = q.size(2), k.size(2), v.size(-1)
    unequal = dv < q.size(-1)
    if unequal and not unpadded_attention_runs(q.device, q.dtype, q.size(-1), dv):
        # zero-padded values give zero outputs past dv: one head size, so that SDPA's fused kernels run
        return attend(q, k, F.pad(v, (0, q.size(-1) - dv)), start_pos, scale=scale, dropout_p=dropout_p)[..., :dv]
    if start_pos == 0:  # training and prefill: the usual lower-triangular mask
        mask, is_causal = None, T > 1
    elif T == 1:  # one new token sees the whole cache
        mask, is_causal = None, False
    else:  # a chunk appended to a cache: the mask is aligned to the bottom right
        mask, is_causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(start_pos), False
    with sdpa_kernel(UNEQUAL_HEAD_KERNELS, set_priority=True) if unequal else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              dropout_p=dropout_p, enable_gqa=k.size(1) != q.size(1))


class GroupedQueryAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.gqa_head_dim
        # W_q, W_k and W_v stacked by rows into one matmul (as nanoGPT's c_attn): the n_head query
        # heads, then the n_kv_head key heads, then the n_kv_head value heads
        self.wqkv = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, *, cache=None, start_pos=0):
        """cache: a generation cache (generate.KVCache) to write the new positions start_pos.. into and read all of."""
        B, T, _ = x.shape
        H, Hkv = self.n_head, self.n_kv_head
        qkv = self.wqkv(x).view(B, T, H + 2 * Hkv, self.head_dim).transpose(1, 2)  # [B, H + 2 Hkv, T, D]
        q, k = apply_rope(qkv[:, :H + Hkv], cos, sin).split([H, Hkv], dim=1)     # [B, H, T, D], [B, Hkv, T, D]
        v = qkv[:, H + Hkv:]                                                       # [B, Hkv, T, D]
        if cache is not None:  # cached un-repeated: n_kv_head heads, not n_head
            k, v = cache.update("k", k, start_pos), cache.update("v", v, start_pos)
        y = attend(q, k, v, start_pos, dropout_p=self.dropout if self.training else 0.0)  # [B, H, T, D]
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class MultiHeadLatentAttention(nn.Module):
    """MLA (DeepSeek-V2 section 2.1): keys and values come from one low-rank latent c_kv per token.

    Per head, q = [q_nope ; q_pe] and k = [k_nope ; k_pe] with [k_nope ; v] = W_kvb c_kv, and k_pe one
    RoPE'd key shared by all heads. Training expands k and v and runs ordinary attention. Generation
    uses the absorbed form: q_nope . k_nope = (W_UK^T q_nope) . c_kv, so the cache holds only
    [c_kv ; k_pe] (kv_lora_rank + qk_rope_head_dim numbers per token) and W_UV is applied after
    attending over the latents.
    """

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if self.q_lora_rank == 0:
            self.wq = nn.Linear(cfg.n_embd, self.n_head * qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(cfg.n_embd, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, self.n_head * qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.n_embd, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, self.n_head * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.wo = nn.Linear(self.n_head * self.v_head_dim, cfg.n_embd, bias=False)
        self.softmax_scale = qk_head_dim ** -0.5
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, *, cache=None, start_pos=0):
        B, T, _ = x.shape
        H, C, R = self.n_head, self.kv_lora_rank, self.qk_rope_head_dim
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, H, -1).transpose(1, 2)                            # [B, H, T, nope + R]
        q_nope, q_pe = q.split([self.qk_nope_head_dim, R], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        c_kv, k_pe = self.wkv_a(x).split([C, R], dim=-1)                   # [B, T, C], [B, T, R]
        c_kv = self.kv_norm(c_kv)
        k_pe = apply_rope(k_pe.unsqueeze(1), cos, sin)                     # [B, 1, T, R]
        if cache is None:
            y = self._expanded(q_nope, q_pe, c_kv, k_pe)
        else:  # the latent cache acts as a single key/value head shared by all query heads (MQA over latents)
            kv = cache.update("kv", torch.cat([c_kv.unsqueeze(1), k_pe], dim=-1), start_pos)  # [B, 1, S, C + R]
            y = self._absorbed(q_nope, q_pe, kv, start_pos)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * self.v_head_dim))

    def _expanded(self, q_nope, q_pe, c_kv, k_pe):
        B, H, T, _ = q_nope.shape
        kv = self.wkv_b(c_kv).view(B, T, H, -1).transpose(1, 2)            # [B, H, T, nope + v]
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(B, H, T, -1)], dim=-1)
        dropout_p = self.dropout if self.training else 0.0
        return attend(q, k, v, 0, scale=self.softmax_scale, dropout_p=dropout_p)  # [B, H, T, v]

    def _absorbed(self, q_nope, q_pe, kv, start_pos):
        """Attention over the cached latent rows kv [B, 1, S, C + R] = [c_kv ; k_pe] of positions 0 .. S - 1."""
        C = self.kv_lora_rank
        w = self.wkv_b.weight.view(self.n_head, -1, C)                     # [H, nope + v, C]
        w_uk, w_uv = w[:, :self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]
        q_lat = torch.matmul(q_nope, w_uk.to(q_nope.dtype))                  # [B, H, T, C]: W_UK folded into q
        # the values are the c_kv columns; attending with whole rows keeps one head size, and drops k_pe after
        o_lat = attend(torch.cat([q_lat, q_pe], dim=-1), kv, kv, start_pos, scale=self.softmax_scale)[..., :C]
        return torch.matmul(o_lat, w_uv.to(o_lat.dtype).transpose(1, 2))  # [B, H, T, v]: W_UV folded into output


def swiglu(x, gate_up, down):
    """SwiGLU: W_down (silu(W_gate x) * W_up x), with W_gate stacked over W_up in gate_up: one matmul."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return swiglu(x, self.gate_up_proj.weight, self.down_proj.weight)


class Router(nn.Module):
    """Top-k expert selection with a balancing bias that affects selection only (DeepSeek-V3 eq. 16).

    Selection uses topk(s + b); combine weights use the unbiased s of the chosen experts,
    normalised to sum 1 and scaled by route_scale. b is a buffer: saved in checkpoints, never
    seen by the optimizer, moved only by `update_bias`.
    """

    def __init__(self, cfg):
        super().__init__()
        self.top_k, self.score_func, self.route_scale = cfg.n_activated_experts, cfg.score_func, cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.n_embd).normal_(0.0, cfg.init_std))
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x):                                                  # x [N, dim]
        with torch.autocast(x.device.type, enabled=False):  # scores in float32 even under bf16 autocast:
            logits = F.linear(x.float(), self.weight.float())              # [N, E]; near-ties decide routing
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        indices = (scores + self.bias).topk(self.top_k, dim=-1).indices    # [N, k]
        weights = scores.gather(1, indices)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * self.route_scale  # eps: all-zero sigmoids
        return weights, indices, scores

    @torch.no_grad()
    def update_bias(self, counts, gamma):
        """b_i += gamma * sign(mean(c) - c_i): underloaded experts become more attractive."""
        counts = counts.to(self.bias)
        self.bias += gamma * torch.sign(counts.mean() - counts)


def grouped_mm_runs(device, dtype):
    """Whether F.grouped_mm (torch >= 2.10) runs the routed experts: on CPUs in any dtype, and in bfloat16 on
    CUDA GPUs of compute capability 9.x and 10.x (Hopper, Blackwell), which have the grouped kernel that reads
    the offsets on the device. Elsewhere (older GPUs, where torch itself would copy the offsets to the host and
    loop; MPS; float32 or float16 on a GPU; an older torch) the experts run in a loop over their slices."""
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and cuda_capability(device)[0] in (9, 10)
    return device.type == "cpu"


@torch.compiler.assume_constant_result  # a fact about the machine: no graph break, no guard
def cuda_capability(device):
    return torch.cuda.get_device_capability(device)


def grouped_mm(a, b, offs):
    """F.grouped_mm(a [M, K], b [E, K, N], offs [E]) -> [M, N]: rows offs[e-1]:offs[e] of a times b[e]."""
    if torch.compiler.is_compiling() and a.dtype != torch.bfloat16:
        return _grouped_mm_eager(a, b, offs)  # inductor's grouped_mm takes bfloat16 only: run it outside the graph
    return F.grouped_mm(a, b, offs=offs)


@torch.compiler.disable
def _grouped_mm_eager(a, b, offs):
    return F.grouped_mm(a, b, offs=offs)


def compute_dtype(x):
    """The dtype x's matmuls run in: autocast's where it is on (what it would cast to), else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class Experts(nn.Module):
    """The routed experts' SwiGLU weights, stacked: expert e computes down[e](silu(gate[e] x) * up[e] x).

    Laid out as nn.Linear weights per expert ([E, out, in], as transformers 5 stores them): gate_up_proj
    [E, 2 * I, D] (W_gate over W_up) and down_proj [E, D, I]. They run on tokens sorted by expert: one grouped
    GEMM per projection over all the experts' slices at once, with offsets computed on the device: in a training
    step the host never waits for the GPU, and torch.compile captures the whole model in one graph.
    """

    def __init__(self, cfg):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.n_embd, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D).normal_(0.0, cfg.init_std))
        self.down_proj = nn.Parameter(torch.empty(E, D, I).normal_(0.0, cfg.init_std))

    def forward(self, x, counts):
        """x [M, D]: rows sorted by expert, counts[e] of them for expert e (a device tensor) -> [M, D]."""
        dtype = compute_dtype(x)
        return self.grouped(x, counts, dtype) if grouped_mm_runs(x.device, dtype) else self.looped(x, counts)

    def grouped(self, x, counts, dtype):
        """One grouped GEMM per projection, in dtype (autocast does not cover grouped_mm: cast as it would)."""
        offs = counts.cumsum(0).to(torch.int32)                            # [E] where each expert's rows end
        x, gate_up, down = x.to(dtype), self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        gate, up = grouped_mm(x, gate_up.transpose(1, 2), offs).chunk(2, dim=-1)  # [M, I] each
        return grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs)        # [M, D]

    def looped(self, x, counts):
        """The fallback: each expert that has rows runs on its slice. Its host sync: the slices' sizes."""
        sizes = counts.tolist()
        # unbind: one backward for all the experts' slices (indexing [e] would write a whole [E, ...] gradient each)
        experts = zip(self.gate_up_proj.unbind(0), self.down_proj.unbind(0))
        return torch.cat([swiglu(rows, *w) for w, rows, n in zip(experts, x.split(sizes), sizes) if n])


class MoE(nn.Module):
    """DeepSeekMoE: shared experts for every token plus top-k of many fine-grained routed experts."""

    def __init__(self, cfg):
        super().__init__()
        self.n_routed_experts, self.top_k = cfg.n_routed_experts, cfg.n_activated_experts
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (MLP(cfg.n_embd, cfg.n_shared_experts * cfg.moe_intermediate_size)
                               if cfg.n_shared_experts else None)
        # tokens per expert summed over the training forwards since the trainer last collected them
        self.register_buffer("expert_counts", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.aux_loss = None

    def forward(self, x):
        B, T, D = x.shape
        x = x.view(-1, D)                                                  # [N, D]
        weights, indices, scores = self.router(x)                          # [N, k] each
        pairs = indices.flatten()                                          # [N*k] expert of each (token, slot)
        counts = pairs.new_zeros(self.n_routed_experts).scatter_add_(0, pairs, torch.ones_like(pairs))  # [E]
        order = pairs.argsort(stable=True)                                 # the pairs grouped by expert
        token = order // self.top_k                                        # [N*k] token of each sorted pair
        ys = self.experts(x.index_select(0, token), counts)                # [N*k, D] expert after expert
        w = weights.flatten().index_select(0, order).unsqueeze(1)          # [N*k, 1] combine weight of each pair
        # sum_i w_i * expert_i(x) per token, added up in float32: exact enough, and GPUs add float32 atomically
        # (a bfloat16 index_add falls back to a slow kernel); its backward is a gather, not a scatter
        y = torch.zeros(x.shape, device=x.device).index_add_(0, token, ys.float() * w).type_as(x)  # [N, D]
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if self.training:
            self.expert_counts += counts
        self.aux_loss = (self.sequence_aux_loss(scores.view(B, T, -1), indices.view(B, T, -1))
                         if self.training and self.aux_loss_alpha > 0 else None)
        return y.view(B, T, D)

    def sequence_aux_loss(self, scores, indices):
        """alpha * sum_i f_i P_i per sequence, averaged (DeepSeek-V3 eq. 17-20)."""
        B, T, E = scores.shape
        chosen = torch.zeros(B, T, E, device=scores.device).scatter_(2, indices, 1.0)
        f = chosen.sum(1) * E / (self.top_k * T)                           # [B, E] load fraction, 1 if uniform
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)                # [B, E] mean normalised score
        return self.aux_loss_alpha * (f * p).sum(-1).mean()


def max_violation(counts):
    """MaxVio = (max_i c_i - mean c) / mean c, over the last dim (per layer for [layers, E])."""
    counts = counts.float()
    mean = counts.mean(-1).clamp_min(1e-9)
    return (counts.max(-1).values - mean) / mean


class Block(nn.Module):
    def __init__(self, cfg, layer_id):
        super().__init__()
        Attention = MultiHeadLatentAttention if cfg.attention == "mla" else GroupedQueryAttention
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.n_embd, cfg.intermediate_size)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()  # Identity: cheaper per call

    def forward(self, x, cos, sin, *, cache=None, start_pos=0):
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, cache=cache, start_pos=start_pos))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class MTPModule(nn.Module):
    """Multi-token prediction module k (DeepSeek-V3 section 2.2, eq. 21-23). At position i it joins the previous
    depth's representation h^{k-1}_i with the embedding of token i + k and runs one block of the model's own kind;
    the model's final norm and output head, shared, turn the result into the prediction of token i + k + 1:

        h'_i = W_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)],    h^k = FinalNorm(Block(h')),    logits = Head(h^k)

    h^k is what the head reads, for the main model (h^0) as for the modules: DeepSeek-V3's inference code (vLLM,
    SGLang) feeds its MTP layer the main model's final-norm output, and Megatron-LM chains normed outputs. The
    paper's eq. 21 writes [RMSNorm(h) ; RMSNorm(Emb)]; DeepSeek-V3's released MTP weights are used the other way
    round, as eh_proj(cat(enorm(emb), hnorm(h))) (their names, kept here), and we follow the weights.
    """

    def __init__(self, cfg, layer_id):
        super().__init__()
        self.enorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.n_embd, cfg.n_embd, bias=False)   # W_k
        self.block = Block(cfg, layer_id)

    def forward(self, h, emb, cos, sin, *, cache=None, start_pos=0):
        """h^{k-1} [B, T, D] at positions start_pos.., emb [B, T, D] the embeddings of the tokens k later -> the
        block's output [B, T, D] (h^k before the final norm)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))  # [B, T, 2D] -> [B, T, D]
        return self.block(x, cos, sin, cache=cache, start_pos=start_pos)


# logits per chunk of positions in the loss: 512 MiB in float32, whatever the batch. Smaller chunks hold less memory
# but add up the float32 weight gradient [vocab, D] more often, a memory-bound pass each: config/smollm2_135m.py's
# micro-batch of 32,768 positions takes 12 passes over its 113 MB at this size, 48 at 2 ** 25
LOSS_CHUNK = 2 ** 27


def head_chunk(h, w, targets, backward):
    """One chunk of LinearCrossEntropy: h [C, D] and the head's weight w [vocab, D] in the matmuls' dtype, targets [C]
    -> (nats [C], and with backward the gradients of their sum, in float32: d/dh [C, D] and d/dw [vocab, D]). The
    chunk's one large buffer, its logits [C, vocab], is freed on return, before the next chunk's is made."""
    logits = (h @ w.t()).float()                                            # [C, vocab], in float32 for the softmax
    keep = (targets != -1).unsqueeze(1)                                     # [C, 1]
    target_logit = logits.gather(1, targets.clamp_min(0).unsqueeze(1))      # [C, 1]
    top = logits.amax(-1, keepdim=True)                                     # [C, 1]
    e = logits.sub_(top).exp_()                                             # exp(logits - top), in place
    total = e.sum(-1, keepdim=True)                                         # [C, 1]
    nats = ((top + total.log() - target_logit) * keep).squeeze(1)           # logsumexp - the target's logit
    if not backward:
        return nats, None, None
    # d nats / d logits = softmax - onehot, 0 at ignored positions: unscaled by the 1 / count of the mean, so that
    # a float16 matmul keeps the small probabilities (LinearCrossEntropy scales in float32)
    g = e.div_(total).scatter_add_(1, targets.clamp_min(0).unsqueeze(1), -keep.float()).mul_(keep).to(w.dtype)
    return nats, (g @ w).float(), (g.t() @ h).float()


class LinearCrossEntropy(torch.autograd.Function):
    """The output head and the cross-entropy together, over chunks of positions, so that the logits [N, vocab] and
    their gradient never exist whole (16 x 1024 x 49152 float32 logits are 3.2 GB, and their gradient as much).

    Each chunk's gradient is computed in the forward, while its logits are at hand (as Liger-Kernel's fused linear
    cross-entropy does): d loss / d logits = softmax(logits) - onehot(target) needs nothing from later layers, since
    the loss is the last operation. The backward then only scales the stored gradients of h [N, D] and of the weight
    [vocab, D], which are the sizes of h and the weight. Recomputing each chunk's logits in the backward instead
    would keep no less memory and cost a third more of the head's FLOPs (four N x D x vocab matmuls, not three).
    The gradients are computed for the loss, a scalar; nats is not differentiable.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, backward):
        """h [N, D], weight [vocab, D], targets [N] (-1: no target); backward: whether to compute the gradients ->
        (the mean cross-entropy over the targets that are not -1, nats [N]: the cross-entropy per position, 0 at -1)."""
        dtype = compute_dtype(h)
        w = weight.to(dtype)                                                # cast once, as autocast would per matmul
        rows = max(1, LOSS_CHUNK // weight.size(0))
        nats, grad_h, grad_w = [], [], torch.zeros(weight.shape, device=h.device) if backward else None
        for hc, t in zip(h.split(rows), targets.split(rows)):
            chunk_nats, chunk_grad_h, chunk_grad_w = head_chunk(hc.to(dtype), w, t, backward)
            nats.append(chunk_nats)
            if backward:
                grad_h.append(chunk_grad_h)
                grad_w += chunk_grad_w                                      # summed in float32
        nats = torch.cat(nats)
        count = (targets != -1).sum()
        if backward:
            ctx.save_for_backward(torch.cat(grad_h) / count, grad_w / count)
            ctx.dtypes = h.dtype, weight.dtype
        ctx.mark_non_differentiable(nats)
        return nats.sum() / count, nats

    @staticmethod
    def backward(ctx, grad_loss, grad_nats):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss).to(ctx.dtypes[0]), (grad_w * grad_loss).to(ctx.dtypes[1]), None, None


def linear_cross_entropy(h, weight, targets):
    """The cross-entropy of the output head weight [vocab, D] over h [B, T, D] against targets [B, T] (-1: no
    target), without the logits [B, T, vocab] ever held whole -> (the mean over the targets that are not -1,
    differentiable; nats [B, T]: each position's cross-entropy, 0 where the target is -1, not differentiable)."""
    backward = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    loss, nats = LinearCrossEntropy.apply(h.flatten(0, 1), weight, targets.flatten(), backward)
    return loss, nats.view_as(targets)


class Losses(NamedTuple):
    """The loss terms of a forward with targets, by name, so that a trainer logs each without arithmetic."""
    total: torch.Tensor                 # what training differentiates: main + mtp_loss_weight * mean(mtp) + aux
    main: torch.Tensor                  # the next token's cross-entropy (what the val loss measures too)
    mtp: torch.Tensor                   # [mtp_depth] each MTP module's cross-entropy (empty without MTP)
    aux: torch.Tensor                   # the MoE layers' sequence-wise auxiliary losses, summed (0 without)
    nats: torch.Tensor                  # [B, T] the main cross-entropy per position (0 at -1), for bits per byte


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.rope_dim, cfg.block_size, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # recomputed, never checkpointed
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init(self)
        # the MTP modules are built after the main model is initialised, so that the main model draws the same
        # initial weights with or without them. They share its embedding and output head, and their blocks are
        # numbered after its layers (MoE in an MoE model, like DeepSeek-V3's layer 61)
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.n_layer + k) for k in range(cfg.mtp_depth))
        self._init(self.mtp)

    def _init(self, module):
        # GPT-2 scheme: N(0, init_std) everywhere; projections that write into the residual stream
        # are scaled by 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth.
        module.apply(self._init_weights)
        for name, p in module.named_parameters():
            if name.endswith(("wo.weight", "down_proj.weight", "experts.down_proj")):
                nn.init.normal_(p, mean=0.0, std=self.config.init_std / math.sqrt(2 * self.config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def forward(self, idx, targets=None):
        """idx [B, T] -> (logits [B, T, vocab], None) without targets. With targets [B, T] (-1: no target) -> (None,
        Losses): the mean cross-entropy, the MTP modules' (DeepSeek-V3 eq. 25: their mean weighted by mtp_loss_weight
        joins the total), and the MoE auxiliary losses of this forward (training only). The losses come from the
        output head chunk by chunk (linear_cross_entropy): the logits of a whole batch are never held."""
        h, emb = self.trunk(idx)
        if targets is None:
            return self.lm_head(h), None
        main, nats = linear_cross_entropy(h, self.lm_head.weight, targets)
        total = main
        mtp = main.new_zeros(0)
        if self.mtp:
            mtp = torch.stack([linear_cross_entropy(h_k, self.lm_head.weight, targets[:, k:])[0]
                               for k, h_k in enumerate(self.mtp_states(h, emb), 1)])
            total = total + self.config.mtp_loss_weight * mtp.mean()  # (lambda / D) sum_k L_k
        aux = main.new_zeros(())
        for moe in self.moe_layers():
            if moe.aux_loss is not None:
                total, aux = total + moe.aux_loss, aux + moe.aux_loss
        return None, Losses(total, main, mtp, aux, nats)

    def trunk(self, idx, caches=None, start_pos=0):
        """idx [B, T] at positions start_pos.. -> h^0 [B, T, D], the last block's output through the final norm
        (what the output head reads, and the first MTP module too), and the token embeddings [B, T, D]."""
        T = idx.size(1)
        if start_pos + T > self.config.block_size:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds block_size {self.config.block_size}")
        cos, sin = self.rope(start_pos, T)
        emb = self.dropout(self.tok_embeddings(idx))
        x = emb
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache=caches[i] if caches else None, start_pos=start_pos)
        return self.norm(x), emb

    def rope(self, start_pos, T):
        return self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]

    def mtp_states(self, h, emb):
        """The MTP modules over a window, from trunk's h = h^0 and emb [B, T, D]: module k's output h^k [B, T - k, D]
        (through the final norm, what the output head reads) at position i comes from h^{k-1}_i and the embedding of
        token i + k, and predicts token i + k + 1 (the target at i + k). A module has no position whose token i + k
        lies past the window (no wrap-around), so each has one position fewer than the one before."""
        T, states = h.size(1), []
        for k, module in enumerate(self.mtp, 1):
            h = self.norm(module(h[:, :T - k], emb[:, k:], *self.rope(0, T - k)))  # h^k [B, T - k, D]
            states.append(h)
        return states

    # ---- MoE balancing: the trainer's side of loss-free balancing ----

    def moe_layers(self):
        """The MoE layers in order, the MTP modules' last: the expert counts and the balancing cover them all."""
        blocks = [*self.layers, *(module.block for module in self.mtp)]
        return [block.ffn for block in blocks if isinstance(block.ffn, MoE)]

    def pop_expert_counts(self):
        """Tokens routed to each expert since the last call, [n_moe_layers, E]; resets the counters."""
        moes = self.moe_layers()
        if not moes:
            return self.rope_cos.new_zeros(0, 0)  # on the model's device
        counts = torch.stack([m.expert_counts.clone() for m in moes])
        for m in moes:
            m.expert_counts.zero_()
        return counts

    def update_router_bias(self, counts):
        """Loss-free balancing, once per optimizer step, with the step's counts [n_moe_layers, E]
        summed over all micro-batches and ranks."""
        gamma = self.config.bias_update_rate
        if gamma > 0:
            for moe, c in zip(self.moe_layers(), counts):
                moe.router.update_bias(c, gamma)

    # ---- sizes and costs ----

    def num_params(self, active=False):
        """All parameters (a tied embedding counted once), or those one token uses in training (top-k of the
        routed experts). Both include the MTP modules (self.mtp.parameters() counts them apart)."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            for moe in self.moe_layers():
                per_expert = sum(p.numel() // moe.n_routed_experts for p in moe.experts.parameters())  # [E, ...] each
                n -= (moe.n_routed_experts - moe.top_k) * per_expert
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6 per active matmul weight, plus attention
        scores and weighted sums, 6 * n_layer * n_head * (qk_dim + v_dim) * seq_len (PaLM appendix B,
        without discounting the causal half). The input embedding is a lookup, not a matmul. The MTP modules
        count as training runs them: each one's block and W_k, and the shared output head once more per module
        (on all but k of a window's positions: seq_len - k, rounded up to seq_len)."""
        cfg = self.config
        n = self.num_params(active=True) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd)
        n += cfg.mtp_depth * cfg.vocab_size * cfg.n_embd
        if cfg.attention == "mla":
            qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        else:
            qk = v = cfg.gqa_head_dim
        return 6 * n + 6 * (cfg.n_layer + cfg.mtp_depth) * cfg.n_head * (qk + v) * seq_len
