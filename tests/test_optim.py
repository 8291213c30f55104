"""optim.py: Muon against torch.optim.Muon, the batched expert path against the 2-D one, the AdamW groups against
torch.optim.AdamW, which parameters each rule gets, and a Muon run with an MTP module that leaves the balancing bias
to loss-free balancing alone. train.py's paths under Muon (gradient accumulation, float16 GradScaler, torch.compile,
DDP, resume after kill -9) are the parametrized tests of test_train.py."""

import os

import pytest
import torch

from conftest import MOE, VARIANTS, metrics, run_inprocess, tiny
from optim import MuonAdamW, build_optimizer, lr_scale, muon_groups, param_groups


def train_steps(params, optimizer, steps=4, seed=0):
    """A few steps of a fixed random quadratic-ish loss on params; the parameters' copies after each step."""
    gen = torch.Generator().manual_seed(seed)
    targets = [torch.randn(p.shape, generator=gen) for p in params]
    history = []
    for _ in range(steps):
        loss = sum(((p - t) ** 3).abs().sum() for p, t in zip(params, targets))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append([p.detach().clone() for p in params])
    return history


def fresh(shapes, seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(0.1 * torch.randn(s)) for s in shapes]


MATRICES = [(48, 32), (32, 48), (40, 40)]  # tall, wide, square


@pytest.mark.parametrize("scale_rule", ["original", "match_rms_adamw"])
def test_muon_equals_torch_muon_on_matrices(scale_rule):
    """Nesterov momentum, NS5 in bfloat16, the scale rule and decoupled weight decay, over 4 steps: the same
    weights as torch.optim.Muon's within bfloat16's rounding, while each step moves them by far more."""
    lr, wd = 0.02, 0.1
    ours, theirs = fresh(MATRICES), fresh(MATRICES)
    start = [p.detach().clone() for p in ours]
    a = train_steps(ours, MuonAdamW([{"params": ours, "use_muon": True, "weight_decay": wd}],
                                    dict(lr=lr, betas=(0.9, 0.95), momentum=0.95, scale_rule=scale_rule)))
    b = train_steps(theirs, torch.optim.Muon(theirs, lr=lr, weight_decay=wd, momentum=0.95, adjust_lr_fn=scale_rule))
    for step_a, step_b in zip(a, b):
        for p, q, shape in zip(step_a, step_b, MATRICES):
            torch.testing.assert_close(p, q, rtol=0, atol=2e-3 * lr * lr_scale(scale_rule, *shape))
    for p, p0, shape in zip(a[0], start, MATRICES):  # one step moves every weight by about lr x scale x |U V^T|
        assert (p - p0).abs().mean() > 0.05 * lr * lr_scale(scale_rule, *shape)


def test_float32_newton_schulz_stays_within_bfloat16_rounding_of_torch_muon():
    """The NS5 of a float32 run (optim.build_optimizer) is torch's iteration without its bfloat16 rounding."""
    ours, theirs = fresh(MATRICES), fresh(MATRICES)
    a = train_steps(ours, MuonAdamW([{"params": ours, "use_muon": True}], dict(lr=0.02, betas=(0.9, 0.95), momentum=0.95,
                                    scale_rule="original"), ns_dtype=torch.float32))
    b = train_steps(theirs, torch.optim.Muon(theirs, lr=0.02, weight_decay=0.0, momentum=0.95))
    for p, q in zip(a[-1], b[-1]):
        torch.testing.assert_close(p, q, rtol=0, atol=0.05 * 0.02)  # a few % of a step, over 4 steps
        assert not torch.equal(p, q)


def test_experts_and_fused_parts_equal_torch_muon_per_matrix():
    """A stacked [E, 2I, D] gate_up split into its gate and up halves and a [E, D, I] down projection, batched, against
    torch.optim.Muon on each expert's gate, up and down as separate 2-D matrices."""
    E, I, D = 3, 16, 24
    stacked = fresh([(E, 2 * I, D), (E, D, I)])
    opt = MuonAdamW([{"params": stacked[:1], "use_muon": True, "parts": [I, I], "weight_decay": 0.1},
                     {"params": stacked[1:], "use_muon": True, "weight_decay": 0.1}], dict(lr=0.02, betas=(0.9, 0.95),
                    momentum=0.95, scale_rule="original"))
    matrices = lambda gate_up, down: [m for e in gate_up for m in e.split(I)] + list(down)  # gate, up of e; downs
    apart = [torch.nn.Parameter(m.detach().clone()) for m in matrices(*stacked)]
    targets = [torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for p in stacked]
    split_targets = matrices(*targets)
    reference = torch.optim.Muon(apart, lr=0.02, weight_decay=0.1, momentum=0.95)
    for _ in range(3):
        for params, goal, optimizer in ((stacked, targets, opt), (apart, split_targets, reference)):
            sum(((p - t) ** 3).abs().sum() for p, t in zip(params, goal)).backward()
            optimizer.step()
            optimizer.zero_grad()
    for p, q in zip(matrices(*stacked), apart):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-3 * 0.02 * lr_scale("original", *q.shape))
    # the halves' NS5 differs from the whole matrix's: the split is not a no-op
    whole = MuonAdamW([{"params": fresh([(E, 2 * I, D)]), "use_muon": True}], dict(lr=0.02, betas=(0.9, 0.95),
                      momentum=0.95, scale_rule="original"))
    halves = fresh([(E, 2 * I, D)])
    split = MuonAdamW([{"params": halves, "use_muon": True, "parts": [I, I]}], dict(lr=0.02, betas=(0.9, 0.95),
                      momentum=0.95, scale_rule="original"))
    assert not torch.allclose(train_steps(whole.param_groups[0]["params"], whole, 1)[0][0],
                              train_steps(halves, split, 1)[0][0], atol=1e-4)


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_groups_equal_torch_adamw(fused):
    """MuonAdamW's AdamW groups are torch.optim.AdamW, bit for bit (weight decay on one group, not the other)."""
    shapes = [(8, 6), (6,), (5, 4)]
    ours, theirs = fresh(shapes), fresh(shapes)
    groups = lambda ps: [{"params": ps[::2], "weight_decay": 0.1}, {"params": ps[1:2], "weight_decay": 0.0}]
    a = train_steps(ours, MuonAdamW(groups(ours), dict(lr=1e-2, betas=(0.9, 0.95), momentum=0.95,
                                                       scale_rule="original"),
                                    fused=fused))
    b = train_steps(theirs, torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), fused=fused))
    for p, q in zip(a[-1], b[-1]):
        assert torch.equal(p, q)


