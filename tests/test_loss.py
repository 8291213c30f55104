"""model.py's loss, the output head and the cross-entropy computed together chunk by chunk (linear_cross_entropy),
against the plain computation: the full logits through F.cross_entropy, and autograd's gradients of that. In
float32, under bfloat16 and float16 autocast and compiled; and it never makes a tensor the size of the logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import model
from conftest import ARCHS, tiny
from model import linear_cross_entropy

VOCAB = 300


@pytest.fixture
def small_chunks(monkeypatch):
    """7 positions per chunk: a batch of 2 x 20 positions spans 6 chunks, the last one ragged."""
    monkeypatch.setattr(model, "LOSS_CHUNK", 7 * VOCAB)


def batch(seed=0, T=20):
    """Tokens and targets [2, T], some targets -1 (ignored), from a generator of their own."""
    generator = torch.Generator().manual_seed(seed)
    idx, targets = torch.randint(0, VOCAB, (2, 2, T), generator=generator)
    targets[0, :4] = -1
    targets[1, 13] = -1
    return idx, targets


def reference_losses(net, idx, targets):
    """(main, [MTP module k's], total) from the full logits through F.cross_entropy: what model.py computed before."""
    ce = lambda h, t: F.cross_entropy(net.lm_head(h).float().flatten(0, 1), t.flatten(), ignore_index=-1)
    h, emb = net.trunk(idx)
    main = ce(h, targets)
    mtp = [ce(h_k, targets[:, k:]) for k, h_k in enumerate(net.mtp_states(h, emb), 1)]
    return main, mtp, main + net.config.mtp_loss_weight * sum(mtp) / max(len(mtp), 1)


def max_relative_difference(grads, expected):
    return max(((g - e).abs().max() / e.abs().max()).item() for g, e in zip(grads, expected))


@pytest.mark.parametrize("tied", [True, False])
def test_loss_and_gradients_equal_the_full_logits_cross_entropy(tied, small_chunks):
    net = tiny(**ARCHS["mla_moe"], vocab_size=VOCAB, tie_embeddings=tied, mtp_depth=1)
    idx, targets = batch()
    params = list(net.parameters())
    _, losses = net(idx, targets)
    grads = torch.autograd.grad(losses.total, params)
    main, mtp, total = reference_losses(net, idx, targets)
    expected = torch.autograd.grad(total, params)
    assert losses.main.item() == pytest.approx(main.item(), rel=1e-5)
    assert losses.mtp[0].item() == pytest.approx(mtp[0].item(), rel=1e-5)
    assert losses.total.item() == pytest.approx(total.item(), rel=1e-5)
    assert max_relative_difference(grads, expected) < 1e-5
    with torch.no_grad():  # evaluation's per-position nats (bits per byte): 0 where the target is ignored
        logits, _ = net(idx)
    nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
    assert torch.allclose(losses.nats, nats.view_as(targets), rtol=1e-5, atol=1e-6)
    assert (losses.nats[targets == -1] == 0).all() and (losses.nats[targets != -1] > 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_it_equals_the_plain_half_precision_head(dtype, small_chunks):
    """The head's matmuls in half precision as autocast runs them, the softmax in float32: the loss and the
    gradients are the plain path's under the same autocast, within half-precision rounding (float16's GradScaler
    scales the loss: the gradients scale with it)."""
    net = tiny(**ARCHS["gqa"], vocab_size=VOCAB, tie_embeddings=False)
    idx, targets = batch(1)
    params = list(net.parameters())
    with torch.autocast("cpu", dtype=dtype):
        _, losses = net(idx, targets)
        main, _, _ = reference_losses(net, idx, targets)
    grads = torch.autograd.grad(1024 * losses.total, params)
    expected = torch.autograd.grad(1024 * main, params)
    assert losses.main.dtype == torch.float32 and losses.main.item() == pytest.approx(main.item(), rel=1e-3)
    assert all(g.dtype == torch.float32 and g.isfinite().all() for g in grads)
    assert max_relative_difference(grads, expected) < 3e-2


def test_compiled_equals_eager(small_chunks):
    """torch.compile captures the chunk loop (unrolled) and the autograd function in one graph, forward and backward
    (AOT autograd here; train.py's compiled runs in test_train.py add inductor): the same loss, nats and gradients."""
    generator = torch.Generator().manual_seed(2)
    h = torch.randn(2, 20, 16, generator=generator, requires_grad=True)
    weight = (0.3 * torch.randn(VOCAB, 16, generator=generator)).requires_grad_()
    _, targets = batch(2)
    loss, nats = linear_cross_entropy(h, weight, targets)
    grads = torch.autograd.grad(loss, [h, weight])
    torch._dynamo.reset()
    compiled_loss, compiled_nats = torch.compile(linear_cross_entropy, backend="aot_eager", fullgraph=True)(h, weight, targets)
    compiled_grads = torch.autograd.grad(compiled_loss, [h, weight])
    torch._dynamo.reset()
    assert torch.allclose(compiled_loss, loss, rtol=1e-5) and torch.allclose(compiled_nats, nats, rtol=1e-5, atol=1e-6)
    assert max_relative_difference(compiled_grads, grads) < 1e-5


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an operation makes while the mode is on."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_no_tensor_is_the_size_of_the_logits(small_chunks):
    """A training step's forward and backward make no tensor as large as the logits [2 x 60, vocab] (a chunk's are
    [7, vocab]); the plain computation makes them, the largest tensor of its step."""
    net = tiny(**ARCHS["gqa"], vocab_size=VOCAB, tie_embeddings=False).train()
    idx, targets = batch(3, T=60)
    with LargestTensor() as ours:
        net(idx, targets)[1].total.backward()
    with LargestTensor() as plain:
        reference_losses(net, idx, targets)[0].backward()
    assert ours.numel < plain.numel == 120 * VOCAB
