"""
Train a DeepSeek-style model (MLA + DeepSeekMoE, or dense GQA) with a hand-written loop, nanoGPT-style.

    python train.py config/cpu_moe.py                        # the CPU demo
    python train.py config/deepseek_moe.py --batch_size=8    # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/deepseek_moe.py
    python train.py config/cpu_moe.py --init_from=resume     # continue out_dir/ckpt.pt exactly

Settings: the DEFAULTS below, then config files, then --key=value overrides (configurator.py). Every
ModelConfig field is a setting too. `batch_size` is the micro-batch (sequences per forward pass) and
`gradient_accumulation_steps` the number of micro-batches per optimizer step, both counted over the
whole job: under DDP the ranks share the accumulation steps (or, when those do not divide, each
micro-batch), so a step sees the same batch_size * gradient_accumulation_steps sequences, drawn in
the same order, on any number of ranks.

Exact resume: a checkpoint holds everything the following steps depend on (weights incl. the MoE
balancing biases, optimizer and grad scaler state, iteration, the data sampler's generator, the torch
RNG of every rank, the validation windows), so `init_from=resume` after a crash replays the steps
since the last checkpoint bit for bit on CPU.
"""

import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from configurator import UserError, configure, run_main
from device import DTYPES, auto_cpu_dtype, autocast, cpu_matmul_peak, peak_flops, pick_device, pick_dtype
from model import ModelConfig, Transformer, experts_path, max_violation

DEFAULTS = {
    # I/O
    "out_dir": "out",                 # ckpt.pt and metrics.jsonl go here
    "init_from": "scratch",           # "scratch", "resume" (out_dir/ckpt.pt) or "smollm2-135m" (pretrained.py)
    "eval_interval": 250,             # evaluate (and checkpoint) every this many optimizer steps
    "eval_iters": 50,                 # validation batches per evaluation (always the same ones)
    "log_interval": 10,               # one metrics.jsonl line per this many steps
    "always_save_checkpoint": True,   # checkpoint at every evaluation, not only when val loss improves
    "sample_prompts": ["Once upon a time", "The meaning of life is", "Photosynthesis is"],  # continued at every evaluation
    "sample_tokens": 32,              # tokens sampled per prompt (out_dir/samples.jsonl); 0 = no samples
    "wandb_log": False,               # also log to Weights & Biases (imported only then)
    "wandb_project": "deepseek-nanogpt",
    "wandb_run_name": "run",
    # data
    "dataset": "cosmopedia",          # data/<dataset>/ as written by prepare.py (or a path)
    "batch_size": 16,                 # sequences per micro-batch
    "gradient_accumulation_steps": 1, # micro-batches per optimizer step (over all ranks)
    # AdamW with linear warmup, then cosine decay to min_lr at lr_decay_iters
    "learning_rate": 6e-4,
    "min_lr": 6e-5,
    "warmup_iters": 200,
    "lr_decay_iters": 5000,
    "max_iters": 5000,
    "weight_decay": 0.1,              # on matrices only (not norms, embeddings or the MoE balancing bias)
    "beta1": 0.9,
    "beta2": 0.95,
    "grad_clip": 1.0,                 # clip the global gradient norm to this; 0 = no clipping
    # system
    "device": "auto",                 # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1", "mps"
    "dtype": "auto",                  # "auto" (GPUs: bfloat16, float16 on older ones; CPUs: the faster for this model), "float32", "bfloat16", "float16"
    "compile": None,                  # torch.compile; None = on CUDA only
    "seed": 1337,
    # the model: every ModelConfig field (model.py), e.g. --n_layer=4 --n_routed_experts=8
    **dataclasses.asdict(ModelConfig()),
}

# -----------------------------------------------------------------------------
# data: random windows of block_size + 1 tokens from memory-mapped uint16 shards


def open_dataset(dataset):
    """meta.json and the tokenizer.json text (or None) of data/<dataset>/."""
    data_dir = os.path.join("data", dataset)
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isdir(data_dir):
        raise UserError(f"dataset directory {data_dir} does not exist: run `python prepare.py --name={dataset}` first")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        splits = {s: [e["file"] for e in meta["splits"][s]] for s in ("train", "val")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path} is missing or unreadable ({type(e).__name__}): rerun prepare.py")
    if not meta.get("complete", False):
        raise UserError(f"{meta_path} says prepare.py did not finish: rerun prepare.py")
    if meta.get("dtype", "uint16") != "uint16":
        raise UserError(f"{meta_path}: dtype {meta.get('dtype')!r}, expected uint16")
    tok_path = os.path.join(data_dir, "tokenizer.json")
    tokenizer = open(tok_path).read() if os.path.isfile(tok_path) else None
    return data_dir, meta, splits, tokenizer


