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
import dataclasses
import json
import math
import os
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from configurator import UserError, configure, run_main
from model import ModelConfig, Transformer, experts_path, max_violation

DEFAULTS = {
    # I/O
    "out_dir": "out",                 # ckpt.pt and metrics.jsonl go here
    "init_from": "scratch",           # "scratch", "resume" (out_dir/ckpt.pt) or "smollm2-135m" (pretrained.py)
    "eval_interval": 250,             # evaluate (and checkpoint) every this many optimizer steps
    "eval_iters": 50,                 # validation batches per evaluation (always the same ones)
    "log_interval": 10,               # one metrics.jsonl line per this many steps
    "always_save_checkpoint": True,   # checkpoint at every evaluation, not only when val loss improves
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
    "dtype": "auto",                  # "auto" (bfloat16 where supported, float16 on older GPUs, float32 on CPU)
    "compile": None,                  # torch.compile; None = on CUDA only
    "seed": 1337,
    # the model: every ModelConfig field (model.py), e.g. --n_layer=4 --n_routed_experts=8
    **dataclasses.asdict(ModelConfig()),
}
MODEL_KEYS = [f.name for f in dataclasses.fields(ModelConfig)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# dense bfloat16 tensor-core peaks from the datasheets (no sparsity), for MFU; checked in this order
GPU_PEAK_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
                  ("L40S", 362e12), ("L4", 121e12)]

# -----------------------------------------------------------------------------
# checkpoints: one file, only tensors/numbers/strings/lists/dicts, so torch.load(weights_only=True) reads it


