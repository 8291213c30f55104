"""
Train a DeepSeek-style model (MLA + DeepSeekMoE, or dense GQA) with a hand-written loop, nanoGPT-style.

    python train.py config/cpu_moe.py                        # the CPU demo
    python train.py config/deepseek_moe.py --batch_size=8    # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/deepseek_moe.py
    torchrun --standalone --nproc_per_node=8 train.py config/customllm_1b.py --fsdp=True  # sharded (FSDP2)
    python train.py config/cpu_moe.py --init_from=resume     # continue out_dir/ckpt.pt exactly
    python train.py config/finetune_smollm2.py --dataset=NAME  # fine-tune the released SmolLM2-135M
    python train.py -h                                       # every setting: its default and meaning

Settings: the TrainConfig below, then config files, then --key=value overrides (configurator.py). Every
ModelConfig field is a setting too. `batch_size` is the micro-batch (sequences per forward pass) and
`gradient_accumulation_steps` the number of micro-batches per optimizer step, both counted over the
whole job: under DDP the ranks share the accumulation steps (or, when those do not divide, each
micro-batch), so a step sees the same batch_size * gradient_accumulation_steps sequences, drawn in
the same order, on any number of ranks. Under DDP every rank holds the whole model, its gradients and the optimizer
state; --fsdp=True shards all three across the ranks (FSDP2: shard), for models that do not fit one GPU that way.

Exact resume: a checkpoint holds everything the following steps depend on (weights incl. the MoE
balancing biases, optimizer and grad scaler state, iteration, the data sampler's generator, the torch
RNG of every rank, the validation windows), so `init_from=resume` after a crash replays the steps
since the last checkpoint bit for bit on CPU (checkpoint.py: ckpt.pt, or the DCP directory ckpt.dcp under FSDP,
which resumes on any number of ranks). A new run never replaces the run in out_dir unless --overwrite=True.
"""

import contextlib
import copy
import dataclasses
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from checkpoint import (SHARDED, PLAIN, TrainState, checkpoint_in, load_checkpoint, model_from_checkpoint,
                        remove_checkpoint, restore_rng, restore_state, rng_states, save_state)
from configurator import UserError, configure, run_main
from data import Dataset, more_data, open_dataset, text_bytes
from device import DTYPES, Job, auto_cpu_dtype, autocast, cpu_matmul_peak, peak_flops, pick_device, pick_dtype
from generate import Sampling, generate
from model import ModelConfig, Transformer, grouped_mm_runs, max_violation, unpadded_attention_runs
from optim import build_optimizer, held_bytes
from progress import EvalResult, Progress, Rate, StepResult