def open_split(data_dir, files, block_size, split):
    """(shards, starts): memmaps and, per shard, how many windows of block_size + 1 tokens fit in it."""
    shards = []
    for name in files:
        path = os.path.join(data_dir, name)
        try:
            shards.append(np.memmap(path, dtype=np.uint16, mode="r") if os.path.getsize(path) else np.zeros(0, np.uint16))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read shard {path} ({type(e).__name__}): rerun prepare.py")
    starts = torch.tensor([max(len(s) - block_size, 0) for s in shards], dtype=torch.long)
    if starts.sum() == 0:
        longest = max((len(s) for s in shards), default=0)
        raise UserError(f"the {split} shards in {data_dir} hold at most {longest} tokens, fewer than "
                        f"block_size + 1 = {block_size + 1}: lower block_size or prepare more data")
    return shards, starts


def get_batch(split, windows, block_size, device):
    """Inputs and targets [B, block_size] for window ids [B]; targets are the inputs shifted by one.

    A window id numbers the windows of all shards one after the other, so that sampling ids uniformly
    samples every starting position of every shard equally often.
    """
    shards, starts = split
    ends = starts.cumsum(0)
    shard = torch.searchsorted(ends, windows, right=True)
    offset = windows - (ends[shard] - starts[shard])
    rows = [torch.from_numpy(shards[s][o:o + block_size + 1].astype(np.int64))
            for s, o in zip(shard.tolist(), offset.tolist())]
    xy = torch.stack(rows)
    x, y = xy[:, :-1], xy[:, 1:]
    if device.type == "cuda":  # page-locked memory lets the copies overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)

# -----------------------------------------------------------------------------
# the job: ranks, device, model, optimizer, the state that exact resume restores


@dataclass
class Ranks:
    """This process's place in the job and its share of a step's batch_size x accumulation sequences."""
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    micro_steps: int = 1                # micro-batches this rank runs per optimizer step
    micro_batch: int = 1                # sequences per micro-batch on this rank

    @property
    def ddp(self):
        return self.world > 1

    @property
    def master(self):
        return self.rank == 0


def job_ranks(settings):
    """The ranks torchrun started (or one process), with the global batch split across them: each rank runs its
    share of the micro-batches or, when those do not divide, a slice of every micro-batch."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    world, rank, local_rank = (int(os.environ[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")) if ddp else (1, 0, 0)
    accum, batch = settings["gradient_accumulation_steps"], settings["batch_size"]
    if accum % world == 0:
        return Ranks(world, rank, local_rank, accum // world, batch)
    if batch % world == 0:
        return Ranks(world, rank, local_rank, accum, batch // world)
    raise UserError(f"neither gradient_accumulation_steps ({accum}) nor batch_size ({batch}) divides "
                    f"across {world} ranks: make one of them a multiple of {world}")


def job_device(settings, ranks):
    """(device, dtype name, whether to compile) for this rank."""
    device = pick_device(settings["device"])
    if device.type == "cuda" and device.index is None:  # this rank's GPU: set_device needs an index
        device = torch.device("cuda", ranks.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    use_compile = device.type == "cuda" if settings["compile"] is None else settings["compile"]
    return device, pick_dtype(settings["dtype"], device), use_compile


def auto_dtype(settings, ckpt, model, device, ranks):
    """(dtype, why) for dtype=auto once the model exists. A resumed run keeps the precision its checkpoint was
    trained in, so that a noisy timing cannot change it mid-run. A new run on a CPU takes what auto_cpu_dtype
    measures for this model (rank 0 decides for all); on a GPU, pick_dtype's choice."""
    if ckpt is not None and ckpt["settings"].get("dtype") in DTYPES:
        return ckpt["settings"]["dtype"], "dtype=auto keeps the checkpoint's precision"
    if device.type != "cpu":
        return pick_dtype("auto", device), "dtype=auto on this GPU"
    choice = [None]
    if ranks.master:
        block = settings["block_size"]
        peaks = {d: cpu_matmul_peak(torch.get_num_threads(), d) for d in ("float32", "bfloat16")}
        flops_per_step = model.flops_per_token(block) * ranks.micro_batch * block
        choice = [auto_cpu_dtype(step_timer(model, ranks.micro_batch, block), peaks, flops_per_step)]
    if ranks.ddp:
        dist.broadcast_object_list(choice, src=0)
    return choice[0]


def step_timer(model, batch_size, block_size):
    """time_step(dtype) -> seconds of one forward and backward (eager) of a copy of the model on random tokens of a
    micro-batch's shape. The model, the RNGs (dropout draws) and the data order are untouched: exact resume holds."""
    twin = copy.deepcopy(model)
    x = torch.randint(model.config.vocab_size, (batch_size, block_size), generator=torch.Generator().manual_seed(0))

    def time_step(dtype):
        with torch.random.fork_rng(devices=[]):
            t0 = time.perf_counter()
            with autocast(torch.device("cpu"), dtype):
                _, loss = twin(x, x)
            loss.backward()
            twin.zero_grad(set_to_none=True)
            return time.perf_counter() - t0
    return time_step


