"""
The optimizer of a training run: AdamW, or Muon for the hidden matrices with AdamW for the rest.

Muon (Keller Jordan, 2024; "Muon is Scalable for LLM Training", Moonshot 2025) updates a weight matrix W [m, n] by
its Nesterov momentum, orthogonalized: the update's singular values are all pushed to about 1 by five Newton-Schulz
iterations (NS5, in bfloat16), so that every direction of the matrix moves by the same amount instead of a few
dominant ones taking the whole step. It suits the matrices between hidden states: attention and MLA projections,
dense and shared-expert SwiGLU, the MTP projections, and the routed experts [E, m, n], each expert's matrix
orthogonalized on its own (NS5 batched over E). The token embedding (a lookup: one row per token, not a linear map
of a hidden state), the output head (its update must follow the token frequencies, not be whitened across the
vocabulary), the norms (vectors) and the router (its rows are per-expert score directions whose relative sizes
decide routing) keep AdamW, as in modded-nanogpt and nanochat.

Fused matrices are orthogonalized per part (muon_split_fused): wqkv as its q, k and v rows, gate_up_proj as its
gate and up halves, since each part is a linear map of its own that only shares a matmul with the others; the
README's Muon section has the measurement against orthogonalizing the fused matrix whole.

One torch.optim.Optimizer holds both rules, each param group saying which it uses (use_muon): the checkpoint
(state_dict), the GradScaler (unscale_, step), gradient clipping and the LR schedule see one optimizer. Under FSDP
(train.py --fsdp=True) the parameters are row shards (DTensors): AdamW works on the shards as they are, and Muon
gathers each matrix to orthogonalize it whole (every rank alike; experts, sharded by expert, need no gather).
"""

import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim.adamw import adamw

from model import Experts, GroupedQueryAttention, MLP

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: singular values end in ~[0.5, 1.5]
NS_STEPS = 5


def build_optimizer(model, cfg, job):
    """The run's optimizer from its settings (train.TrainConfig) and its Job (device, precision): torch's AdamW
    (cfg.optimizer="adamw"), or MuonAdamW with Muon's groups at muon_lr_ratio x the schedule's learning rate (train.py's
    loop sets the groups' lr). Newton-Schulz runs in bfloat16 in a bfloat16 run (as torch.optim.Muon), else in float32:
    CPUs without native bfloat16 matmuls (AVX2) emulate them many times slower (README, Muon)."""
    fused = job.device.type in ("cuda", "cpu")  # one kernel for all of AdamW's tensors
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate, betas=betas,
                                 fused=fused)
    muon = muon_groups(model, cfg.muon_split_fused)
    for group in muon:
        group.update(lr=cfg.learning_rate * cfg.muon_lr_ratio, weight_decay=cfg.weight_decay)
    taken = {id(p) for group in muon for p in group["params"]}
    rest = [{**group, "params": [p for p in group["params"] if id(p) not in taken]}
            for group in param_groups(model, cfg.weight_decay)]
    defaults = dict(lr=cfg.learning_rate, betas=betas, momentum=cfg.muon_momentum, scale_rule=cfg.muon_scale)
    return MuonAdamW(muon + [g for g in rest if g["params"]], defaults, fused=fused,
                     ns_dtype=torch.bfloat16 if job.dtype == "bfloat16" else torch.float32)


def param_groups(model, weight_decay):
    """AdamW's groups: weight decay on matrices only. Norms and embeddings are not pulled towards zero (rare
    tokens' rows get few gradients but would shrink at every step); the MoE bias is a buffer, never seen here."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    is_matrix = lambda n, p: p.dim() >= 2 and not n.startswith("tok_embeddings")
    return [{"params": [p for n, p in params if is_matrix(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in params if not is_matrix(n, p)], "weight_decay": 0.0}]


def muon_groups(model, split_fused):
    """Muon's groups: the hidden matrices and the routed experts, one group per way of splitting a fused matrix
    into parts along its rows (parts: the rows of each part; [] = the whole matrix). The embedding, the output
    head (tied to the embedding or not), the norms and the router are left to AdamW."""
    parts = {}  # id(parameter) -> its parts' rows
    for module in model.modules():
        if isinstance(module, GroupedQueryAttention):
            q, kv = module.n_head * module.head_dim, module.n_kv_head * module.head_dim
            parts[id(module.wqkv.weight)] = [q, kv, kv]
        elif isinstance(module, (MLP, Experts)):
            gate_up = module.gate_up_proj if isinstance(module, Experts) else module.gate_up_proj.weight
            parts[id(gate_up)] = [gate_up.size(-2) // 2] * 2
    exclude = {id(model.tok_embeddings.weight), id(model.lm_head.weight)}
    exclude |= {id(moe.router.weight) for moe in model.moe_layers()}
    groups = {}
    for p in model.parameters():
        if p.requires_grad and p.dim() >= 2 and id(p) not in exclude:
            key = tuple(parts.get(id(p), [])) if split_fused else ()
            groups.setdefault(key, []).append(p)
    return [{"params": params, "use_muon": True, "parts": list(key)} for key, params in groups.items()]


def held_bytes(params, optimizer):
    """{"parameters", "gradients", "optimizer state": bytes} that this rank holds for params (their shards under
    FSDP): what training costs in memory before the activations."""
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t
    size = lambda tensors: sum(local(t).numel() * t.element_size() for t in tensors)
    params = list(params)
    return {"parameters": size(params), "gradients": size(p.grad for p in params if p.grad is not None),
            "optimizer state": size(v for p in params for v in optimizer.state.get(p, {}).values()
                                    if torch.is_tensor(v))}


def orthogonalize(g, dtype=torch.bfloat16, steps=NS_STEPS, eps=1e-7):
    """NS5: g [..., m, n] -> about U V^T of g = U S V^T, each matrix of the leading dims on its own, in dtype.

    X <- a X + (b A + c A^2) X with A = X X^T, from X = g / |g|_F (spectral norm <= 1), on the wide side (m <= n),
    so that A is the smaller Gram matrix. torch.optim.Muon's iteration, batched."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    shape = x.shape
    x = x.reshape(-1, *shape[-2:])                                         # [batch, m, n]
    for _ in range(steps):
        A = x @ x.mT                                                       # [batch, m, m]
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)                        # b A + c A^2
        x = torch.baddbmm(x, B, x, beta=a)                                 # a X + B X
    x = x.view(shape)
    return x.mT if tall else x