@dataclass
class TrainConfig:
    """Every setting of a run, with its default: config files and --key=value set them (configurator.py). The
    model's fields are settings too, by their own names (--n_layer=4): `model` holds them, checked by ModelConfig."""
    # I/O
    out_dir: str = "out"                # ckpt.pt and metrics.jsonl go here
    init_from: str = "scratch"          # "scratch", "resume" (out_dir/ckpt.pt) or "smollm2-135m" (pretrained.py)
    overwrite: bool = False             # a new run may replace the run in out_dir (else it refuses to start)
    eval_interval: int = 250            # evaluate (and checkpoint) every this many optimizer steps
    eval_iters: int = 50                # validation batches per evaluation (always the same ones)
    log_interval: int = 10              # one metrics.jsonl line per this many steps
    always_save_checkpoint: bool = True  # checkpoint at every evaluation, not only when val loss improves
    sample_prompts: list = dataclasses.field(  # continued at every evaluation
        default_factory=lambda: ["Once upon a time", "The meaning of life is", "Photosynthesis is"])
    sample_tokens: int = 32             # tokens sampled per prompt (out_dir/samples.jsonl); 0 = no samples
    wandb_log: bool = False             # also log to Weights & Biases (imported only then)
    wandb_project: str = "deepseek-nanogpt"  # the W&B project and run name
    wandb_run_name: str = "run"         # (wandb_log only)
    # data
    dataset: str = "cosmopedia"         # data/<dataset>/ as written by prepare.py (or a path)
    batch_size: int = 16                # sequences per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (over all ranks)
    # the optimizer, with linear warmup, then cosine decay to min_lr at lr_decay_iters
    learning_rate: float = 6e-4         # the peak, reached at the end of the warmup
    min_lr: float = 6e-5                # the floor the cosine decays to (about learning_rate / 10)
    warmup_iters: int = 200             # steps of linear warmup from 0
    lr_decay_iters: int = 5000          # the step where the cosine reaches min_lr (then it stays there)
    max_iters: int = 5000               # optimizer steps in the whole run
    weight_decay: float = 0.1           # on matrices only (not norms, embeddings or the MoE balancing bias)
    beta1: float = 0.9                  # AdamW's momentum
    beta2: float = 0.95                 # AdamW's second-moment decay
    grad_clip: float = 1.0              # clip the global gradient norm to this; 0 = no clipping
    optimizer: str = "muon"             # "muon": Muon for the hidden matrices and experts, AdamW for the rest
                                        # (optim.py; it won the README's time-to-loss study); "adamw": AdamW for all
    muon_lr_ratio: float = 1.0          # Muon's learning rate over the schedule's (which AdamW's groups follow)
    muon_momentum: float = 0.95         # Muon's Nesterov momentum
    muon_scale: str = "match_rms_adamw"  # update scale per matrix: "match_rms_adamw" (Moonshot) or "original" (Keller)
    muon_split_fused: bool = True       # orthogonalize wqkv and gate_up per part (q, k, v; gate, up), not whole
    # system
    device: str = "auto"                # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1", "mps"
    dtype: str = "auto"                 # "auto" (GPUs: bfloat16, float16 on older ones; CPUs: the faster for this
                                        # model), "float32", "bfloat16", "float16"
    compile: bool | None = None         # torch.compile; None = on CUDA only (per block under FSDP)
    fsdp: bool = False                  # shard parameters, gradients and optimizer state across the ranks (FSDP2;
                                        # checkpoints become DCP directories, ckpt.dcp); False = DDP when under torchrun
    seed: int = 1337                    # the initial weights, the data order and the validation windows
    # the model: every ModelConfig field (model.py), e.g. --n_layer=4 --n_routed_experts=8
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)

    def __post_init__(self):
        if self.init_from not in ("scratch", "resume", "smollm2-135m"):
            raise UserError(f"init_from must be scratch, resume or smollm2-135m, not {self.init_from!r}")
        if self.overwrite and self.init_from == "resume":
            raise UserError("--overwrite=True starts a new run in place of out_dir's; it does not go with "
                            "--init_from=resume")
        if self.compile not in (None, True, False):
            raise UserError(f"compile must be True, False or None, not {self.compile!r}")
        for key in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.model.block_size < 1:
            raise UserError(f"block_size must be at least 1, got {self.model.block_size}")
        if self.optimizer not in ("adamw", "muon") or self.muon_scale not in ("match_rms_adamw", "original"):
            raise UserError(f"optimizer must be adamw or muon ({self.optimizer!r}) and muon_scale match_rms_adamw or "
                            f"original ({self.muon_scale!r})")
        if self.muon_lr_ratio <= 0 or not 0 <= self.muon_momentum < 1:
            raise UserError(f"muon_lr_ratio must be above 0 ({self.muon_lr_ratio}) and muon_momentum in [0, 1) "
                            f"({self.muon_momentum})")
        if self.sample_tokens < 0 or not all(isinstance(p, str) and p for p in self.sample_prompts):
            raise UserError("sample_prompts must be a list of non-empty strings and sample_tokens at least 0 "
                            "(0 turns the samples off)")

    @property
    def tokens_per_step(self):
        return self.batch_size * self.gradient_accumulation_steps * self.model.block_size

    @property
    def ckpt_path(self):
        """out_dir's checkpoint as it is now (ckpt.pt, or ckpt.dcp from a run under FSDP): see checkpoint_in."""
        return checkpoint_in(self.out_dir)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = configure(TrainConfig(), argv)
    job = make_job(cfg)
    command = resume_command(argv, job.world)
    check_new_run(cfg, command)  # on every rank, before any of them writes
    if job.master:
        check_writable(cfg.out_dir)
    if job.distributed or job.fsdp:  # FSDP on one process (e.g. resuming on 1 rank) still needs a process group
        store = {} if job.distributed else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        dist.init_process_group(backend="nccl" if job.device.type == "cuda" else "gloo", **store)
    try:
        train(cfg, job, command)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def resume_command(argv, world):
    """The command that continues this run: the same config files and settings with --init_from=resume."""
    args, i = [], 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if arg in ("--init_from", "--overwrite") and i < len(argv) and not argv[i].startswith("--"):
            i += 1  # `--key value`: its value goes too (a bare `--overwrite` has none)
        elif not (arg in ("--init_from", "--overwrite") or arg.startswith(("--init_from=", "--overwrite="))):
            args.append(arg)
    launcher = f"torchrun --standalone --nproc_per_node={world} train.py" if world > 1 else "python train.py"
    return f"{launcher} {shlex.join(args + ['--init_from=resume'])}"


def check_new_run(cfg, command):
    """A new run (from scratch or pretrained weights) never replaces another run's checkpoint unless asked to."""
    if cfg.init_from != "resume" and not cfg.overwrite and os.path.exists(cfg.ckpt_path):
        raise UserError(f"{cfg.out_dir} holds a run ({cfg.ckpt_path}); nothing was written. Continue it with "
                        f"`{command}`, start this one elsewhere with --out_dir=..., or replace it with --overwrite=True")