def check_same_model(settings, model_config, what, ignore=()):
    """Refuse to continue `what` (a checkpoint, pretrained weights) with different model settings."""
    diff = [f"{k}={v!r} (the settings say {settings.get(k)!r})" for k, v in model_config.items()
            if k not in ignore and settings.get(k) != v]
    if diff:
        raise UserError(f"{what} has a different model: {', '.join(diff[:4])}; "
                        "use the config file it was trained with")


def build_model(settings, ckpt, data_dir, vocab_size):
    """(the model, on the CPU in training mode; the pretrained tokenizer's JSON or None): from scratch, from
    the checkpoint, or from SmolLM2-135M's weights with this run's block_size and dropout."""
    torch.manual_seed(settings["seed"])  # the same initial weights on every rank
    tokenizer = None
    if settings["init_from"] == "smollm2-135m":
        import pretrained  # loads 135M weights: only when asked
        model, tok = pretrained.smollm2_135m()
        # the architecture is SmolLM2's; the context length and dropout of this run may differ
        check_same_model(settings, dataclasses.asdict(model.config), "SmolLM2-135M", ignore=("block_size", "dropout"))
        if (model.config.block_size, model.config.dropout) != (settings["block_size"], settings["dropout"]):
            cfg = dataclasses.replace(model.config, block_size=settings["block_size"], dropout=settings["dropout"])
            state, model = model.state_dict(), Transformer(cfg)
            model.load_state_dict(state)  # the RoPE tables are rebuilt, not loaded
        tokenizer = tok.to_str()
    elif ckpt is not None:
        model = model_from_checkpoint(ckpt)
        # the MTP loss weight may change on resume (DeepSeek-V3 went from 0.3 to 0.1 for its last 4.8T tokens)
        model.config = dataclasses.replace(model.config, mtp_loss_weight=settings["mtp_loss_weight"])
    else:
        cfg = ModelConfig.from_settings(settings)
        if vocab_size > cfg.vocab_size:
            raise UserError(f"{data_dir} has a vocabulary of {vocab_size} tokens but the model's vocab_size "
                            f"is {cfg.vocab_size}: set --vocab_size={vocab_size} or more")
        model = Transformer(cfg)
    if vocab_size > model.config.vocab_size:
        raise UserError(f"{data_dir} has a vocabulary of {vocab_size} tokens, more than the model's "
                        f"{model.config.vocab_size}")
    return model.train(), tokenizer


def param_groups(model, weight_decay):
    """AdamW's groups: weight decay on matrices only. Norms and embeddings are not pulled towards zero (rare
    tokens' rows get few gradients but would shrink at every step); the MoE bias is a buffer, never seen here."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    is_matrix = lambda n, p: p.dim() >= 2 and not n.startswith("tok_embeddings")
    return [{"params": [p for n, p in params if is_matrix(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in params if not is_matrix(n, p)], "weight_decay": 0.0}]


@dataclass
class RunState:
    """What the following steps depend on besides the weights and the optimizer, restored exactly on resume."""
    data_gen: torch.Generator           # the train batches' order (the same on every rank)
    val_windows: torch.Tensor           # the fixed validation batches [eval_iters, batch_size], so evaluations compare
    iter_num: int = 0
    tokens_seen: int = 0
    best_val_loss: float = float("inf")
    start_iter: int = 0                 # where this process began (0, or the checkpoint's iteration)
    evaluated: int = -1                 # the iteration of the last finished evaluation
    signal: int = 0                     # a SIGINT/SIGTERM caught on this rank
    interruptible: bool = False         # True while a signal may stop the work at once (see Interrupted)


class Interrupted(Exception):
    """Raised by the signal handler inside interruptible work (forward and backward passes, evaluation,
    samples), so that Ctrl-C or SIGTERM stops within seconds; the run then goes back to its last step boundary."""


def on_signal(state):
    def handler(signum, frame):
        state.signal = signum
        if state.interruptible:
            state.interruptible = False
            raise Interrupted(signum)
    return handler


@contextlib.contextmanager
def interruptible(state, ranks):
    """Lets a signal stop the work inside at once, on a single process (under DDP the ranks stop together at
    the end of a step instead: one of them stopping alone would leave the others waiting in a collective)."""
    state.interruptible = not ranks.ddp
    try:
        yield
    finally:
        state.interruptible = False


def restore(settings, ckpt, optimizer, scaler, val_split, device, ranks):
    """The run's state: fresh, or the checkpoint's, with the optimizer, grad scaler and RNGs restored."""
    state = RunState(torch.Generator().manual_seed(settings["seed"]), None)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        state.data_gen.set_state(ckpt["data_rng"])
        state.iter_num = state.start_iter = ckpt["iter_num"]
        state.tokens_seen, state.best_val_loss = ckpt["tokens_seen"], ckpt["best_val_loss"]
        state.evaluated = ckpt.get("evaluated", ckpt["iter_num"])  # older checkpoints: taken at an evaluation
        if tuple(ckpt["val_windows"].shape) == (settings["eval_iters"], settings["batch_size"]):
            state.val_windows = ckpt["val_windows"]
    if state.val_windows is None:
        val_gen = torch.Generator().manual_seed(settings["seed"] + 1)
        state.val_windows = torch.randint(int(val_split[1].sum()), (settings["eval_iters"], settings["batch_size"]),
                                          generator=val_gen)
    torch.manual_seed(settings["seed"] + ranks.rank)  # dropout differs across ranks
    if ckpt is not None and len(ckpt["rng"]) == ranks.world:
        torch.set_rng_state(ckpt["rng"][ranks.rank]["cpu"])
        if device.type == "cuda" and ckpt["rng"][ranks.rank]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"][ranks.rank]["cuda"], device)
    return state


def rng_states(device, ranks):
    """Every rank's torch RNG states (each rank must call it: under DDP it gathers them)."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if not ranks.ddp:
        return [state]
    states = [None] * ranks.world
    dist.all_gather_object(states, state)
    return [{k: v if v is None else v.cpu() for k, v in s.items()} for s in states]