def lr_scale(rule, m, n):
    """The update's scale for an [m, n] matrix (torch.optim.Muon's adjust_lr_fn): "original" (Keller Jordan) gives
    tall matrices sqrt(m / n); "match_rms_adamw" (Moonshot) gives every matrix the update RMS of AdamW's typical
    0.2, 0.2 sqrt(max(m, n)) x the RMS 1 / sqrt(max(m, n)) of an orthogonal matrix, so AdamW's lr and weight decay
    carry over."""
    return math.sqrt(max(1.0, m / n)) if rule == "original" else 0.2 * math.sqrt(max(m, n))


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the groups with use_muon=True (keys lr, weight_decay, momentum, scale_rule, parts), AdamW for the
    others (lr, weight_decay, betas, eps): one optimizer, one state_dict. Muon's state is a momentum buffer per
    parameter, AdamW's its two moments and step count, as torch.optim.AdamW keeps them."""

    def __init__(self, params, defaults, fused=False, ns_dtype=torch.bfloat16):
        """defaults: lr, betas (AdamW's), momentum and scale_rule (Muon's), for the groups that do not set them."""
        super().__init__(params, dict(eps=1e-8, weight_decay=0.0, use_muon=False, parts=[], **defaults))
        self.fused, self.ns_dtype = fused, ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "MuonAdamW takes no closure"
        for group in self.param_groups:
            (self.muon_step if group["use_muon"] else self.adamw_step)(group)

    def muon_step(self, group):
        """W <- (1 - lr wd) W - lr scale(part) NS5(Nesterov momentum), per part of each matrix (torch.optim.Muon)."""
        lr, mu = group["lr"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)                                      # B = mu B + (1 - mu) G
            update = p.grad.lerp(buf, mu)                                  # Nesterov: (1 - mu) G + mu B
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(self.orthogonal_update(update, group), alpha=-lr)

    def orthogonal_update(self, update, group):
        """NS5 of each part of each matrix, times its scale. Under FSDP (a DTensor) NS5 needs whole matrices: a matrix
        sharded by its rows is gathered, orthogonalized on every rank alike, and this rank keeps its rows; experts
        [E, m, n] sharded by E are whole matrices already."""
        whole = isinstance(update, DTensor) and any(s.is_shard() and s.dim >= update.dim() - 2
                                                    for s in update.placements)
        u = update.full_tensor() if whole else update.to_local() if isinstance(update, DTensor) else update
        parts = u.split(group["parts"] or [u.size(-2)], dim=-2)
        o = torch.cat([orthogonalize(x, self.ns_dtype).to(u.dtype) * lr_scale(group["scale_rule"], *x.shape[-2:])
                       for x in parts], dim=-2)
        if isinstance(update, DTensor):  # this rank's shard (no communication: every rank holds o)
            o = distribute_tensor(o, update.device_mesh, update.placements, src_data_rank=None) if whole else \
                DTensor.from_local(o, update.device_mesh, update.placements, shape=update.shape, stride=update.stride())
        return o

    def adamw_step(self, group):
        """torch.optim.AdamW's update, by its own functional form (fused when the optimizer is)."""
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            state = self.state[p]
            if not state:  # as torch.optim.AdamW: the step count a float32 tensor, on the device when fused
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if self.fused else "cpu")
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
              [s["step"] for s in states], fused=self.fused or None, amsgrad=False, beta1=beta1, beta2=beta2,
              lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