def make_job(cfg):
    """This process's Job: the ranks torchrun started (or one process) with the global batch split across them
    (each rank runs its share of the micro-batches or, when those do not divide, a slice of every micro-batch),
    its device, precision (dtype=auto on a CPU is settled once the model exists: auto_dtype) and compile."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])) if world > 1 else (0, 0)
    accum, batch = cfg.gradient_accumulation_steps, cfg.batch_size
    if accum % world and batch % world:
        raise UserError(f"neither gradient_accumulation_steps ({accum}) nor batch_size ({batch}) divides "
                        f"across {world} ranks: make one of them a multiple of {world}")
    micro_steps, micro_batch = (accum // world, batch) if accum % world == 0 else (accum, batch // world)
    device = pick_device(cfg.device)
    if device.type == "cuda" and device.index is None:  # this rank's GPU: set_device needs an index
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    use_compile = device.type == "cuda" if cfg.compile is None else cfg.compile
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.fsdp and (dtype == "float16" or device.type == "mps"):
        raise UserError(f"--fsdp=True trains on CUDA GPUs or CPUs in bfloat16 or float32, not {dtype} on {device.type} "
                        "(float16's gradient scaler would need the ranks' shards to agree on overflows): pass "
                        "--dtype=bfloat16 or --dtype=float32, or leave --fsdp off")
    return Job(device, dtype, use_compile, world, rank, local_rank, micro_steps, micro_batch, cfg.fsdp)


def check_writable(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to out_dir {out_dir} ({e.strerror or type(e).__name__}): pick another --out_dir")


@dataclass
class Run:
    """One training run: what the loop reads and changes, kept together."""
    cfg: TrainConfig
    job: Job
    data: Dataset
    state: TrainState
    model: torch.nn.Module              # state.model as training runs it: compiled and/or DDP-wrapped
    tokenizer: str | None               # the tokenizer's JSON, saved in every checkpoint
    progress: Progress = None
    stop: "Stop" = None
    tok: Tokenizer | None = None        # for samples and bits per byte (rank 0, where there is a tokenizer)
    val_bytes: int = 0                  # UTF-8 bytes of the validation text, for bits per byte (0: no tokenizer)
    resume_command: str = ""            # the command that continues this run


def train(cfg, job, command):
    """command: the one that resumes this run, for the messages that say how to continue it."""
    run = start_run(cfg, job)
    run.resume_command = command
    handlers = {s: signal.signal(s, on_signal(run.stop)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        loop(run)
    except Interrupted:  # at a step boundary: the last completed step is what the checkpoint holds
        interrupted(run)
    finally:
        run.progress.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    state = run.state
    run.progress.say(f"done: {state.iter_num} iterations, {state.tokens_seen:,} tokens, "
                     f"best val loss {state.best_val_loss:.4f}")


def start_run(cfg, job):
    """The data, the model (from scratch, a checkpoint or pretrained weights), its precision, optimizer and state,
    and the lines that say what is about to happen."""
    data = open_dataset(cfg.dataset, cfg.model.block_size)
    ckpt = load_checkpoint(cfg.ckpt_path) if cfg.init_from == "resume" else None
    model, tokenizer = build_model(cfg, ckpt, data)
    dtype_note = ""
    if cfg.dtype == "auto":
        job.dtype, dtype_note = auto_dtype(cfg, ckpt, model, job)
    cfg = dataclasses.replace(cfg, dtype=job.dtype)  # the checkpoint records the precision the run trains in
    model = shard(model, job)  # before the optimizer: FSDP replaces the parameters with their shards
    state = new_state(cfg, model, job, data)
    if ckpt is not None:
        restore_state(state, ckpt)
    torch.manual_seed(cfg.seed + job.rank)  # dropout differs across ranks
    if ckpt is not None:
        restore_rng(ckpt, job)
    del ckpt  # its tensors now live in the model and optimizer
    run = Run(cfg, job, data, state, wrap(model, job), data.tokenizer or tokenizer, stop=Stop())
    if run.tokenizer and (job.master or job.fsdp):  # under FSDP every rank takes part in the samples' forwards
        run.tok = Tokenizer.from_str(run.tokenizer)
        run.val_bytes = text_bytes(run.tok, data.val, state.val_windows, data.meta["eot_id"])
    if cfg.overwrite and job.master:  # asked for, and every setting checked: the earlier run goes now
        for name in (PLAIN, SHARDED):
            remove_checkpoint(os.path.join(cfg.out_dir, name))
        for name in ("metrics.jsonl", "samples.jsonl"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(cfg.out_dir, name))
    peak, peak_note = peak_flops(job.device, job.dtype) if job.master else (None, "")
    run.progress = Progress(cfg, state, job.master,
                            Rate(cfg.tokens_per_step, model.flops_per_token(cfg.model.block_size),
                                 peak * job.world if peak else None, measured=job.device.type == "cpu"))
    for line in describe(run, peak_note, dtype_note) + plan(run, peak):
        run.progress.say(line)
    return run


def build_model(cfg, ckpt, data):
    """(the model, on the CPU in training mode; the pretrained tokenizer's JSON or None): from scratch, from
    the checkpoint, or from SmolLM2-135M's weights with this run's block_size and dropout. The vocabulary is the
    dataset's unless vocab_size is set (e.g. padded to a multiple of 64)."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    tokenizer, vocab = None, data.meta["vocab_size"]
    unset = () if cfg.model.vocab_size else ("vocab_size",)  # what check_same_model leaves to check_vocab
    if cfg.init_from == "smollm2-135m":
        import pretrained  # loads 135M weights: only when asked
        model, tok = pretrained.smollm2_135m()
        # the architecture is SmolLM2's; the context length and dropout of this run may differ
        check_same_model(cfg.model, model.config, "SmolLM2-135M", ignore=("block_size", "dropout") + unset)
        if (model.config.block_size, model.config.dropout) != (cfg.model.block_size, cfg.model.dropout):
            ours = dataclasses.replace(model.config, block_size=cfg.model.block_size, dropout=cfg.model.dropout)
            state, model = model.state_dict(), Transformer(ours)
            model.load_state_dict(state)  # the RoPE tables are rebuilt, not loaded
        tokenizer = tok.to_str()
        check_vocab(model.config.vocab_size, vocab, data, "SmolLM2-135M (the cosmo2 tokenizer)")
    elif ckpt is not None:
        model = model_from_checkpoint(ckpt, weights="sharded" not in ckpt)  # restore_state loads a DCP directory's
        check_same_model(cfg.model, model.config, f"checkpoint {cfg.ckpt_path}", ignore=("mtp_loss_weight",) + unset)
        # the MTP loss weight may change on resume (DeepSeek-V3 went from 0.3 to 0.1 for its last 4.8T tokens)
        model.config = dataclasses.replace(model.config, mtp_loss_weight=cfg.model.mtp_loss_weight)
        check_same_optimizer(cfg, ckpt)
        if unset:
            check_vocab(model.config.vocab_size, vocab, data, f"the checkpoint {cfg.ckpt_path}")
    else:
        model = Transformer(dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or vocab))
    if vocab > model.config.vocab_size:
        raise UserError(f"{data.dir} has a vocabulary of {vocab} tokens but the model's vocab_size "
                        f"is {model.config.vocab_size}: set --vocab_size={vocab} or more (or leave it unset)")
    return model.train(), tokenizer


