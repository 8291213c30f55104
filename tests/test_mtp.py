"""Multi-token prediction (DeepSeek-V3 section 2.2) against independent computations: the MTP modules' loss written
out position by position, their causality, mtp_depth=0 building the model it built before, and train.py with an
MTP module (the main head's losses logged as the loss, exact resume, balancing, FLOPs). Speculative decoding with
the MTP modules: test_generate.py."""

import hashlib
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import model as model_py
import train
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from configurator import UserError
from data import open_dataset
from model import rope_tables
from test_model import VARIANTS, randomize_router_bias, tiny, touched_by_a_backward
from test_train import MOE, metrics, run_inprocess, write_dataset

ARCHS = {"gqa": VARIANTS["gqa"], "mla_moe": VARIANTS["mla_qlora_moe"]}


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


# ---- the model ----

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
            return model.mtp_logits(*model.trunk(tokens))

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
    logits, losses = model(idx, idx)
    counts = model.pop_expert_counts()
    assert counts.shape == (2, 6) and counts.sum(1).tolist() == [2 * 16 * 2, 2 * 15 * 2]
    model.update_router_bias(counts)
    assert torch.equal(mtp_moe.router.bias, 1e-3 * torch.sign(counts[1].mean() - counts[1]))
    aux = model.moe_layers()[0].aux_loss + mtp_moe.aux_loss
    expected = F.cross_entropy(logits.flatten(0, 1), idx.flatten()) + 0.3 * losses.mtp.mean() + aux
    assert mtp_moe.aux_loss > 0 and torch.allclose(losses.total, expected) and torch.allclose(losses.aux, aux)


