"""model.py against independent computations: naive attention and MoE references, the causal
structure, parameter and FLOP counts, and the multi-token-prediction modules (DeepSeek-V3 section 2.2): their loss
written out position by position, their causality, and mtp_depth=0 building the model it built before. Decoding
with the KV cache and speculative decoding: test_generate.py; train.py with an MTP module: test_train.py."""

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import model
from configurator import from_settings, read_file
from conftest import ARCHS, TINY_CONFIG, VARIANTS, randomize_router_bias, tiny
from generate import KVCache
from model import (ModelConfig, MoE, MultiHeadLatentAttention, GroupedQueryAttention, Transformer,
                   apply_rope, max_violation, rope_tables)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality(variant):
    model = tiny(**VARIANTS[variant])
    randomize_router_bias(model)
    idx = torch.randint(0, 97, (2, 32))
    t = 17
    changed = idx.clone()
    changed[:, t + 1:] = torch.randint(0, 97, (2, 32 - t - 1))
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-5), "a logit saw a later token"
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().amax() > 1e-3, "later logits should depend on the later tokens"


@pytest.mark.parametrize("variant", VARIANTS)
def test_initial_loss_is_uniform(variant):
    model = tiny(**{**VARIANTS[variant], "vocab_size": 2048})
    idx = torch.randint(0, 2048, (4, 64))
    targets = torch.randint(0, 2048, (4, 64))
    with torch.no_grad():
        _, loss = model(idx, targets)
        loss = loss.total
    assert abs(loss.item() - math.log(2048)) < 0.1


def test_loss_ignores_minus_one_targets():
    model = tiny()
    idx = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    targets[:, :5] = -1
    with torch.no_grad():
        _, loss = model(idx, targets)
        loss = loss.total
        logits, _ = model(idx)
    keep = targets != -1
    expected = -logits.log_softmax(-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)[keep].mean()
    assert torch.allclose(loss, expected, atol=1e-5)


def naive_attention(q, k, v, scale):
    """Per-head softmax(q k^T * scale + causal mask) v with explicit loops and no SDPA."""
    B, H, T, _ = q.shape
    out = torch.zeros(B, H, T, v.size(-1))
    for h in range(H):
        kv_h = h // (H // k.size(1))  # query head h reads key/value head kv_h
        scores = q[:, h] @ k[:, kv_h].transpose(-1, -2) * scale
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        out[:, h] = scores.softmax(-1) @ v[:, kv_h]
    return out


def test_gqa_matches_naive_reference():
    cfg = ModelConfig(**TINY_CONFIG)
    torch.manual_seed(1)
    attn = GroupedQueryAttention(cfg)
    x = torch.randn(2, 10, cfg.n_embd)
    cos, sin = rope_tables(cfg.gqa_head_dim, 10, cfg.rope_theta)
    D = cfg.gqa_head_dim
    w_q, w_k, w_v = attn.wqkv.weight.split([cfg.n_head * D, cfg.n_kv_head * D, cfg.n_kv_head * D])
    q = apply_rope((x @ w_q.T).view(2, 10, cfg.n_head, D).transpose(1, 2), cos, sin)
    k = apply_rope((x @ w_k.T).view(2, 10, cfg.n_kv_head, D).transpose(1, 2), cos, sin)
    v = (x @ w_v.T).view(2, 10, cfg.n_kv_head, D).transpose(1, 2)
    expected = attn.wo(naive_attention(q, k, v, D ** -0.5).transpose(1, 2).reshape(2, 10, -1))
    assert torch.allclose(attn(x, cos, sin), expected, atol=1e-5)