def check_vocab(model_vocab, data_vocab, data, what):
    """A model trained on other token ids than the dataset's would read it as noise: refuse, with the numbers."""
    if model_vocab != data_vocab:
        raise UserError(f"{data.dir} has a vocabulary of {data_vocab:,} tokens but {what} has {model_vocab:,}: "
                        "train it on data prepared with its tokenizer (--dataset=...)")


def check_same_optimizer(cfg, ckpt):
    """Refuse to resume a checkpoint with another optimizer: its state (moments, momenta, groups) fits one rule."""
    trained_with = ckpt["settings"].get("optimizer", "adamw")  # checkpoints from before optim.py: AdamW
    if trained_with != cfg.optimizer:
        raise UserError(f"checkpoint {cfg.ckpt_path} was trained with --optimizer={trained_with}, not "
                        f"{cfg.optimizer}: resume with --optimizer={trained_with}, or start a new run")


def check_same_model(wanted, found, what, ignore=()):
    """Refuse to continue `what` (a checkpoint, pretrained weights) whose ModelConfig `found` is not the settings'."""
    diff = [f"{k}={v!r} (the settings say {getattr(wanted, k)!r})" for k, v in dataclasses.asdict(found).items()
            if k not in ignore and getattr(wanted, k) != v]
    if diff:
        raise UserError(f"{what} has a different model: {', '.join(diff[:4])}; "
                        "use the config file it was trained with")


def auto_dtype(cfg, ckpt, model, job):
    """(dtype, why) for dtype=auto once the model exists. A resumed run keeps the precision its checkpoint was
    trained in, so that a noisy timing cannot change it mid-run. A new run on a CPU takes what auto_cpu_dtype
    measures for this model (rank 0 decides for all); on a GPU, pick_dtype's choice."""
    if ckpt is not None and ckpt["settings"].get("dtype") in DTYPES:
        return ckpt["settings"]["dtype"], "dtype=auto keeps the checkpoint's precision"
    if job.device.type != "cpu":
        return job.dtype, "dtype=auto on this GPU"
    choice = [None]
    if job.master:
        block = cfg.model.block_size
        peaks = {d: cpu_matmul_peak(torch.get_num_threads(), d) for d in ("float32", "bfloat16")}
        flops_per_step = model.flops_per_token(block) * job.micro_batch * block
        choice = [auto_cpu_dtype(step_timer(model, job.micro_batch, block), peaks, flops_per_step)]
    if job.distributed:
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
                _, losses = twin(x, x)
            losses.total.backward()
            twin.zero_grad(set_to_none=True)
            return time.perf_counter() - t0
    return time_step


