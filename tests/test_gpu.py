"""The CUDA paths that a CPU cannot rehearse: grouped GEMMs on the GPU and the absence of host syncs in a
training step. Skipped without a CUDA GPU (CI has none); run them where one is: pytest tests/test_gpu.py."""

import pytest
import torch
import torch.nn.functional as F

import model
import train
from conftest import MOE as MOE_ARGS, TINY, metrics
from model import ModelConfig, MoE, Transformer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
grouped = pytest.mark.skipif(not torch.cuda.is_available() or not model.grouped_mm_runs(torch.device("cuda"), torch.bfloat16),
                             reason="needs a CUDA GPU with grouped GEMMs (torch >= 2.10, compute capability 9.x/10.x)")

MOE = dict(vocab_size=256, block_size=64, n_layer=3, n_embd=64, n_head=4, attention="mla", kv_lora_rank=32,
           qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=128, n_routed_experts=16,
           n_activated_experts=2, n_shared_experts=1, moe_intermediate_size=32, first_k_dense=1)


def swiglu(x, gate_up, down):
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.T


@grouped
@pytest.mark.timeout(120)  # an empty expert once hung the grouped GEMM's backward (pytorch#152668)
def test_grouped_gemm_matches_float64_reference_with_empty_and_ragged_experts():
    torch.manual_seed(0)
    experts = model.Experts(ModelConfig(**{**MOE, "n_routed_experts": 6})).cuda()
    counts = torch.tensor([5, 0, 13, 1, 0, 29], device="cuda")   # empty experts, sizes not multiples of 8
    x = torch.randn(int(counts.sum()), MOE["n_embd"], device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = experts(x, counts)
    g = torch.randn_like(y)
    (y.float() * g).sum().backward()
    # reference: each expert on its slice, in float64 on the same (bf16-rounded) inputs
    xr = x.detach().bfloat16().double().requires_grad_()
    w1 = experts.gate_up_proj.detach().bfloat16().double().requires_grad_()
    w2 = experts.down_proj.detach().bfloat16().double().requires_grad_()
    ref = torch.cat([swiglu(rows, w1[e], w2[e]) for e, rows in enumerate(xr.split(counts.tolist()))])
    (ref * g.double()).sum().backward()
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    assert y.dtype == torch.bfloat16 and rel(y, ref) < 1e-2
    assert rel(x.grad, xr.grad) < 1e-2
    assert rel(experts.gate_up_proj.grad, w1.grad) < 1e-2 and rel(experts.down_proj.grad, w2.grad) < 1e-2
    assert experts.gate_up_proj.grad[[1, 4]].abs().sum() == 0  # the empty experts get no gradient


@cuda
def test_moe_layer_paths_agree_on_the_gpu(monkeypatch):
    torch.manual_seed(1)
    moe = MoE(ModelConfig(**MOE)).cuda()
    moe.router.bias.uniform_(-0.3, 0.3)
    x = torch.randn(2, 64, MOE["n_embd"], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        auto = moe(x).float()
        monkeypatch.setattr(model, "grouped_mm_runs", lambda device, dtype: False)
        looped = moe(x).float()
    assert ((auto - looped).norm() / looped.norm()).item() < 1e-2


@grouped
def test_compiled_bf16_training_step_never_waits_for_the_device():
    """The training step as train.py runs it (forward, backward, clipping, AdamW, the expert counts and the
    balancing bias) raises on any host sync; the one transfer afterwards is the step's only wait."""
    torch.manual_seed(2)
    raw = Transformer(ModelConfig(**MOE)).cuda()
    compiled = torch.compile(raw, fullgraph=True)
    opt = torch.optim.AdamW(raw.parameters(), lr=1e-3, fused=True)
    x = torch.randint(0, 256, (4, 64), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, losses = compiled(x, x)
        losses.total.backward()
        norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        counts = raw.pop_expert_counts()
        raw.update_router_bias(counts)
        return torch.cat([losses.total.detach().view(1), norm.view(1), counts.flatten()])

    first = step().cpu()  # compiles; the first step may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = [step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    losses = [first[0].item()] + [s[0].item() for s in stats]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(s[2:].sum().item() == 4 * 64 * 2 * 2 for s in stats)  # 2 MoE layers, 256 tokens, top-2


@cuda
def test_train_py_with_its_gpu_defaults(data, tmp_path):
    """train.py as a GPU user runs it: device, dtype and compile left to their defaults (cuda, bfloat16 or
    float16, torch.compile); the loss falls, and a resumed run continues from the checkpoint."""
    args = [a for a in TINY if not a.startswith(("--device", "--compile"))] + MOE_ARGS + [f"--dataset={data}"]
    out = tmp_path / "out"
    train.main([*args, f"--out_dir={out}", "--max_iters=30", "--eval_interval=15", "--lr_decay_iters=40"])
    train.main([*args, f"--out_dir={out}", "--max_iters=40", "--eval_interval=15", "--lr_decay_iters=40",
                "--init_from=resume"])
    records = metrics(out)
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert [r["iter"] for r in records if "val_loss" in r] == [0, 15, 30, 40]
    assert val[-1] < val[0] - 1.0
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 40