def test_rope_rotates_pairs_of_halves():
    """Half-rotation layout: dim i pairs with dim i + d/2 and turns by pos * theta^(-2i/d)."""
    d, theta = 8, 10000.0
    cos, sin = rope_tables(d, 5, theta)
    x = torch.randn(5, d)
    out = apply_rope(x, cos, sin)
    for pos in range(5):
        for i in range(d // 2):
            angle = pos * theta ** (-2 * i / d)
            a, b = x[pos, i], x[pos, i + d // 2]
            assert torch.isclose(out[pos, i], a * math.cos(angle) - b * math.sin(angle), atol=1e-5)
            assert torch.isclose(out[pos, i + d // 2], b * math.cos(angle) + a * math.sin(angle), atol=1e-5)


@pytest.fixture(params=["padded", "unpadded"])
def values(request, monkeypatch):
    """Both ways attend runs values narrower than the queries: zero-padded (CPUs), and as they are, as cuDNN's kernel
    runs them on a GPU (on a CPU the same call, unpadded, goes to SDPA's math kernel)."""
    if request.param == "unpadded":
        monkeypatch.setattr(model, "unpadded_attention_runs", lambda device, dtype, qk_dim, v_dim: True)
    return request.param


@pytest.mark.parametrize("q_lora_rank, v_head_dim", [(0, 12), (16, 12), (0, 8)])  # 8: narrower than q and k
def test_mla_matches_naive_reference_and_absorbed_form(q_lora_rank, v_head_dim, values):
    cfg = ModelConfig(**{**TINY_CONFIG, "attention": "mla", "q_lora_rank": q_lora_rank, "v_head_dim": v_head_dim})
    torch.manual_seed(2)
    attn = MultiHeadLatentAttention(cfg)
    B, T, H = 2, 12, cfg.n_head
    nope, R, V, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    x = torch.randn(B, T, cfg.n_embd)
    cos, sin = rope_tables(R, T, cfg.rope_theta)
    # reference straight from the DeepSeek-V2 equations, every head's keys and values materialised
    q = attn.wq(x) if q_lora_rank == 0 else attn.wq_b(attn.q_norm(attn.wq_a(x)))
    q = q.view(B, T, H, nope + R).transpose(1, 2)
    q = torch.cat([q[..., :nope], apply_rope(q[..., nope:], cos, sin)], -1)
    kv_a = attn.wkv_a(x)
    c_kv, k_pe = attn.kv_norm(kv_a[..., :C]), apply_rope(kv_a[..., C:], cos, sin)
    kv = (c_kv @ attn.wkv_b.weight.T).view(B, T, H, nope + V).transpose(1, 2)
    k = torch.cat([kv[..., :nope], k_pe.unsqueeze(1).expand(B, H, T, R)], -1)
    ref = naive_attention(q, k, kv[..., nope:], (nope + R) ** -0.5)
    expected = attn.wo(ref.transpose(1, 2).reshape(B, T, H * V))
    expanded = attn(x, cos, sin)
    absorbed = attn(x, cos, sin, cache=KVCache(T), start_pos=0)
    assert torch.allclose(expanded, expected, atol=1e-5)
    assert torch.allclose(absorbed, expanded, atol=1e-5)


def test_unpadded_values_train_as_padded_ones(monkeypatch):
    """The whole MLA + MoE model with values narrower than queries and keys (8 against 12): the loss and every
    gradient are the same with the values padded and unpadded (SDPA then sees the values' own size), and torch.compile
    captures the unpadded path (its choice of kernels included) in one graph."""
    net = tiny(**{**ARCHS["mla_moe"], "v_head_dim": 8}).train()
    idx = torch.randint(0, 97, (2, 16))
    sdpa, value_sizes = F.scaled_dot_product_attention, []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: value_sizes.append(v.size(-1)) or
                        sdpa(q, k, v, **kw))
    results = []
    for unpadded in (False, True):
        monkeypatch.setattr(model, "unpadded_attention_runs", lambda device, dtype, qk_dim, v_dim: unpadded)
        loss = net(idx, idx)[1].total
        results.append((loss, torch.autograd.grad(loss, list(net.parameters()))))
    assert value_sizes == [12, 12, 8, 8]                            # two layers padded, then two not
    (padded_loss, padded_grads), (loss, grads) = results
    assert torch.allclose(loss, padded_loss, rtol=1e-6)
    assert all(torch.allclose(g, p, rtol=1e-5, atol=1e-7) for g, p in zip(grads, padded_grads))
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bfloat16: the experts' grouped GEMMs stay in the graph too
        explained = torch._dynamo.explain(net)(idx, idx)
    torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cudnn_unpadded_attention_equals_padded_on_a_gpu():
    """Where cuDNN takes DeepSeek-V3's head sizes (192 for queries and keys, 128 for values) unpadded, attend's
    output and gradients are the padded kernel's, in bfloat16."""
    device = torch.device("cuda")
    if not model.unpadded_attention_runs(device, torch.bfloat16, 192, 128):
        pytest.skip("cuDNN's attention does not take 192 / 128 head sizes here")
    generator = torch.Generator(device).manual_seed(0)
    q, k = (torch.randn(2, 4, 256, 192, device=device, generator=generator, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(2, 4, 256, 128, device=device, generator=generator, dtype=torch.bfloat16)
    outputs = []
    for pad in (False, True):
        qkv = [t.detach().requires_grad_() for t in (q, k, v)]
        v_in = F.pad(qkv[2], (0, 64)) if pad else qkv[2]          # padded by hand: attend then sees one head size
        out = model.attend(qkv[0], qkv[1], v_in, 0)[..., :128]
        out.float().square().sum().backward()
        outputs.append([out, *(t.grad for t in qkv)])
    for unpadded, padded in zip(*outputs):
        assert ((unpadded.float() - padded.float()).norm() / padded.float().norm()).item() < 1e-2


def swiglu(x, gate_up, down):
    """One SwiGLU expert from its raw matrices: down (silu(W_gate x) * W_up x), W_gate over W_up in gate_up."""
    gate, up = (gate_up @ x).chunk(2)
    return down @ (F.silu(gate) * up)


def per_token_moe_reference(moe, x):
    """Loop over tokens: shared experts plus the weighted sum of the chosen routed experts."""
    router, experts = moe.router, moe.experts
    out = []
    for n in range(x.size(0)):
        logits = router.weight @ x[n]
        s = logits.sigmoid() if router.score_func == "sigmoid" else logits.softmax(-1)
        chosen = (s + router.bias).topk(router.top_k).indices
        w = s[chosen] / s[chosen].sum() * router.route_scale
        y = sum(we * swiglu(x[n], experts.gate_up_proj[e], experts.down_proj[e]) for e, we in zip(chosen.tolist(), w))
        out.append(y + (moe.shared_experts(x[n]) if moe.shared_experts is not None else 0))
    return torch.stack(out)


@pytest.fixture(params=["grouped", "looped"])
def experts_path(request, monkeypatch):
    """Run the MoE with grouped GEMMs (the default on CPUs and recent GPUs) or with the fallback loop."""
    if request.param == "looped":
        monkeypatch.setattr(model, "grouped_mm_runs", lambda device, dtype: False)
    return request.param


@pytest.mark.parametrize("score_func,n_shared", [("sigmoid", 1), ("softmax", 0), ("sigmoid", 2)])
def test_moe_matches_per_token_reference(score_func, n_shared, experts_path):
    cfg = ModelConfig(**{**TINY_CONFIG, "n_routed_experts": 7, "n_activated_experts": 3, "n_shared_experts": n_shared,
                         "score_func": score_func, "route_scale": 1.5})
    torch.manual_seed(3)
    moe = MoE(cfg)
    moe.router.weight.data.normal_(0, 0.5)
    moe.router.bias.uniform_(-0.2, 0.2)
    moe.router.bias[4] = -5.0                                      # expert 4 is never chosen: an empty group
    x = torch.randn(3, 11, cfg.n_embd, requires_grad=True)
    g = torch.randn(3, 11, cfg.n_embd)
    expected = per_token_moe_reference(moe, x.view(-1, cfg.n_embd)).view_as(x)
    (expected * g).sum().backward()
    ref_grads = [p.grad.clone() for p in (x, moe.experts.gate_up_proj, moe.experts.down_proj)]
    for p in (x, moe.experts.gate_up_proj, moe.experts.down_proj):
        p.grad = None
    y = moe(x)
    assert torch.allclose(y, expected, atol=1e-5)
    (y * g).sum().backward()  # gradients through the sorted dispatch equal the reference's
    for p, ref in zip((x, moe.experts.gate_up_proj, moe.experts.down_proj), ref_grads):
        assert torch.allclose(p.grad, ref, atol=1e-5)
    assert moe.experts.gate_up_proj.grad[4].abs().sum() == 0 < moe.experts.gate_up_proj.grad[3].abs().sum()
    moe(x).sum().backward()  # an expanded (stride-0) upstream gradient once broke grouped_mm's backward
    with torch.no_grad():  # inference on two tokens leaves most experts empty
        assert torch.allclose(moe(x[:1, :2]), expected[:1, :2], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_under_autocast_matches_float32(dtype, experts_path):
    """Mixed precision as a GPU runs it: the experts compute in half precision, the combine in float32."""
    cfg = ModelConfig(**{**TINY_CONFIG, "n_routed_experts": 8, "n_activated_experts": 2})
    torch.manual_seed(9)
    moe = MoE(cfg).train()
    x = torch.randn(2, 16, cfg.n_embd)
    expected = moe(x)
    with torch.autocast("cpu", dtype=dtype):
        y = moe(x)
        y.sum().backward()
    assert y.dtype == torch.float32  # the residual stream stays float32
    assert ((y - expected).norm() / expected.norm()).item() < 2e-2
    assert moe.experts.gate_up_proj.grad.dtype == torch.float32 and moe.experts.gate_up_proj.grad.abs().sum() > 0


def test_moe_training_forward_is_one_graph_under_bf16():
    """No host sync and no graph break: torch.compile captures the whole MLA + MoE model, the routed
    experts' grouped GEMMs with their device-side offsets included, and an MTP module with its losses."""
    model = tiny(**VARIANTS["mla_qlora_moe"], aux_loss_alpha=1e-3, mtp_depth=1).train()
    idx = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(idx, idx)
    torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_bias_changes_selection_not_weights():
    cfg = ModelConfig(**{**TINY_CONFIG, "n_routed_experts": 6, "n_activated_experts": 2, "route_scale": 2.5})
    torch.manual_seed(4)
    moe = MoE(cfg)
    x = torch.randn(64, cfg.n_embd)
    _, unbiased_choice, _ = moe.router(x)
    moe.router.bias[5] = 10.0                                      # expert 5 now always wins a slot
    weights, indices, scores = moe.router(x)
    assert (indices == 5).any(-1).all() and not (unbiased_choice == 5).any(-1).all()
    s = (x @ moe.router.weight.T).sigmoid()                        # unbiased scores, computed independently
    chosen = s.gather(1, indices)
    assert torch.allclose(weights, chosen / chosen.sum(-1, keepdim=True) * 2.5, atol=1e-6)


def test_loss_free_balancing_fixes_a_skewed_router():
    cfg = ModelConfig(**{**TINY_CONFIG, "n_routed_experts": 8, "n_activated_experts": 2, "bias_update_rate": 0.01})
    torch.manual_seed(5)
    moe = MoE(cfg).train()
    x = torch.randn(512, cfg.n_embd)
    direction = x.mean(0) / x.mean(0).norm()
    with torch.no_grad():
        moe.router.weight[:2] += 3.0 * direction                   # experts 0 and 1 attract most tokens
        moe.router.weight[2:] -= 1.0 * direction

    def step():
        moe.expert_counts.zero_()
        with torch.no_grad():
            moe(x.unsqueeze(0))
        counts = moe.expert_counts.clone()
        moe.router.update_bias(counts, cfg.bias_update_rate)       # no gradient steps at all
        return max_violation(counts).item()

    start = step()
    for _ in range(300):
        end = step()
    assert start > 1.0 and end < 0.25 * start, (start, end)


def test_sequence_aux_loss_matches_formula():
    cfg = ModelConfig(**{**TINY_CONFIG, "n_routed_experts": 5, "n_activated_experts": 2, "aux_loss_alpha": 0.1})
    torch.manual_seed(6)
    moe = MoE(cfg).train()
    x = torch.randn(2, 9, cfg.n_embd)
    moe(x)
    B, T, E, K = 2, 9, 5, 2
    total = 0.0
    for b in range(B):  # DeepSeek-V3 eq. 17-20, one sequence at a time
        _, idx, s = moe.router(x[b])
        f = [E / (K * T) * (idx == i).any(-1).sum().item() for i in range(E)]
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        total += 0.1 * sum(f[i] * p[i].item() for i in range(E))
    assert moe.aux_loss.item() == pytest.approx(total / B, rel=1e-5)


def test_training_forward_counts_tokens_and_bias_update_moves_bias():
    model = tiny(**VARIANTS["mla_qlora_moe"]).train()
    idx = torch.randint(0, 97, (2, 16))
    model(idx, idx)
    model(idx, idx)
    counts = model.pop_expert_counts()
    assert counts.shape == (1, 6) and counts.sum().item() == 2 * 2 * 16 * 2   # 2 passes, 32 tokens, top-2
    assert model.pop_expert_counts().sum().item() == 0
    model.update_router_bias(counts)
    bias = model.moe_layers()[0].router.bias
    assert torch.equal(bias, 1e-3 * torch.sign(counts[0].mean() - counts[0]))
    assert "layers.1.ffn.router.bias" in model.state_dict()
    assert all("router.bias" not in n for n, _ in model.named_parameters())


def test_smollm2_parameter_count():
    with torch.device("meta"):
        model = Transformer(from_settings(ModelConfig, read_file("config/smollm2_135m.py")))
    assert model.num_params() == 134_515_008 == model.num_params(active=True)


def test_float32_compile_runs_only_the_grouped_gemms_outside_the_graph():
    """float32 (and float16) under torch.compile: inductor's grouped GEMM takes bfloat16 only, so the experts'
    GEMMs run eagerly between compiled pieces. Every graph break is one of them, and the compiled forward and
    backward equal eager (dynamo and AOT autograd here; train.py's compiled runs add inductor)."""
    net = tiny(**VARIANTS["mla_qlora_moe"], aux_loss_alpha=1e-3).train()
    idx = torch.randint(0, 97, (2, 16))
    explained = torch._dynamo.explain(net)(idx, idx)
    torch._dynamo.reset()
    assert explained.graph_break_count > 0
    assert all("_grouped_mm_eager" in str(b.reason) for b in explained.break_reasons), explained.break_reasons
    _, loss = net(idx, idx)
    loss = loss.total
    grads = torch.autograd.grad(loss, list(net.parameters()))
    _, compiled_loss = torch.compile(net, backend="aot_eager")(idx, idx)
    compiled_loss = compiled_loss.total
    compiled_grads = torch.autograd.grad(compiled_loss, list(net.parameters()))
    torch._dynamo.reset()
    assert torch.allclose(compiled_loss, loss, rtol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(compiled_grads, grads))


def test_active_parameters_are_the_ones_a_token_s_forward_touches():
    """Backpropagate through two tokens that both go to experts 1 and 4 (the bias sees to it): the parameter
    entries that get a gradient are the active ones. Two tokens, since attention over a single key has a
    constant softmax (no gradient for W_q and W_k); the auxiliary loss reaches every router row."""
    net = tiny(**VARIANTS["mla_qlora_moe"], aux_loss_alpha=0.1).train()
    assert touched_by_a_backward(net, 2) == net.num_params(active=True) < net.num_params()


def touched_by_a_backward(net, n_tokens):
    """The parameter entries that get a gradient from a backward through n_tokens routed to experts 1 and 4."""
    for moe in net.moe_layers():
        moe.router.bias[[1, 4]] = 10.0
    idx = torch.randint(0, 97, (1, n_tokens))
    net(idx, idx)[1].total.backward()
    return sum((p.grad != 0).sum().item() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("variant", ["gqa", "mla_qlora_moe"])
def test_flops_per_token_matches_flop_counter(variant, monkeypatch):
    # the counter has no formula for grouped_mm: count the same expert matmuls through the loop path
    monkeypatch.setattr(model, "grouped_mm_runs", lambda device, dtype: False)
    net = tiny(**{**VARIANTS[variant], "tie_embeddings": False})
    T = 32
    # the math backend spells attention out as matmuls, which the counter sees (fused CPU kernels it may not)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.randint(0, 97, (1, T)))
    # counted forward matmul FLOPs x 3 (backward = 2x forward) against the analytic estimate
    measured = 3 * counter.get_total_flops() / T
    assert net.flops_per_token(T) == pytest.approx(measured, rel=0.02)


def test_tiny_model_overfits_one_batch():
    model = tiny(**VARIANTS["mla_qlora_moe"]).train()
    torch.manual_seed(7)
    batch = torch.randint(0, 97, (4, 33))
    x, y = batch[:, :-1], batch[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        _, loss = model(x, y)
        loss = loss.total
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_router_bias(model.pop_expert_counts())
    assert loss.item() < 0.5


def test_rmsnorm_matches_formula():
    from model import RMSNorm
    norm = RMSNorm(16, eps=1e-3)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-3) * norm.weight
    assert torch.allclose(norm(x), expected, atol=1e-6)


def test_eval_loss_has_no_stale_aux_loss():
    model = tiny(**{**VARIANTS["mla_qlora_moe"], "aux_loss_alpha": 0.5}).train()
    idx = torch.randint(0, 97, (2, 16))
    _, train_loss = model(idx, idx)
    train_loss = train_loss.total
    _, train_ce = model.eval()(idx, idx)
    train_ce = train_ce.total
    logits, _ = model(idx)
    assert torch.allclose(train_ce, F.cross_entropy(logits.flatten(0, 1), idx.flatten()))
    assert train_loss.item() != pytest.approx(train_ce.item())  # the aux loss was there when training


def test_router_scores_stay_float32_under_autocast():
    cfg = ModelConfig(**{**TINY_CONFIG, "n_routed_experts": 6, "n_activated_experts": 2})
    torch.manual_seed(8)
    moe = MoE(cfg)
    x = torch.randn(32, cfg.n_embd)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, scores = moe.router(x)
    assert scores.dtype == torch.float32
    assert torch.allclose(scores, (x @ moe.router.weight.T).sigmoid(), atol=1e-6)


# ---- multi-token prediction ----

def rms(x, weight, eps=1e-5):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def masked_cross_entropy(logits, targets):
    keep = targets != -1
    return -logits.log_softmax(-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)[keep].mean()


def naive_mtp_loss(model, idx, targets):
    """DeepSeek-V3 eq. 21-25 written out: h'_i = W_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)] built position by
    position for i + k inside the window, h^k = the shared final norm of the module's block output, the shared
    head, cross-entropy against t_{i+k+1} = targets[i + k]. Returns (main + lambda / D * sum_k L_k, [L_k])."""
    cfg, T = model.config, idx.size(1)
    h = []
    hook = model.layers[-1].register_forward_hook(lambda module, args, out: h.append(out))
    with torch.no_grad():
        logits, _ = model(idx)                                     # the hook keeps the last main block's output
    hook.remove()
    h_prev, losses = rms(h[0], model.norm.weight), []              # h^0: through the final norm, as the head reads it
    for k, module in enumerate(model.mtp, 1):
        n = T - k
        inputs = [torch.cat([rms(model.tok_embeddings.weight[idx[:, i + k]], module.enorm.weight),
                             rms(h_prev[:, i], module.hnorm.weight)], -1) @ module.eh_proj.weight.T for i in range(n)]
        cos, sin = rope_tables(cfg.rope_dim, n, cfg.rope_theta)
        with torch.no_grad():
            h_prev = rms(module.block(torch.stack(inputs, 1), cos, sin), model.norm.weight)  # h^k, through the shared norm
        y = torch.stack([targets[:, i + k] for i in range(n)], 1)
        losses.append(masked_cross_entropy(model.lm_head(h_prev), y))
    main = masked_cross_entropy(logits, targets)
    return main + cfg.mtp_loss_weight / len(losses) * sum(losses), losses


def state_digest(model):
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.skipif(not torch.__version__.startswith("2.13."), reason="the digest is of torch 2.13's random draws")
def test_mtp_depth_0_builds_the_model_it_built_before_mtp():
    """The digest of a seeded MLA + MoE model's state dict, taken with model.py before the MTP modules existed
    (commit 103e4f8): the same names, shapes and initial draws, so earlier runs reproduce. The MTP modules,
    built after the main model, leave its draws alone: with them, the main model's tensors are the same."""
    plain = tiny(**ARCHS["mla_moe"])
    assert state_digest(plain) == "8c36c46ce2646af57776cc3ec09ca1ebf405b4ab9413f5069e6c2f72ba619e02"
    with_mtp = tiny(**ARCHS["mla_moe"], mtp_depth=2).state_dict()
    main = {k: v for k, v in with_mtp.items() if not k.startswith("mtp.")}
    assert main.keys() == plain.state_dict().keys() and all(torch.equal(v, plain.state_dict()[k]) for k, v in main.items())
    assert {k.split(".")[1] for k in with_mtp.keys() - main.keys()} == {"0", "1"}


@pytest.mark.parametrize("arch", ARCHS)
def test_mtp_loss_matches_a_naive_computation(arch):
    model = tiny(**ARCHS[arch], mtp_depth=2, mtp_loss_weight=0.25)
    randomize_router_bias(model)
    idx = torch.randint(0, 97, (2, 20))
    targets = torch.randint(0, 97, (2, 20))
    targets[:, :3] = -1                                            # ignored, as by the main loss
    targets[0, -1] = -1
    with torch.no_grad():
        _, terms = model(idx, targets)
    expected, losses = naive_mtp_loss(model, idx, targets)
    assert torch.allclose(terms.mtp, torch.stack(losses), atol=1e-5)
    assert torch.allclose(terms.total, expected, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_mtp_modules_are_causal(arch):
    """Module k at position i depends on the tokens up to i + k and no further."""
    model = tiny(**ARCHS[arch], mtp_depth=2)
    randomize_router_bias(model)
    idx = torch.randint(0, 97, (2, 24))
    i = 11

    def mtp_logits(tokens):
        with torch.no_grad():
            return [model.lm_head(h) for h in model.mtp_states(*model.trunk(tokens))]

    before = mtp_logits(idx)
    for k in (1, 2):
        later = idx.clone()
        later[:, i + k + 1:] = (idx[:, i + k + 1:] + torch.randint(1, 97, (2, 24 - i - k - 1))) % 97
        assert torch.allclose(mtp_logits(later)[k - 1][:, :i + 1], before[k - 1][:, :i + 1], atol=1e-5)
        at = idx.clone()
        at[:, i + k] = (idx[:, i + k] + 1) % 97
        after = mtp_logits(at)[k - 1]
        assert torch.allclose(after[:, :i], before[k - 1][:, :i], atol=1e-5)
        assert (after[:, i] - before[k - 1][:, i]).abs().amax() > 1e-3, "module k at i should read token i + k"


def test_the_mtp_block_balances_like_the_other_moe_layers():
    """The MTP block is numbered after the main layers, so it is MoE; its counts come from the training forward
    (top-2 of T - 1 positions), its bias moves with the others, and its aux loss joins the loss."""
    model = tiny(**ARCHS["mla_moe"], mtp_depth=1, aux_loss_alpha=0.1).train()
    mtp_moe = model.mtp[0].block.ffn
    assert model.moe_layers()[-1] is mtp_moe and len(model.moe_layers()) == 2
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        logits, _ = model.eval()(idx)                              # eval: counts nothing; no dropout, same numbers
    _, losses = model.train()(idx, idx)
    counts = model.pop_expert_counts()
    assert counts.shape == (2, 6) and counts.sum(1).tolist() == [2 * 16 * 2, 2 * 15 * 2]
    model.update_router_bias(counts)
    assert torch.equal(mtp_moe.router.bias, 1e-3 * torch.sign(counts[1].mean() - counts[1]))
    aux = model.moe_layers()[0].aux_loss + mtp_moe.aux_loss
    expected = F.cross_entropy(logits.flatten(0, 1), idx.flatten()) + 0.3 * losses.mtp.mean() + aux
    assert mtp_moe.aux_loss > 0 and torch.allclose(losses.total, expected) and torch.allclose(losses.aux, aux)


def test_flops_per_token_counts_the_mtp_modules(monkeypatch):
    """Against FlopCounterMode on a training forward: the MTP blocks, W_k and the shared head once more each."""
    monkeypatch.setattr(model, "grouped_mm_runs", lambda device, dtype: False)  # the counter sees the loop's matmuls
    T = 128  # long enough that the MTP modules' T - k positions round to T within 1%
    net = tiny(**ARCHS["mla_moe"], tie_embeddings=False, block_size=T, mtp_depth=2)
    idx = torch.randint(0, 97, (1, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        net(idx, idx)
    assert net.flops_per_token(T) == pytest.approx(3 * counter.get_total_flops() / T, rel=0.02)
    assert net.flops_per_token(T) > tiny(**ARCHS["mla_moe"], tie_embeddings=False, block_size=T).flops_per_token(T) * 1.5


def test_active_parameters_include_the_mtp_module():
    """As for the main model (test_active_parameters_are_the_ones_a_token_s_forward_touches): what a backward
    through tokens routed to experts 1 and 4 reaches is what num_params(active=True) counts, the MTP module's block
    (3 tokens: 2 MTP positions to attend over) included."""
    net = tiny(**ARCHS["mla_moe"], aux_loss_alpha=0.1, mtp_depth=1).train()
    assert touched_by_a_backward(net, 3) == net.num_params(active=True) < net.num_params()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.mtp.parameters())