def new_state(cfg, model, job, data):
    """A fresh TrainState: the optimizer (optim.py: AdamW, or Muon and AdamW), the grad scaler (float16 only), the
    data order's generator, and the fixed validation windows drawn from their own seed."""
    optimizer = build_optimizer(model, cfg, job)
    scaler = torch.amp.GradScaler(job.device.type, enabled=job.dtype == "float16")
    val_gen = torch.Generator().manual_seed(cfg.seed + 1)
    val_windows = torch.randint(data.val.windows, (cfg.eval_iters, cfg.batch_size), generator=val_gen)
    return TrainState(model, optimizer, scaler, torch.Generator().manual_seed(cfg.seed), val_windows)


def shard(model, job):
    """The model on its device, and under FSDP (job.fsdp) sharded in place with FSDP2's fully_shard, as torchtitan
    does: each block, each MTP module, then the root (embedding, final norm, head) keep 1/world of their parameters
    on this rank, all-gathered for their forward and backward and freed after, their gradients reduce-scattered.
    In bfloat16 the gathered parameters are bfloat16 (the shards, gradients and optimizer stay float32) and the
    gradients are reduced in float32. Buffers are not sharded: the balancing biases stay whole on every rank, equal
    since every rank applies the same all-reduced counts. With job.compile, each block is compiled on its own."""
    if not job.fsdp:
        return model.to(job.device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(job.device.type, (job.world,))  # fully_shard moves the shards to this device
    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if job.dtype == "bfloat16" else MixedPrecisionPolicy()
    for block in [*model.layers, *model.mtp]:
        if job.compile:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=precision)
    return fully_shard(model, mesh=mesh, mp_policy=precision)


def wrap(model, job):
    """The model as training runs it: compiled (job.compile; under FSDP shard compiled its blocks) and, under DDP,
    wrapped so that gradients are all-reduced. broadcast_buffers=False: the ranks' expert counters must not be
    overwritten by rank 0's; the balancing biases stay equal anyway, since every rank applies the same all-reduced
    counts."""
    if job.fsdp:
        return model
    if job.compile:
        model = torch.compile(model)
    if job.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[job.device.index] if job.device.type == "cuda" else None, broadcast_buffers=False)
    return model


def describe(run, peak_note, dtype_note):
    """The startup lines: the model, the batch, the precision, the experts' path, the data."""
    cfg, job, model, state = run.cfg, run.job, run.state.model, run.state
    mtp_params = sum(p.numel() for p in model.mtp.parameters())
    lines = [f"model: {model.num_params():,} parameters, {model.num_params(active=True):,} active per token "
             f"({model.config.attention}, {'MoE' if model.moe_layers() else 'dense'}, {model.config.n_layer} layers"
             + (f"; {len(model.mtp)} MTP module(s), {mtp_params:,} of the parameters" if mtp_params else "") + ")",
             f"tokens per step: {run.cfg.tokens_per_step:,} = {job.world} rank(s) x {job.micro_steps} micro-steps x "
             f"{job.micro_batch} sequences x {cfg.model.block_size} tokens; {cfg.max_iters:,} steps = "
             f"{run.cfg.tokens_per_step * cfg.max_iters:,} tokens",
             f"precision: {job.dtype} on {job.device}{', torch.compile' if job.compile else ''}"
             + (f", FSDP over {job.world} rank(s)" if job.fsdp else "")
             + (f" ({dtype_note})" if dtype_note else "") + f"; MFU against {peak_note}"]
    if model.moe_layers():
        lines.append(f"MoE experts: {experts_path(job)}")
    qk, v = model.config.qk_nope_head_dim + model.config.qk_rope_head_dim, model.config.v_head_dim
    if model.config.attention == "mla" and v < qk:
        lines.append(f"MLA attention: {attention_path(job, qk, v)}")
    vocab, data_vocab = model.config.vocab_size, run.data.meta["vocab_size"]
    lines.append(f"data: {run.data.dir} ({run.data.train.tokens:,} train tokens; the model's vocabulary: "
                 + (f"its {vocab:,} tokens" if vocab == data_vocab else f"{vocab:,} (vocab_size), its {data_vocab:,}")
                 + "); "
                 + (f"resuming at iteration {state.iter_num}" if state.start_iter else f"init from {cfg.init_from}"))
    return lines


def attention_path(job, qk, v):
    """How MLA's attention runs its value heads (v dims, narrower than the qk of queries and keys), in words."""
    if unpadded_attention_runs(job.device, DTYPES[job.dtype], qk, v):
        return f"values unpadded ({v} dims, queries and keys {qk}), cuDNN's kernel"
    return (f"values zero-padded from {v} to {qk} dims for a fused kernel (unpadded needs cuDNN's, on a CUDA GPU in "
            "bfloat16 or float16)")