def test_flops_per_token_counts_the_mtp_modules(monkeypatch):
    """Against FlopCounterMode on a training forward: the MTP blocks, W_k and the shared head once more each."""
    monkeypatch.setattr(model_py, "grouped_mm_runs", lambda device, dtype: False)  # the counter sees the loop's matmuls
    T = 128  # long enough that the MTP modules' T - k positions round to T within 1%
    net = tiny(**ARCHS["mla_moe"], tie_embeddings=False, block_size=T, mtp_depth=2)
    idx = torch.randint(0, 97, (1, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        net(idx, idx)
    assert net.flops_per_token(T) == pytest.approx(3 * counter.get_total_flops() / T, rel=0.02)
    assert net.flops_per_token(T) > tiny(**ARCHS["mla_moe"], tie_embeddings=False, block_size=T).flops_per_token(T) * 1.5


def test_active_parameters_include_the_mtp_module():
    """As in test_model.py: what a backward through tokens routed to experts 1 and 4 reaches is what
    num_params(active=True) counts, the MTP module's block (3 tokens: 2 MTP positions to attend over) included."""
    net = tiny(**ARCHS["mla_moe"], aux_loss_alpha=0.1, mtp_depth=1).train()
    assert touched_by_a_backward(net, 3) == net.num_params(active=True) < net.num_params()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.mtp.parameters())


# ---- train.py ----

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data") / "tiny"))


def test_training_with_an_mtp_module(data, tmp_path):
    """A tiny MLA + MoE model with one MTP module: the logged loss is the main head's and mtp_losses the module's
    (recomputed from the checkpoint on the step's batch), the val loss is the main head's (recomputed on the
    validation windows), 4 steps + a checkpoint + 4 more equal 8 steps bit for bit (the MTP block, its router bias
    and its expert loads included), and a resumed run may lower the MTP loss weight, as DeepSeek-V3 did."""
    args = [*MOE, "--mtp_depth=1", "--eval_interval=4", "--lr_decay_iters=8", "--sample_tokens=0"]
    whole = run_inprocess(data, tmp_path / "whole", *args, "--max_iters=8")
    part = run_inprocess(data, tmp_path / "part", *args, "--max_iters=4")
    at_4 = load_checkpoint(os.path.join(part, "ckpt.pt"))
    run_inprocess(data, part, *args, "--max_iters=8", "--init_from=resume")
    a, b = load_checkpoint(os.path.join(whole, "ckpt.pt")), load_checkpoint(os.path.join(part, "ckpt.pt"))
    assert a["model"].keys() == b["model"].keys() and a["model"]["mtp.0.block.ffn.router.bias"].abs().sum() > 0
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    untimed = lambda out: [{k: v for k, v in r.items() if k not in ("tokens_per_sec", "mfu")} for r in metrics(out)]
    assert untimed(part) == untimed(whole)

    records = metrics(whole)
    steps, evals = [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]
    assert all(len(r["mtp_losses"]) == 1 and len(r["max_vio_layers"]) == 2 for r in steps)
    assert [len(r["val_mtp_losses"]) for r in evals] == [1, 1, 1]
    # step 5's batch, drawn from the checkpoint at 4's data generator, through the checkpoint at 4's model
    split = open_dataset(data, 16).train
    generator = torch.Generator()
    generator.set_state(at_4["data_rng"])
    x, y = split.batch(torch.randint(split.windows, (1, 4), generator=generator)[0], torch.device("cpu"))
    net = model_from_checkpoint(at_4).train()
    with torch.no_grad():
        logits, losses = net(x, y)
    step_5 = next(r for r in steps if r["iter"] == 5)
    assert step_5["loss"] == pytest.approx(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item(), abs=1e-5)
    assert step_5["mtp_losses"][0] == pytest.approx(losses.mtp[0].item(), abs=1e-5)
    assert losses.total.item() == pytest.approx(step_5["loss"] + 0.3 * step_5["mtp_losses"][0], abs=1e-5)
    # the val losses at 8, from the final checkpoint on its validation windows
    net = model_from_checkpoint(a)
    val = torch.tensor(np.fromfile(os.path.join(data, "val_00000.bin"), dtype=np.uint16).astype(np.int64))
    main, mtp = [], []
    for windows in a["val_windows"]:
        xy = torch.stack([val[w:w + 17] for w in windows.tolist()])
        with torch.no_grad():
            h, emb = net.trunk(xy[:, :-1])
            main.append(F.cross_entropy(net.lm_head(h).flatten(0, 1), xy[:, 1:].flatten()).item())
            mtp.append(F.cross_entropy(net.mtp_logits(h, emb)[0].flatten(0, 1), xy[:, 2:].flatten()).item())
    assert evals[-1]["val_loss"] == pytest.approx(sum(main) / len(main), abs=1e-5)
    assert evals[-1]["val_mtp_losses"][0] == pytest.approx(sum(mtp) / len(mtp), abs=1e-5)
    assert not math.isclose(evals[-1]["val_loss"], evals[-1]["val_mtp_losses"][0], abs_tol=1e-3)

    run_inprocess(data, part, *args, "--max_iters=9", "--init_from=resume", "--mtp_loss_weight=0.1")
    assert load_checkpoint(os.path.join(part, "ckpt.pt"))["model_config"]["mtp_loss_weight"] == 0.1


def test_resuming_a_checkpoint_from_before_mtp_with_an_mtp_module_is_refused(data, tmp_path):
    """A checkpoint that predates the MTP fields holds a model without MTP modules: --mtp_depth=1 is a different
    model, not a setting to drop silently."""
    out = run_inprocess(data, tmp_path / "old", "--max_iters=1", "--eval_interval=1", "--sample_tokens=0")
    path = os.path.join(out, "ckpt.pt")
    ckpt = load_checkpoint(path)
    del ckpt["model_config"]["mtp_depth"], ckpt["model_config"]["mtp_loss_weight"]
    save_checkpoint(ckpt, path)
    with pytest.raises(UserError, match=r"different model: mtp_depth=0 \(the settings say 1\)"):
        run_inprocess(data, out, "--max_iters=2", "--init_from=resume", "--mtp_depth=1")
    run_inprocess(data, out, "--max_iters=2", "--init_from=resume", "--sample_tokens=0")
    assert load_checkpoint(path)["iter_num"] == 2