def save_run(path, reason, raw_model, optimizer, scaler, state, settings, tokenizer, device, ranks):
    """A checkpoint of everything the following steps depend on; all ranks call it, rank 0 writes."""
    rng = rng_states(device, ranks)
    if not ranks.master:
        return
    model_config = dataclasses.asdict(raw_model.config)
    save_checkpoint({
        "model": raw_model.state_dict(), "model_config": model_config,
        "settings": {k: v for k, v in settings.items() if k not in model_config},  # the model's fields once
        "tokenizer": tokenizer, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "iter_num": state.iter_num, "tokens_seen": state.tokens_seen, "best_val_loss": state.best_val_loss,
        "data_rng": state.data_gen.get_state(), "rng": rng, "val_windows": state.val_windows,
        "evaluated": state.evaluated,
    }, path)
    tqdm.write(f"saved {path} at iteration {state.iter_num} ({reason})")

# -----------------------------------------------------------------------------
# the step, evaluation, the log


def get_lr(it, settings):
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters (nanoGPT)."""
    lr, min_lr, warmup, decay = settings["learning_rate"], settings["min_lr"], settings["warmup_iters"], settings["lr_decay_iters"]
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it >= decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def all_sum(x, ddp):
    """Sum a tensor over the ranks (in place) when running under DDP."""
    if ddp:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def optimizer_step(model, raw_model, optimizer, scaler, state, train_split, settings, device, dtype, ranks):
    """One optimizer step on this rank's share of the step's global batch; (loss, MTP losses, stop, grad norm,
    MaxVio per layer, expert counts) from step_results."""
    boundary = {"data_rng": state.data_gen.get_state(), "cpu_rng": torch.get_rng_state(),  # (the CUDA RNG's state
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}  # lives on the host)
    windows = torch.randint(int(train_split[1].sum()), (settings["gradient_accumulation_steps"], settings["batch_size"]),
                            generator=state.data_gen)
    if ranks.micro_steps * ranks.world == settings["gradient_accumulation_steps"]:
        mine = windows.view(ranks.world, ranks.micro_steps, -1)[ranks.rank]     # whole micro-batches
    else:
        mine = windows.view(ranks.micro_steps, ranks.world, -1)[:, ranks.rank]  # a slice of every micro-batch
    losses = torch.zeros(1 + raw_model.config.mtp_depth, device=device)  # the loss, then each MTP module's
    try:
        with interruptible(state, ranks):
            for micro in range(ranks.micro_steps):
                x, y = get_batch(train_split, mine[micro], settings["block_size"], device)
                if ranks.ddp:  # gradients are all-reduced on the last micro-step only
                    model.require_backward_grad_sync = micro == ranks.micro_steps - 1
                with autocast(device, dtype):
                    _, loss = model(x, y)
                losses[0] += loss.detach()
                if raw_model.mtp:
                    losses[1:] += raw_model.mtp_losses.detach()
                scaler.scale(loss / ranks.micro_steps).backward()
    except Interrupted:  # the run checkpoints the step's start: its batches and dropout draws come again on resume
        state.data_gen.set_state(boundary["data_rng"])
        torch.set_rng_state(boundary["cpu_rng"])
        if boundary["cuda_rng"] is not None:
            torch.cuda.set_rng_state(boundary["cuda_rng"], device)
        raise
    # from here the step completes whatever arrives: a signal is acted on at the step's end
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), settings["grad_clip"] or float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step_results(raw_model, losses / (ranks.micro_steps * ranks.world), grad_norm, state.signal, ranks.ddp)


def step_results(raw_model, losses, grad_norm, stopping, ddp):
    """Finish an optimizer step with one all-reduce and one wait for the device (the step's only sync).

    Sums over the ranks the step's mean losses (a share per rank: the loss, then each MTP module's), whether any
    rank was signalled to stop, and the tokens each expert received (MoE); applies loss-free balancing with
    those whole-step counts. Returns, on the host: the main head's loss (the loss less the MTP term, as a run
    without MTP would report it), the MTP losses [D], stop, grad_norm, per-layer MaxVio [layers] and counts
    [layers, E].
    """
    counts = raw_model.pop_expert_counts()                                  # [layers, E]; [0, 0] if dense
    n = len(losses)
    shared = all_sum(torch.cat([losses.new_full((1,), float(stopping)), losses, counts.flatten()]), ddp)
    stop, losses, counts = shared[0], shared[1:1 + n], shared[1 + n:].view_as(counts)
    raw_model.update_router_bias(counts)
    vio = max_violation(counts) if counts.numel() else counts.new_zeros(0)
    host = torch.cat([stop.view(1), losses, grad_norm.float().view(1), vio, counts.flatten()]).cpu()
    stop, (loss, *mtp), grad_norm = host[0].item() > 0, host[1:1 + n].tolist(), host[1 + n].item()
    if mtp:  # the loss is main + lambda * mean(mtp)
        loss -= raw_model.config.mtp_loss_weight * sum(mtp) / len(mtp)
    return loss, mtp, stop, grad_norm, host[2 + n:2 + n + len(vio)], host[2 + n + len(vio):].view_as(counts)


@torch.no_grad()
def evaluate(model, val_split, state, block_size, eot, device, dtype, ranks, mtp_depth):
    """(mean cross-entropy of the main head over the fixed validation batches, summed cross-entropy of the
    targets that are text, not end-of-text, each MTP module's mean cross-entropy [mtp_depth]), shared out across
    ranks. Pure cross-entropy: the MoE auxiliary loss is a training regulariser, not part of what the model
    predicts, and the val loss is the main head's alone, so that runs with and without MTP compare. Its bar goes
    away when it ends."""
    model.eval()
    total = torch.zeros(3 + mtp_depth, device=device)  # sum of batch means, batches, nats of the text targets, MTP's
    batches = range(ranks.rank, len(state.val_windows), ranks.world)
    with interruptible(state, ranks):
        for k in tqdm(batches, desc="eval", leave=False, disable=not ranks.master, dynamic_ncols=True):
            x, y = get_batch(val_split, state.val_windows[k], block_size, device)
            with autocast(device, dtype):
                logits, _ = model(x, y if mtp_depth else None)  # targets: for the MTP modules' losses
            losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
            total[:3] += torch.stack([losses.mean(), torch.ones_like(losses[0]), losses[y.flatten() != eot].sum()])
            if mtp_depth:
                total[3:] += model.mtp_losses.float()
    model.train()
    total = all_sum(total, ranks.ddp)
    return (total[0] / total[1]).item(), total[2].item(), (total[3:] / total[1]).tolist()


def text_bytes(tok, val_split, val_windows, block_size, eot):
    """UTF-8 bytes of the validation targets' text (end-of-text tokens left out): what bits per byte divides
    by, so that models with different tokenizers compare (nanochat reports it too)."""
    n = 0
    for windows in val_windows:
        _, y = get_batch(val_split, windows, block_size, torch.device("cpu"))
        n += sum(len(tok.decode([t for t in row if t != eot]).encode("utf-8")) for row in y.tolist())
    return n


@torch.no_grad()
def generate_samples(model, tok, settings, state, device, dtype, ranks):
    """Continuations of the fixed prompts, from a generator seeded the same at every evaluation (the training
    RNG is untouched), in eval mode; [(prompt, continuation)]."""
    generator = torch.Generator(device=device).manual_seed(settings["seed"])
    samples = []
    model.eval()
    with interruptible(state, ranks), autocast(device, dtype):
        for prompt in settings["sample_prompts"]:
            ids = torch.tensor([tok.encode(prompt).ids[-model.config.block_size:]], device=device)
            new = model.generate(ids, settings["sample_tokens"], temperature=0.8, top_k=200, generator=generator)
            samples.append((prompt, tok.decode(new[0, ids.size(1):].tolist())))
    model.train()
    return samples


def check_writable(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to out_dir {out_dir} ({e.strerror or type(e).__name__}): pick another --out_dir")


def keep_metrics_until(path, iter_num):
    """Drop metrics.jsonl lines after iter_num: a resumed run redoes those steps and logs them again."""
    if not os.path.isfile(path):
        return
    lines = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["iter"] <= iter_num:
                    lines.append(line)
            except (ValueError, KeyError, TypeError):
                pass  # e.g. a line cut short by a kill: dropped
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


class JsonLog:
    """A JSON-lines file in out_dir, written by rank 0 (metrics.jsonl, samples.jsonl). A fresh run starts it
    anew; a resumed one keeps the lines up to its checkpoint, since it redoes the steps after it."""

    def __init__(self, path, state, master, wandb=None):
        self.path, self.master, self.wandb = path, master, wandb
        if master and state.start_iter:
            keep_metrics_until(path, state.start_iter)
        elif master:
            open(path, "w").close()

    def write(self, record):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.wandb is not None:
                self.wandb.log({k: v for k, v in record.items() if k != "expert_counts"}, step=record["iter"])


def start_wandb(settings, master):
    """The wandb module, its run started, when wandb_log asks for it (rank 0 only); else None."""
    if not (settings["wandb_log"] and master):
        return None
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_log=True needs the wandb package: pip install wandb")
    wandb.init(project=settings["wandb_project"], name=settings["wandb_run_name"], config=settings)
    return wandb


def plan(raw_model, settings, ranks, peak, train_tokens, device):
    """Lines saying how long the plan takes here, from the model's FLOPs and the measured peak (at 50% MFU),
    with a warning when it takes more than a day, and a note when it reads the data many times over."""
    tokens_per_step = settings["batch_size"] * settings["gradient_accumulation_steps"] * settings["block_size"]
    lines = []
    if peak:
        rate = 0.5 * peak * ranks.world
        step = raw_model.flops_per_token(settings["block_size"]) * tokens_per_step / rate
        evaluation = step / 3 * settings["eval_iters"] / settings["gradient_accumulation_steps"]  # forward only
        total = settings["max_iters"] * step + (settings["max_iters"] // settings["eval_interval"] + 1) * evaluation
        lines.append(f"estimate at 50% MFU: {duration(step)} per step, {duration(evaluation)} per evaluation, "
                     f"{duration(total)} for {settings['max_iters']:,} steps")
        if total > 86400:
            lines.append(f"warning: this plan takes about {duration(total)} on {device}: for a first run here use "
                         "config/cpu_moe.py, or fewer max_iters and eval_iters, or a GPU (stop with Ctrl-C)")
    epochs = tokens_per_step * settings["max_iters"] / max(train_tokens, 1)
    if epochs >= 2:
        lines.append(f"note: {settings['max_iters']:,} steps read {tokens_per_step * settings['max_iters']:,} tokens, "
                     f"{epochs:,.1f} times the {train_tokens:,} training tokens of {settings['dataset']}: the model "
                     "will memorise them; prepare more data (prepare.py --max_tokens) for a real curve")
    return lines


def duration(seconds):
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.1f} s"


class Progress:
    """The progress bar, and one metrics.jsonl record per log_interval steps with the interval's means."""

    def __init__(self, settings, state, log, ranks, tokens_per_step, flops_per_token, peak, is_moe):
        self.bar = tqdm(total=settings["max_iters"], initial=state.iter_num, disable=not ranks.master,
                        dynamic_ncols=True, desc="train")
        self.settings, self.log, self.is_moe = settings, log, is_moe
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak * ranks.world if peak else None
        self.window = self.empty()

    @staticmethod
    def empty():
        return {"loss": 0.0, "mtp": None, "steps": 0, "time": 0.0, "vio": 0.0, "counts": None}  # sums over a log interval

    def mfu(self, tok_s):
        return self.flops_per_token * tok_s / self.peak if self.peak else None

    def update(self, state, lr, loss, mtp, grad_norm, vio, counts, dt):
        w = self.window
        w["loss"], w["steps"], w["time"] = w["loss"] + loss, w["steps"] + 1, w["time"] + dt
        w["mtp"] = mtp if w["mtp"] is None else [a + b for a, b in zip(w["mtp"], mtp)]
        if self.is_moe:
            w["vio"] = w["vio"] + vio
            w["counts"] = counts if w["counts"] is None else w["counts"] + counts
        tok_s, mfu = self.tokens_per_step / dt, self.mfu(self.tokens_per_step / dt)
        self.bar.update(1)
        self.bar.set_postfix_str(f"loss {loss:.4f}" + "".join(f" mtp{k} {m:.4f}" for k, m in enumerate(mtp, 1))
                                 + f" lr {lr:.2e} {tok_s:,.0f} tok/s" + (f" MFU {mfu:.1%}" if mfu else "")
                                 + (f" MaxVio {vio.mean().item():.2f}" if self.is_moe else ""))
        if state.iter_num % self.settings["log_interval"] and state.iter_num != self.settings["max_iters"]:
            return
        n = w["steps"]
        tok_s = n * self.tokens_per_step / w["time"]
        record = {"iter": state.iter_num, "tokens": state.tokens_seen, "loss": w["loss"] / n, "lr": lr,
                  "grad_norm": grad_norm, "tokens_per_sec": tok_s, "mfu": self.mfu(tok_s)}
        if mtp:  # each MTP module's cross-entropy; the loss above is the main head's
            record["mtp_losses"] = [m / n for m in w["mtp"]]
        if self.is_moe:  # MaxVio of each step's batch, averaged over the interval; overall = mean of layers
            per_layer = w["vio"] / n
            record.update(max_vio=per_layer.mean().item(), max_vio_layers=per_layer.tolist(),
                          expert_counts=w["counts"].tolist())
        self.log.write(record)
        self.window = self.empty()

    def close(self):
        self.bar.close()

def report_evaluation(state, val_loss, bpb, val_mtp, samples, log, samples_log, say, ckpt_path):
    """Print and log an evaluation's results (all of them or none: an interrupted evaluation is redone)."""
    if not math.isfinite(val_loss):
        raise UserError(f"validation loss is {val_loss} at iteration {state.iter_num}; stopped without "
                        f"saving, {ckpt_path} is the last good checkpoint")
    say(f"iter {state.iter_num}: val loss {val_loss:.4f}" + (f", {bpb:.3f} bits per byte" if bpb else "")
        + (f"; MTP modules {', '.join(f'{m:.4f}' for m in val_mtp)}" if val_mtp else ""))
    record = {"iter": state.iter_num, "tokens": state.tokens_seen, "val_loss": val_loss, "val_bpb": bpb}
    log.write({**record, "val_mtp_losses": val_mtp} if val_mtp else record)
    for prompt, text in samples:
        say(f"  > {prompt}{' '.join(text.split())}")  # one line each on the terminal; the file keeps the text
        samples_log.write({"iter": state.iter_num, "prompt": prompt, "text": text})
    state.evaluated = state.iter_num

# -----------------------------------------------------------------------------


def main(argv=None):
    settings = configure(DEFAULTS, argv)
    if settings["init_from"] not in ("scratch", "resume", "smollm2-135m"):
        raise UserError(f"init_from must be scratch, resume or smollm2-135m, not {settings['init_from']!r}")
    if settings["compile"] not in (None, True, False):
        raise UserError(f"compile must be True, False or None, not {settings['compile']!r}")
    for key in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval", "block_size"):
        if settings[key] < 1:
            raise UserError(f"{key} must be at least 1, got {settings[key]}")
    if settings["sample_tokens"] < 0 or not all(isinstance(p, str) and p for p in settings["sample_prompts"]):
        raise UserError("sample_prompts must be a list of non-empty strings and sample_tokens at least 0 "
                        "(0 turns the samples off)")
    ranks = job_ranks(settings)
    if ranks.master:
        check_writable(settings["out_dir"])
    device, dtype, use_compile = job_device(settings, ranks)
    if ranks.ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        train(settings, device, dtype, use_compile, ranks)
    finally:
        if ranks.ddp:
            dist.destroy_process_group()


def train(settings, device, dtype, use_compile, ranks):
    out_dir, block_size, max_iters = settings["out_dir"], settings["block_size"], settings["max_iters"]
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    say = tqdm.write if ranks.master else (lambda *a, **k: None)

    # ---- data, model, optimizer, and the state of the run (a checkpoint's, when resuming) ----
    ckpt = None
    if settings["init_from"] == "resume":
        ckpt = load_checkpoint(ckpt_path)
        # fields that the checkpoint predates are their defaults, as model_from_checkpoint builds it
        check_same_model(settings, {**dataclasses.asdict(ModelConfig()), **ckpt["model_config"]},
                         f"checkpoint {ckpt_path}", ignore=("mtp_loss_weight",))
    data_dir, meta, files, tokenizer = open_dataset(settings["dataset"])
    train_split = open_split(data_dir, files["train"], block_size, "train")
    val_split = open_split(data_dir, files["val"], block_size, "val")
    raw_model, pretrained_tokenizer = build_model(settings, ckpt, data_dir, meta["vocab_size"])
    tokenizer = tokenizer or pretrained_tokenizer
    raw_model.to(device)
    dtype_note = ""
    if settings["dtype"] == "auto":
        dtype, dtype_note = auto_dtype(settings, ckpt, raw_model, device, ranks)
    settings = {**settings, "dtype": dtype}  # the checkpoint records the precision the run trains in
    is_moe = bool(raw_model.moe_layers())
    optimizer = torch.optim.AdamW(param_groups(raw_model, settings["weight_decay"]), lr=settings["learning_rate"],
                                  betas=(settings["beta1"], settings["beta2"]),
                                  fused=device.type in ("cuda", "cpu"))  # one kernel for all tensors: 6 ms a step, not 23 (CPU)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    state = restore(settings, ckpt, optimizer, scaler, val_split, device, ranks)
    del ckpt  # its tensors now live in the model and optimizer
    model = compiled = torch.compile(raw_model) if use_compile else raw_model
    if ranks.ddp:
        # broadcast_buffers=False: the ranks' expert counters must not be overwritten by rank 0's;
        # the balancing biases stay equal anyway, since every rank applies the same all-reduced counts
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    tok = Tokenizer.from_str(tokenizer) if tokenizer and ranks.master else None  # samples and bits per byte
    val_bytes = text_bytes(tok, val_split, state.val_windows, block_size, meta["eot_id"]) if tok else 0

    # ---- what is about to happen ----
    tokens_per_step = settings["batch_size"] * settings["gradient_accumulation_steps"] * block_size
    peak, peak_note = peak_flops(device, dtype) if ranks.master else (None, "")
    mtp_params = sum(p.numel() for p in raw_model.mtp.parameters())
    say(f"model: {raw_model.num_params():,} parameters, {raw_model.num_params(active=True):,} active per token "
        f"({raw_model.config.attention}, {'MoE' if is_moe else 'dense'}, {raw_model.config.n_layer} layers"
        + (f"; {len(raw_model.mtp)} MTP module(s), {mtp_params:,} of the parameters" if mtp_params else "") + ")")
    say(f"tokens per step: {tokens_per_step:,} = {ranks.world} rank(s) x {ranks.micro_steps} micro-steps x "
        f"{ranks.micro_batch} sequences x {block_size} tokens; {max_iters:,} steps = {tokens_per_step * max_iters:,} tokens")
    say(f"precision: {dtype} on {device}{', torch.compile' if use_compile else ''}"
        + (f" ({dtype_note})" if dtype_note else "") + f"; MFU against {peak_note}")
    if is_moe:
        say(f"MoE experts: {experts_path(device, DTYPES[dtype], use_compile)}")
    say(f"data: {data_dir} ({sum(len(s) for s in train_split[0]):,} train tokens, vocab {meta['vocab_size']:,}); "
        f"{'resuming at iteration ' + str(state.iter_num) if state.start_iter else 'init from ' + settings['init_from']}")
    for line in plan(raw_model, settings, ranks, peak, sum(len(s) for s in train_split[0]), device):
        say(line)
    log = JsonLog(os.path.join(out_dir, "metrics.jsonl"), state, ranks.master, start_wandb(settings, ranks.master))
    samples_log = JsonLog(os.path.join(out_dir, "samples.jsonl"), state, ranks.master)

    # ---- the loop. Ctrl-C / SIGTERM: back to the last step boundary, checkpoint, exit ----
    handlers = {s: signal.signal(s, on_signal(state)) for s in (signal.SIGINT, signal.SIGTERM)}
    progress = Progress(settings, state, log, ranks, tokens_per_step, raw_model.flops_per_token(block_size), peak, is_moe)
    stop = False
    try:
        while True:
            lr = get_lr(state.iter_num, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if stop or (state.signal and not ranks.ddp):  # all ranks stop at the same step
                raise Interrupted(state.signal or signal.SIGTERM)
            if (state.iter_num % settings["eval_interval"] == 0 or state.iter_num == max_iters) and \
                    state.evaluated != state.iter_num:  # a resumed run's checkpoint may have evaluated already
                val_loss, text_nats, val_mtp = evaluate(compiled, val_split, state, block_size, meta["eot_id"], device,
                                                        dtype, ranks, raw_model.config.mtp_depth)
                samples = generate_samples(raw_model, tok, settings, state, device, dtype, ranks) \
                    if tok and settings["sample_tokens"] and math.isfinite(val_loss) else []  # NaN: reported next
                report_evaluation(state, val_loss, text_nats / math.log(2) / val_bytes if val_bytes else None,
                                  val_mtp, samples, log, samples_log, say, ckpt_path)
                if val_loss < state.best_val_loss or settings["always_save_checkpoint"]:
                    state.best_val_loss = min(state.best_val_loss, val_loss)
                    if state.iter_num > state.start_iter:
                        save_run(ckpt_path, "evaluation", raw_model, optimizer, scaler, state, settings, tokenizer,
                                 device, ranks)
            if state.iter_num >= max_iters:
                break
            t0 = time.perf_counter()
            loss, mtp, stop, grad_norm, vio, counts = optimizer_step(model, raw_model, optimizer, scaler, state,
                                                                     train_split, settings, device, dtype, ranks)
            if not math.isfinite(loss):  # the weights in memory are spoiled, the checkpoint is not
                raise UserError(f"loss is {loss} at iteration {state.iter_num}; stopped without saving, "
                                f"{ckpt_path} is the last good checkpoint (try a lower learning_rate)")
            state.iter_num += 1
            state.tokens_seen += tokens_per_step
            progress.update(state, lr, loss, mtp, grad_norm, vio, counts, time.perf_counter() - t0)
    except Interrupted:  # at a step boundary: the last completed step is what the checkpoint holds
        signum, progressed = state.signal or signal.SIGTERM, state.iter_num > state.start_iter
        progress.close()
        if progressed:  # else nothing new: an earlier run's checkpoint stays as it is
            save_run(ckpt_path, f"signal {signal.Signals(signum).name}", raw_model, optimizer, scaler, state,
                     settings, tokenizer, device, ranks)
        say(f"interrupted at iteration {state.iter_num}; " +
            ("continue with --init_from=resume" if progressed else f"nothing new to save, {ckpt_path} is unchanged"))
        raise SystemExit(128 + signum)
    finally:
        progress.close()
        for s, h in handlers.items():
            signal.signal(s, h)
        if log.wandb is not None:
            log.wandb.finish()
    say(f"done: {state.iter_num} iterations, {state.tokens_seen:,} tokens, best val loss {state.best_val_loss:.4f}")


if __name__ == "__main__":
    run_main(main)