def experts_path(job):
    """How the routed experts run in this job, in words."""
    dtype = DTYPES[job.dtype]
    if not grouped_mm_runs(job.device, dtype):
        return ("a loop over the experts (grouped GEMMs need torch >= 2.10 and a CPU, or bfloat16 on a "
                "CUDA GPU of compute capability 9.x or 10.x)")
    if job.compile and dtype != torch.bfloat16:
        return f"grouped GEMMs, run outside the compiled graph in {job.dtype} (inductor's take bfloat16 only)"
    return "grouped GEMMs (F.grouped_mm)"


def plan(run, peak):
    """Lines saying how long the plan takes here, from the model's FLOPs and the measured peak (at 50% MFU),
    with a warning when it takes more than a day, and a note when it reads the data many times over."""
    cfg, lines = run.cfg, []
    if peak:
        rate = 0.5 * peak * run.job.world
        step = run.state.model.flops_per_token(cfg.model.block_size) * run.cfg.tokens_per_step / rate
        evaluation = step / 3 * cfg.eval_iters / cfg.gradient_accumulation_steps  # forward only
        total = cfg.max_iters * step + (cfg.max_iters // cfg.eval_interval + 1) * evaluation
        lines.append(f"estimate at 50% MFU: {duration(step)} per step, {duration(evaluation)} per evaluation, "
                     f"{duration(total)} for {cfg.max_iters:,} steps")
        if total > 86400:
            lines.append(f"warning: this plan takes about {duration(total)} on {run.job.device}: for a first run here "
                         "use config/cpu_moe.py, or fewer max_iters and eval_iters, or a GPU (stop with Ctrl-C)")
    train_tokens = run.data.train.tokens
    epochs = run.cfg.tokens_per_step * cfg.max_iters / max(train_tokens, 1)
    if epochs >= 2:
        lines.append(f"note: {cfg.max_iters:,} steps read {run.cfg.tokens_per_step * cfg.max_iters:,} tokens, "
                     f"{epochs:,.1f} times the {train_tokens:,} training tokens of {cfg.dataset}: the model "
                     f"will memorise them; " + more_data(run.data, run.cfg.tokens_per_step * cfg.max_iters))
    return lines


def duration(seconds):
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.1f} s"

# -----------------------------------------------------------------------------
# the loop: evaluate when due, then one optimizer step, until max_iters or a signal


def loop(run):
    cfg, state = run.cfg, run.state
    while True:
        lr = get_lr(state.iter_num, cfg)
        for group in state.optimizer.param_groups:  # Muon's groups (optim.py) follow the schedule at their ratio
            group["lr"] = lr * (cfg.muon_lr_ratio if group.get("use_muon") else 1.0)
        if run.stop.now(run.job):
            raise Interrupted(run.stop.signal or signal.SIGTERM)
        if (state.iter_num % cfg.eval_interval == 0 or state.iter_num == cfg.max_iters) and \
                state.evaluated != state.iter_num:  # a resumed run's checkpoint may have evaluated already
            evaluation(run)
        if state.iter_num >= cfg.max_iters:
            return
        t0 = time.perf_counter()
        result = optimizer_step(run)
        if not math.isfinite(result.loss):  # the weights in memory are spoiled, the checkpoint is not
            raise UserError(f"loss is {result.loss} at iteration {state.iter_num}; stopped without saving, "
                            f"{run.cfg.ckpt_path} is the last good checkpoint (try a lower learning_rate)")
        state.iter_num += 1
        state.tokens_seen += run.cfg.tokens_per_step
        run.stop.all_ranks = result.stop
        run.progress.step(state, result, lr, time.perf_counter() - t0)