def save_checkpoint(ckpt, path):
    """Write `ckpt` to `path` atomically: a temporary file, flushed to disk, then renamed over it."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """Load a checkpoint written by train.py onto the CPU, never with pickle; bad files raise UserError."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one first (init_from=scratch) or check out_dir")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Unsupported global" in str(e):  # weights_only refused a python class: pickle would run code
            raise UserError(f"{path} holds python objects that only pickle can load; refusing to run "
                            "its code (only checkpoints written by train.py are supported)")
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt: "
                        f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__})")
    missing = [k for k in ("model", "model_config", "config") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a train.py checkpoint (no {', '.join(missing)})")
    return ckpt


def model_from_checkpoint(ckpt):
    """Rebuild the Transformer a checkpoint holds, on the CPU, in eval mode."""
    try:
        model = Transformer(ModelConfig(**ckpt["model_config"]))
        keys = model.load_state_dict(ckpt["model"], strict=False)
    except (TypeError, ValueError, RuntimeError) as e:  # unknown config fields, wrong tensor shapes
        raise UserError(f"checkpoint does not match this model.py: {' '.join(str(e).split())[:300]}")
    if keys.missing_keys or keys.unexpected_keys:  # e.g. written before W_q, W_k, W_v became one wqkv
        raise UserError(f"checkpoint does not match this model.py: it lacks {keys.missing_keys[:3]} and has "
                        f"{keys.unexpected_keys[:3]}; it was written by another version of model.py")
    return model.eval()


def check_same_model(config, model_config, what, ignore=()):
    """Refuse to continue `what` (a checkpoint, pretrained weights) with different model settings."""
    diff = [f"{k}={v!r} (config says {config.get(k)!r})" for k, v in model_config.items()
            if k not in ignore and config.get(k) != v]
    if diff:
        raise UserError(f"{what} has a different model: {', '.join(diff[:4])}; "
                        "use the config file it was trained with")

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
# small helpers


def pick_device(name):
    """torch.device for a `device` setting: "auto" is cuda, then mps, then cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if (device.type == "cuda" and not torch.cuda.is_available()) or \
            (device.type == "mps" and not torch.backends.mps.is_available()):
        raise UserError(f"device={name} is not available here: use --device=cpu")
    return device


def pick_dtype(name, device):
    """The precision name for a `dtype` setting: "auto" is bfloat16 on GPUs that have it, float16 on older
    GPUs, float32 elsewhere (bfloat16 matmuls on CPUs without AMX are far slower than float32)."""
    if name == "auto":
        if device.type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if name not in DTYPES:
        raise UserError(f"dtype must be auto, {', '.join(DTYPES)}, not {name!r}")
    return name


def get_lr(it, config):
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters (nanoGPT)."""
    lr, min_lr, warmup, decay = config["learning_rate"], config["min_lr"], config["warmup_iters"], config["lr_decay_iters"]
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it >= decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def peak_flops(device):
    """FLOP/s that MFU is measured against, and where the number comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS:
            if key in name:
                return flops, f"{name} datasheet bf16 dense peak {flops / 1e12:.0f} TFLOP/s"
        return None, f"{name}: peak unknown, no MFU"
    if device.type == "cpu":
        # the best float32 matmul rate this CPU reaches right now, measured in ~0.3 s (no RNG used)
        a = torch.ones(1024, 1024)
        best = 0.0
        for _ in range(3):
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < 0.1:
                a @ a
                n += 1
            best = max(best, 2 * 1024 ** 3 * n / (time.perf_counter() - t0))
        return best, f"measured float32 matmul peak {best / 1e9:.1f} GFLOP/s"
    return None, "no MFU on this device"


def all_sum(x, ddp):
    """Sum a tensor over the ranks (in place) when running under DDP."""
    if ddp:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def step_results(raw_model, loss, grad_norm, stopping, ddp):
    """Finish an optimizer step with one all-reduce and one wait for the device (the step's only sync).

    Sums over the ranks the step's mean loss (a share per rank), whether any rank was signalled to stop,
    and the tokens each expert received (MoE); applies loss-free balancing with those whole-step counts.
    Returns, on the host: loss, stop, grad_norm, per-layer MaxVio [layers] and counts [layers, E].
    """
    counts = raw_model.pop_expert_counts()                                  # [layers, E]; [0, 0] if dense
    shared = all_sum(torch.cat([loss.view(1), loss.new_full((1,), float(stopping)), counts.flatten()]), ddp)
    counts = shared[2:].view_as(counts)
    raw_model.update_router_bias(counts)
    vio = max_violation(counts) if counts.numel() else counts.new_zeros(0)
    host = torch.cat([shared[:2], grad_norm.float().view(1), vio, counts.flatten()]).cpu()
    n = len(vio)
    return host[0].item(), host[1].item() > 0, host[2].item(), host[3:3 + n], host[3 + n:].view_as(counts)


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

# -----------------------------------------------------------------------------


def main(argv=None):
    config = configure(DEFAULTS, argv)
    if config["init_from"] not in ("scratch", "resume", "smollm2-135m"):
        raise UserError(f"init_from must be scratch, resume or smollm2-135m, not {config['init_from']!r}")
    if config["compile"] not in (None, True, False):
        raise UserError(f"compile must be True, False or None, not {config['compile']!r}")
    for key in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval", "block_size"):
        if config[key] < 1:
            raise UserError(f"{key} must be at least 1, got {config[key]}")

    # ---- ranks: the global batch of batch_size x accumulation sequences is split across them ----
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    world, rank, local_rank = (int(os.environ[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")) if ddp else (1, 0, 0)
    accum, batch = config["gradient_accumulation_steps"], config["batch_size"]
    if accum % world == 0:  # each rank runs its share of the micro-batches
        micro_steps, micro_batch = accum // world, batch
    elif batch % world == 0:  # each micro-batch is split across the ranks
        micro_steps, micro_batch = accum, batch // world
    else:
        raise UserError(f"neither gradient_accumulation_steps ({accum}) nor batch_size ({batch}) divides "
                        f"across {world} ranks: make one of them a multiple of {world}")
    master = rank == 0
    out_dir = config["out_dir"]
    if master:
        check_writable(out_dir)

    # ---- device and precision ----
    device = pick_device(config["device"])
    if device.type == "cuda" and device.index is None:  # this rank's GPU: set_device needs an index
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    dtype = pick_dtype(config["dtype"], device)
    autocast = (contextlib.nullcontext() if dtype == "float32"
                else torch.autocast(device_type=device.type, dtype=DTYPES[dtype]))
    use_compile = device.type == "cuda" if config["compile"] is None else config["compile"]
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        train(config, device, dtype, autocast, use_compile, ddp, world, rank, micro_steps, micro_batch)
    finally:
        if ddp:
            dist.destroy_process_group()


def train(config, device, dtype, autocast, use_compile, ddp, world, rank, micro_steps, micro_batch):
    master = rank == 0
    out_dir, block_size = config["out_dir"], config["block_size"]
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    say = tqdm.write if master else (lambda *a, **k: None)

    # ---- the model's settings: from the config, the checkpoint, or the pretrained weights ----
    ckpt = None
    model_config = {k: config[k] for k in MODEL_KEYS}
    if config["init_from"] == "resume":
        ckpt = load_checkpoint(ckpt_path)
        check_same_model(config, ckpt["model_config"], f"checkpoint {ckpt_path}")
    data_dir, meta, files, tokenizer = open_dataset(config["dataset"])
    if config["init_from"] != "smollm2-135m" and meta["vocab_size"] > model_config["vocab_size"]:
        raise UserError(f"{data_dir} has a vocabulary of {meta['vocab_size']} tokens but the model's vocab_size "
                        f"is {model_config['vocab_size']}: set --vocab_size={meta['vocab_size']} or more")
    train_split = open_split(data_dir, files["train"], block_size, "train")
    val_split = open_split(data_dir, files["val"], block_size, "val")

    torch.manual_seed(config["seed"])  # the same initial weights on every rank
    if config["init_from"] == "smollm2-135m":
        import pretrained  # loads 135M weights: only when asked
        pre, tok = pretrained.smollm2_135m()
        # the architecture is SmolLM2's; the context length and dropout of this run may differ
        check_same_model(config, dataclasses.asdict(pre.config), "SmolLM2-135M", ignore=("block_size", "dropout"))
        raw_model = pre
        if (pre.config.block_size, pre.config.dropout) != (block_size, config["dropout"]):
            raw_model = Transformer(dataclasses.replace(pre.config, block_size=block_size, dropout=config["dropout"]))
            raw_model.load_state_dict(pre.state_dict())  # the RoPE tables are rebuilt, not loaded
            del pre
        tokenizer = tokenizer or tok.to_str()
    elif ckpt is not None:
        raw_model = model_from_checkpoint(ckpt).train()
    else:
        try:
            raw_model = Transformer(ModelConfig(**model_config))
        except ValueError as e:
            raise UserError(f"bad model settings: {e}")
    if meta["vocab_size"] > raw_model.config.vocab_size:
        raise UserError(f"{data_dir} has a vocabulary of {meta['vocab_size']} tokens, more than the model's "
                        f"{raw_model.config.vocab_size}")
    raw_model.to(device)
    is_moe = bool(raw_model.moe_layers())

    # ---- optimizer: decay matrices only; norms and embeddings are not pulled towards zero (rare tokens'
    # rows get few gradients but would shrink at every step); the MoE bias is a buffer, so never seen here ----
    params = [(n, p) for n, p in raw_model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.dim() >= 2 and not n.startswith("tok_embeddings")]
    no_decay = [p for n, p in params if not (p.dim() >= 2 and not n.startswith("tok_embeddings"))]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config["learning_rate"], betas=(config["beta1"], config["beta2"]),
        fused=device.type in ("cuda", "cpu"))  # one kernel for all tensors: 6 ms a step instead of 23 (CPU, bench_dense)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")

    # ---- state that the following steps depend on (restored exactly on resume) ----
    data_gen = torch.Generator().manual_seed(config["seed"])       # train batch order (same on every rank)
    iter_num, tokens_seen, best_val_loss = 0, 0, float("inf")
    val_windows = None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        data_gen.set_state(ckpt["data_rng"])
        iter_num, tokens_seen, best_val_loss = ckpt["iter_num"], ckpt["tokens_seen"], ckpt["best_val_loss"]
        if tuple(ckpt["val_windows"].shape) == (config["eval_iters"], config["batch_size"]):
            val_windows = ckpt["val_windows"]
    if val_windows is None:  # fixed validation batches, so that evaluations compare
        val_gen = torch.Generator().manual_seed(config["seed"] + 1)
        val_windows = torch.randint(int(val_split[1].sum()), (config["eval_iters"], config["batch_size"]), generator=val_gen)
    torch.manual_seed(config["seed"] + rank)  # dropout differs across ranks
    if ckpt is not None and len(ckpt["rng"]) == world:
        torch.set_rng_state(ckpt["rng"][rank]["cpu"])
        if device.type == "cuda" and ckpt["rng"][rank]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], device)
    start_iter = iter_num
    del ckpt  # its tensors now live in the model and optimizer

    model = compiled = torch.compile(raw_model) if use_compile else raw_model
    if ddp:
        # broadcast_buffers=False: the ranks' expert counters must not be overwritten by rank 0's;
        # the balancing biases stay equal anyway, since every rank applies the same all-reduced counts
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    def rng_states():
        state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        if not ddp:
            return [state]
        states = [None] * world
        dist.all_gather_object(states, state)
        return [{k: v if v is None else v.cpu() for k, v in s.items()} for s in states]

    def checkpoint(reason):
        rng = rng_states()  # every rank takes part in the gather; rank 0 writes
        if master:
            save_checkpoint({
                "model": raw_model.state_dict(), "model_config": dataclasses.asdict(raw_model.config),
                "config": config, "tokenizer": tokenizer, "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "iter_num": iter_num, "tokens_seen": tokens_seen,
                "best_val_loss": best_val_loss, "data_rng": data_gen.get_state(), "rng": rng,
                "val_windows": val_windows,
            }, ckpt_path)
            say(f"saved {ckpt_path} at iteration {iter_num} ({reason})")

    @torch.no_grad()
    def evaluate():
        """Mean loss over the fixed validation batches, shared out across ranks (pure cross-entropy:
        the MoE auxiliary loss is a training regulariser, not part of what the model predicts)."""
        compiled.eval()
        total = torch.zeros(2, device=device)
        for k in range(rank, len(val_windows), world):
            x, y = get_batch(val_split, val_windows[k], block_size, device)
            with autocast:
                logits, _ = compiled(x)
            total[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            total[1] += 1
        compiled.train()
        total = all_sum(total, ddp)
        return (total[0] / total[1]).item()

    # ---- report what is about to happen ----
    tokens_per_step = config["batch_size"] * config["gradient_accumulation_steps"] * block_size
    flops_per_token = raw_model.flops_per_token(block_size)
    peak, peak_note = peak_flops(device) if master else (None, "")
    n_total, n_active = raw_model.num_params(), raw_model.num_params(active=True)
    say(f"model: {n_total:,} parameters, {n_active:,} active per token "
        f"({raw_model.config.attention}, {'MoE' if is_moe else 'dense'}, {raw_model.config.n_layer} layers)")
    say(f"tokens per step: {tokens_per_step:,} = {world} rank(s) x {micro_steps} micro-steps x {micro_batch} "
        f"sequences x {block_size} tokens; {config['max_iters']:,} steps = {tokens_per_step * config['max_iters']:,} tokens")
    say(f"precision: {dtype} on {device}{', torch.compile' if use_compile else ''}; MFU against {peak_note}")
    if is_moe:
        say(f"MoE experts: {experts_path(device, DTYPES[dtype], use_compile)}")
    say(f"data: {data_dir} ({sum(len(s) for s in train_split[0]):,} train tokens, vocab {meta['vocab_size']:,}); "
        f"{'resuming at iteration ' + str(iter_num) if start_iter else 'init from ' + config['init_from']}")

    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if master:  # the log matches the checkpoint: a fresh run starts a new one, a resumed one cuts the redone part
        if start_iter:
            keep_metrics_until(metrics_path, iter_num)
        else:
            open(metrics_path, "w").close()
    wandb = None
    if config["wandb_log"] and master:
        try:
            import wandb
        except ImportError:
            raise UserError("wandb_log=True needs the wandb package: pip install wandb")
        wandb.init(project=config["wandb_project"], name=config["wandb_run_name"], config=config)

    def log(record):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if wandb is not None:
                wandb.log({k: v for k, v in record.items() if k != "expert_counts"}, step=record["iter"])

    # ---- Ctrl-C / SIGTERM: finish the current step, checkpoint, exit ----
    stop = {"signal": 0}
    handlers = {s: signal.signal(s, lambda signum, frame: stop.update(signal=signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(total=config["max_iters"], initial=iter_num, disable=not master, dynamic_ncols=True, desc="train")
    window = {"loss": 0.0, "steps": 0, "time": 0.0, "vio": 0.0, "counts": None}  # sums over a log interval
    stop_now = False
    try:
        while True:
            lr = get_lr(iter_num, config)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # evaluate (not again at the iteration a resumed run starts from: its checkpoint did)
            if (iter_num % config["eval_interval"] == 0 or iter_num == config["max_iters"]) and \
                    not (iter_num == start_iter and start_iter > 0):
                val_loss = evaluate()
                if not math.isfinite(val_loss):
                    raise UserError(f"validation loss is {val_loss} at iteration {iter_num}; stopped without "
                                    f"saving, {ckpt_path} is the last good checkpoint")
                say(f"iter {iter_num}: val loss {val_loss:.4f}")
                log({"iter": iter_num, "tokens": tokens_seen, "val_loss": val_loss})
                if val_loss < best_val_loss or config["always_save_checkpoint"]:
                    best_val_loss = min(best_val_loss, val_loss)
                    if iter_num > start_iter:
                        checkpoint("evaluation")

            if stop_now:  # a rank was signalled during the last step: all ranks stop here
                checkpoint(f"signal {signal.Signals(int(stop['signal'] or signal.SIGTERM)).name}")
                bar.close()
                say(f"interrupted at iteration {iter_num}; continue with --init_from=resume")
                raise SystemExit(128 + int(stop["signal"] or signal.SIGTERM))
            if iter_num >= config["max_iters"]:
                break

            # ---- one optimizer step: this rank's share of the step's global batch ----
            t0 = time.perf_counter()
            windows = torch.randint(int(train_split[1].sum()), (config["gradient_accumulation_steps"], config["batch_size"]),
                                    generator=data_gen)
            if micro_steps * world == config["gradient_accumulation_steps"]:
                mine = windows.view(world, micro_steps, -1)[rank]            # whole micro-batches
            else:
                mine = windows.view(micro_steps, world, -1)[:, rank]         # a slice of every micro-batch
            loss_sum = torch.zeros((), device=device)
            for micro in range(micro_steps):
                x, y = get_batch(train_split, mine[micro], block_size, device)
                if ddp:  # gradients are all-reduced on the last micro-step only
                    model.require_backward_grad_sync = micro == micro_steps - 1
                with autocast:
                    _, loss = model(x, y)
                loss_sum += loss.detach()
                scaler.scale(loss / micro_steps).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config["grad_clip"] or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            loss_value, stop_now, grad_norm, vio, counts = step_results(
                raw_model, loss_sum / (micro_steps * world), grad_norm, stop["signal"], ddp)
            if not math.isfinite(loss_value):  # the weights in memory are spoiled, the checkpoint is not
                raise UserError(f"loss is {loss_value} at iteration {iter_num}; stopped without saving, "
                                f"{ckpt_path} is the last good checkpoint (try a lower learning_rate)")
            if is_moe:
                window["vio"] = window["vio"] + vio
                window["counts"] = counts if window["counts"] is None else window["counts"] + counts
            iter_num += 1
            tokens_seen += tokens_per_step
            dt = time.perf_counter() - t0

            # ---- progress ----
            window["loss"] += loss_value
            window["steps"] += 1
            window["time"] += dt
            tok_s = tokens_per_step / dt
            mfu = flops_per_token * tok_s / (peak * world) if peak else None
            bar.update(1)
            bar.set_postfix_str(f"loss {loss_value:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s"
                                + (f" MFU {mfu:.1%}" if mfu is not None else "")
                                + (f" MaxVio {vio.mean().item():.2f}" if is_moe else ""))
            if iter_num % config["log_interval"] == 0 or iter_num == config["max_iters"]:
                n = window["steps"]
                tok_s = n * tokens_per_step / window["time"]
                record = {"iter": iter_num, "tokens": tokens_seen, "loss": window["loss"] / n, "lr": lr,
                          "grad_norm": grad_norm, "tokens_per_sec": tok_s,
                          "mfu": flops_per_token * tok_s / (peak * world) if peak else None}
                if is_moe:  # MaxVio of each step's batch, averaged over the interval; overall = mean of layers
                    per_layer = window["vio"] / n
                    record.update(max_vio=per_layer.mean().item(), max_vio_layers=per_layer.tolist(),
                                  expert_counts=window["counts"].tolist())
                log(record)
                window = {"loss": 0.0, "steps": 0, "time": 0.0, "vio": 0.0, "counts": None}
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)
        if wandb is not None:
            wandb.finish()
    say(f"done: {iter_num} iterations, {tokens_seen:,} tokens, best val loss {best_val_loss:.4f}")


if __name__ == "__main__":
    run_main(main)