def test_which_parameters_each_rule_trains():
    """Muon: attention and MLA projections, dense, shared and routed experts, the MTP projection and block; AdamW: the
    embedding, the untied output head, the norms and the router; every parameter once, the balancing bias never.
    wqkv splits into q, k, v rows and every gate_up into halves."""
    gqa = tiny(**VARIANTS["gqa"], mtp_depth=1)
    moe = tiny(**VARIANTS["mla_qlora_moe"], mtp_depth=1, tie_embeddings=False)
    for model in (gqa, moe):
        names = {id(p): n for n, p in model.named_parameters()}
        muon = [names[id(p)] for g in muon_groups(model, split_fused=True) for p in g["params"]]
        adamw = [n for n in names.values() if n not in muon]
        assert all(n.startswith(("layers.", "mtp.")) for n in muon) and "mtp.0.eh_proj.weight" in muon
        assert not [n for n in muon if "norm" in n or "router" in n]
        assert sorted(muon + adamw) == sorted(names.values())
        assert all(n.endswith(("norm.weight", "router.weight")) or n in ("tok_embeddings.weight", "lm_head.weight")
                   for n in adamw)
        assert not [n for n, _ in model.named_buffers() if n in names.values()]  # router.bias is a buffer
    assert any("experts.gate_up_proj" in n for n in names.values() if n in muon)
    parts = {tuple(g["parts"]) for g in muon_groups(gqa, split_fused=True)}
    assert parts == {(4 * 12, 2 * 12, 2 * 12), (96, 96), ()}  # wqkv of 4 q, 2 k, 2 v heads of 12; SwiGLU 96
    assert {tuple(g["parts"]) for g in muon_groups(moe, split_fused=True)} == {(96, 96), (32, 32), ()}
    assert [g["parts"] for g in muon_groups(gqa, split_fused=False)] == [[]]


def test_build_optimizer_groups_and_the_ns_precision():
    import train
    from device import Job
    model = tiny(**VARIANTS["mla_qlora_moe"])
    cfg = train.TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr_ratio=2.0, weight_decay=0.05)
    job = lambda dtype: Job(torch.device("cpu"), dtype, False, 1, 0, 0, 1, 1)
    opt = build_optimizer(model, cfg, job("float32"))
    assert opt.ns_dtype == torch.float32 and build_optimizer(model, cfg, job("bfloat16")).ns_dtype == torch.bfloat16
    muon = [g for g in opt.param_groups if g["use_muon"]]
    assert {g["lr"] for g in muon} == {2e-3} and {g["weight_decay"] for g in muon} == {0.05}
    assert [g["weight_decay"] for g in opt.param_groups if not g["use_muon"]] == [0.05, 0.0]  # router; norms, embedding
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    adamw = build_optimizer(model, train.TrainConfig(optimizer="adamw"), job("float32"))
    assert type(adamw) is torch.optim.AdamW and len(adamw.param_groups) == len(param_groups(model, 0.1)) == 2


def test_muon_run_with_mtp_leaves_the_balancing_bias_to_balancing(data, tmp_path):
    """An MLA + MoE run with an MTP module under Muon, balancing off: the router biases stay exactly 0 (no optimizer
    touches them), every Muon parameter (experts, MTP projection) has a momentum buffer in the checkpoint, the loss
    falls and the MTP module's loss is logged; with balancing on, the biases move."""
    args = [*MOE, "--mtp_depth=1", "--optimizer=muon", "--max_iters=6", "--eval_interval=6", "--lr_decay_iters=6",
            "--sample_tokens=0"]
    out = run_inprocess(data, tmp_path / "off", *args, "--bias_update_rate=0")
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    biases = {k: v for k, v in ckpt["model"].items() if k.endswith("router.bias")}
    assert len(biases) == 2 and all(torch.equal(b, torch.zeros_like(b)) for b in biases.values())
    groups, state = ckpt["optimizer"]["param_groups"], ckpt["optimizer"]["state"]
    muon = [i for g in groups if g["use_muon"] for i in g["params"]]
    assert muon and all(set(state[i]) == {"momentum_buffer"} for i in muon)
    assert any(state[i]["momentum_buffer"].dim() == 3 for i in muon)  # the routed experts
    steps = [r for r in metrics(out) if "loss" in r]
    assert len(steps[-1]["mtp_losses"]) == 1 and steps[-1]["loss"] < steps[0]["loss"] - 0.1
    on = run_inprocess(data, tmp_path / "on", *args)
    moved = torch.load(os.path.join(on, "ckpt.pt"), weights_only=True)["model"]
    assert all(moved[k].abs().sum() > 0 for k in biases)