def get_lr(it, cfg):
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters (nanoGPT)."""
    lr, min_lr, warmup, decay = cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it >= decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def evaluation(run):
    """Evaluate, sample, report; checkpoint when the val loss improved or always_save_checkpoint asks. All of it
    or none: an interrupted evaluation is redone on resume. A NaN val loss stops the run without saving."""
    state = run.state
    result = evaluate(run)
    if not math.isfinite(result.loss):
        raise UserError(f"validation loss is {result.loss} at iteration {state.iter_num}; stopped without "
                        f"saving, {run.cfg.ckpt_path} is the last good checkpoint")
    if run.tok and run.cfg.sample_tokens:
        result.samples = generate_samples(run)
    run.progress.evaluation(state, result)
    state.evaluated = state.iter_num
    if result.loss < state.best_val_loss or run.cfg.always_save_checkpoint:
        state.best_val_loss = min(state.best_val_loss, result.loss)
        if state.iter_num > state.start_iter:
            save(run, "evaluation")


@torch.no_grad()
def evaluate(run):
    """The fixed validation batches' EvalResult (without samples), shared out across ranks. The loss is the main
    head's cross-entropy, as the train loss is: the MoE auxiliary loss is a training regulariser, not part of what
    the model predicts, and the MTP modules' losses are reported apart, so that runs with and without MTP compare.
    Its bar goes away when it ends."""
    model, state, job, eot = run.model, run.state, run.job, run.data.meta["eot_id"]
    depth = state.model.config.mtp_depth
    total = torch.zeros(3 + depth, device=job.device)  # sum of batch means, batches, nats of the text targets, MTP's
    n = len(state.val_windows)
    model.eval()
    with interruptible(run.stop, job):
        # each rank its share; under FSDP every rank runs as many forwards (they gather parameters together): a rank
        # past the end repeats the last batch and counts it 0 times
        for k in tqdm(range(job.rank, -(-n // job.world) * job.world if job.fsdp else n, job.world), desc="eval",
                      leave=False, disable=not job.master, dynamic_ncols=True):
            x, y = run.data.val.batch(state.val_windows[min(k, n - 1)], job.device)
            with autocast(job.device, job.dtype):
                _, losses = model(x, y)
            terms = torch.cat([torch.stack([losses.main.float(), torch.ones_like(losses.main),
                                            losses.nats[y != eot].sum()]), losses.mtp.float()])
            total += terms * (k < n)
    model.train()
    total = all_sum(total, job.distributed)
    bpb = total[2].item() / math.log(2) / run.val_bytes if run.val_bytes else None
    return EvalResult((total[0] / total[1]).item(), bpb, (total[3:] / total[1]).tolist(), [])


@torch.no_grad()
def generate_samples(run):
    """Continuations of the fixed prompts, from a generator seeded the same at every evaluation (the training
    RNG is untouched), in eval mode; [(prompt, continuation)]."""
    model, job, cfg = run.state.model, run.job, run.cfg
    generator = torch.Generator(device=job.device).manual_seed(cfg.seed)
    samples = []
    model.eval()
    if job.fsdp:  # decoding calls the blocks (which gather their own parameters) and the root's head: gather the root's
        model.unshard()
    with interruptible(run.stop, job), autocast(job.device, job.dtype):
        for prompt in cfg.sample_prompts:
            ids = torch.tensor([run.tok.encode(prompt).ids[-model.config.block_size:]], device=job.device)
            new = generate(model, ids, cfg.sample_tokens, Sampling(temperature=0.8, top_k=200, generator=generator))
            samples.append((prompt, run.tok.decode(new[0, ids.size(1):].tolist())))
    if job.fsdp:
        model.reshard()
    model.train()
    return samples


def optimizer_step(run):
    """One optimizer step on this rank's share of the step's global batch; its StepResult."""
    state, job, cfg = run.state, run.job, run.cfg
    boundary = (state.data_gen.get_state(), torch.get_rng_state(),  # (the CUDA RNG's state lives on the host)
                torch.cuda.get_rng_state(job.device) if job.device.type == "cuda" else None)
    windows = torch.randint(run.data.train.windows, (cfg.gradient_accumulation_steps, cfg.batch_size),
                            generator=state.data_gen)
    if job.micro_steps * job.world == cfg.gradient_accumulation_steps:
        mine = windows.view(job.world, job.micro_steps, -1)[job.rank]     # whole micro-batches
    else:
        mine = windows.view(job.micro_steps, job.world, -1)[:, job.rank]  # a slice of every micro-batch
    losses = torch.zeros(2 + state.model.config.mtp_depth, device=job.device)  # main, aux, each MTP module's
    try:
        with interruptible(run.stop, job):
            for micro in range(job.micro_steps):
                losses += micro_step(run, mine[micro], last=micro == job.micro_steps - 1)
    except Interrupted:  # the run checkpoints the step's start: its batches and dropout draws come again on resume
        state.data_gen.set_state(boundary[0])
        torch.set_rng_state(boundary[1])
        if boundary[2] is not None:
            torch.cuda.set_rng_state(boundary[2], job.device)
        raise
    # from here the step completes whatever arrives: a signal is acted on at the step's end
    state.scaler.unscale_(state.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip or float("inf"))
    if isinstance(grad_norm, DTensor):  # FSDP: the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if state.iter_num == state.start_iter:  # the gradients and the optimizer's state exist now
        run.progress.say(memory_line(state, job))
    state.optimizer.zero_grad(set_to_none=True)
    return step_results(run, losses / (job.micro_steps * job.world), grad_norm)


def memory_line(state, job):
    """The line saying how many bytes this rank holds of the parameters, their gradients and the optimizer's state
    (its shards under FSDP), and per parameter of the model."""
    held = held_bytes(state.model.parameters(), state.optimizer)
    per = sum(held.values()) / state.model.num_params()
    return (f"memory of rank {job.rank}" + (f" (FSDP over {job.world})" if job.fsdp else "") + ": "
            + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in held.items())
            + f"; {per:.2f} bytes per parameter of the model")


def micro_step(run, windows, last):
    """Forward and backward of one micro-batch, its loss scaled by 1 / micro-steps so that the step's gradient is
    the mean over its micro-batches; the detached loss terms [main, aux, MTP...]."""
    job = run.job
    x, y = run.data.train.batch(windows, job.device)
    if job.fsdp:  # gradients are reduce-scattered, and parameters resharded, after the last micro-step only
        run.model.set_requires_gradient_sync(last)
        run.model.set_reshard_after_backward(last)
    elif job.distributed:  # gradients are all-reduced on the last micro-step only
        run.model.require_backward_grad_sync = last
    with autocast(job.device, job.dtype):
        _, losses = run.model(x, y)
    run.state.scaler.scale(losses.total / job.micro_steps).backward()
    return torch.cat([torch.stack([losses.main, losses.aux]), losses.mtp]).detach().float()


def step_results(run, losses, grad_norm):
    """Finish an optimizer step with one all-reduce and one wait for the device (the step's only sync).

    Sums over the ranks the step's mean losses (a share per rank), whether any rank was signalled to stop, and
    the tokens each expert received (MoE); applies loss-free balancing with those whole-step counts."""
    model = run.state.model
    counts = model.pop_expert_counts()                                    # [layers, E]; [0, 0] if dense
    n = len(losses)
    shared = all_sum(torch.cat([losses.new_full((1,), float(run.stop.signal)), losses, counts.flatten()]),
                     run.job.distributed)
    stop, losses, counts = shared[0], shared[1:1 + n], shared[1 + n:].view_as(counts)
    model.update_router_bias(counts)
    vio = max_violation(counts) if counts.numel() else counts.new_zeros(0)
    host = torch.cat([stop.view(1), losses, grad_norm.float().view(1), vio, counts.flatten()]).cpu()
    main, aux, *mtp = host[1:1 + n].tolist()
    return StepResult(loss=main, mtp=mtp, aux=aux, grad_norm=host[1 + n].item(), stop=host[0].item() > 0,
                      vio=host[2 + n:2 + n + len(vio)], counts=host[2 + n + len(vio):].view_as(counts))


def all_sum(x, distributed):
    """Sum a tensor over the ranks (in place) when there are several (DDP or FSDP)."""
    if distributed:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def save(run, reason):
    """Checkpoint the run at its last step; all ranks call it (for their RNG states), rank 0 writes, or under FSDP
    every rank writes its shards."""
    rng = rng_states(run.job)
    if run.job.master or run.job.fsdp:
        path = save_state(run.cfg.out_dir, run.state, run.cfg, run.tokenizer, rng)
        run.progress.say(f"saved {path} at iteration {run.state.iter_num} ({reason})")

# -----------------------------------------------------------------------------
# Ctrl-C and SIGTERM: back to the last step boundary, checkpoint, exit


@dataclass
class Stop:
    signal: int = 0                     # a SIGINT/SIGTERM caught on this rank
    interruptible: bool = False         # True while a signal may stop the work at once (see Interrupted)
    all_ranks: bool = False             # some rank was signalled, as the last step's all-reduce said

    def now(self, job):
        """Stop before the next step: all ranks at the same step under DDP, at once on a single process."""
        return self.all_ranks or (self.signal and not job.distributed)


class Interrupted(Exception):
    """Raised by the signal handler inside interruptible work (forward and backward passes, evaluation,
    samples), so that Ctrl-C or SIGTERM stops within seconds; the run then goes back to its last step boundary."""


def on_signal(stop):
    def handler(signum, frame):
        stop.signal = signum
        if stop.interruptible:
            stop.interruptible = False
            raise Interrupted(signum)
    return handler


@contextlib.contextmanager
def interruptible(stop, job):
    """Lets a signal stop the work inside at once, on a single process (under DDP the ranks stop together at
    the end of a step instead: one of them stopping alone would leave the others waiting in a collective)."""
    stop.interruptible = not (job.distributed or job.fsdp)  # FSDP: never inside its gathers
    try:
        yield
    finally:
        stop.interruptible = False


def interrupted(run):
    """Checkpoint the last completed step (if this run made one) and exit with 128 + the signal's number."""
    signum, state = run.stop.signal or signal.SIGTERM, run.state
    progressed = state.iter_num > state.start_iter
    run.progress.close()
    if progressed:  # else nothing new: an earlier run's checkpoint stays as it is
        save(run, f"signal {signal.Signals(signum).name}")
    if progressed:
        outcome = f"continue with: {run.resume_command}"
    elif os.path.exists(run.cfg.ckpt_path):
        outcome = f"nothing new to save, {run.cfg.ckpt_path} is unchanged; continue with: {run.resume_command}"
    else:
        outcome = "no step had completed: nothing was saved"
    run.progress.say(f"interrupted at iteration {state.iter_num}; {outcome}")
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    run_main(main)
