"""
A training run's state and its checkpoint, the one place that writes and reads the format; train.py saves and
restores it, sample.py and export.py read the model and tokenizer from it. One file, written to a temporary name
and renamed, holding only tensors, numbers, strings, lists and dicts, so that torch.load(weights_only=True)
reads it and no pickled code ever runs: the model's state dict and its ModelConfig fields (model_config), the
run's other settings (settings, with the precision it trained in), the tokenizer's JSON, and what exact resume
needs (optimizer, grad scaler, iteration, tokens seen, best val loss, evaluated, RNG states, the validation
windows).
"""

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from atomic import atomic_write
from configurator import UserError, first_line, from_settings
from model import ModelConfig, Transformer
from tokenizer import load_tokenizer


@dataclass
class TrainState:
    """What the following steps of a run depend on, saved at a step boundary and restored exactly on resume."""
    model: Transformer                  # the weights, with the MoE balancing biases (buffers)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    data_gen: torch.Generator           # the train batches' order (the same on every rank)
    val_windows: torch.Tensor           # the fixed validation batches [eval_iters, batch_size], so evaluations compare
    iter_num: int = 0
    tokens_seen: int = 0
    best_val_loss: float = float("inf")
    evaluated: int = -1                 # the iteration of the last finished evaluation
    start_iter: int = 0                 # where this process began (0, or the checkpoint's iteration); not saved


def save_state(path, state, cfg, tokenizer, rng):
    """A checkpoint of the run at its last step: state, the run's settings cfg (a TrainConfig; the model's fields
    are saved once, as the model's model_config), the tokenizer's JSON (or None) and every rank's RNG states."""
    save_checkpoint({
        "model": state.model.state_dict(), "model_config": dataclasses.asdict(state.model.config),
        "settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "model"},
        "tokenizer": tokenizer, "optimizer": state.optimizer.state_dict(), "scaler": state.scaler.state_dict(),
        "iter_num": state.iter_num, "tokens_seen": state.tokens_seen, "best_val_loss": state.best_val_loss,
        "evaluated": state.evaluated, "data_rng": state.data_gen.get_state(), "rng": rng,
        "val_windows": state.val_windows,
    }, path)


def restore_state(state, ckpt):
    """Continue state (freshly built for this run) from a checkpoint: optimizer, grad scaler, data order, counters,
    and the validation windows where this run asks for the same number of the same size."""
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scaler.load_state_dict(ckpt["scaler"])
    state.data_gen.set_state(ckpt["data_rng"])
    state.iter_num = state.start_iter = ckpt["iter_num"]
    state.tokens_seen, state.best_val_loss, state.evaluated = ckpt["tokens_seen"], ckpt["best_val_loss"], ckpt["evaluated"]
    if ckpt["val_windows"].shape == state.val_windows.shape:
        state.val_windows = ckpt["val_windows"]


def rng_states(job):
    """Every rank's torch RNG states, for save_state (each rank must call it: under DDP it gathers them)."""
    device = job.device
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if not job.ddp:
        return [state]
    states = [None] * job.world
    dist.all_gather_object(states, state)
    return [{k: v if v is None else v.cpu() for k, v in s.items()} for s in states]


def restore_rng(ckpt, job):
    """This rank's torch RNG states from a checkpoint written by as many ranks (else they stay as seeded)."""
    if len(ckpt["rng"]) != job.world:
        return
    mine = ckpt["rng"][job.rank]
    torch.set_rng_state(mine["cpu"])
    if job.device.type == "cuda" and mine["cuda"] is not None:
        torch.cuda.set_rng_state(mine["cuda"], job.device)


def save_checkpoint(ckpt, path):
    """Write `ckpt` to `path` atomically: a reader (or a resume after a kill) sees the old file or the new one."""
    with atomic_write(path, "wb") as f:
        torch.save(ckpt, f)


def load_checkpoint(path):
    """Load a checkpoint written by train.py onto the CPU, never with pickle; bad files raise UserError."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one first (python train.py CONFIG) or pass the --out_dir of "
                        "a trained run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Unsupported global" in str(e):  # weights_only refused a python class: pickle would run code
            raise UserError(f"{path} holds python objects that only pickle can load; refusing to run "
                            "its code (only checkpoints written by train.py are supported)")
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt: {first_line(e) or type(e).__name__})")
    missing = [k for k in ("model", "model_config", "settings") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a train.py checkpoint (no {', '.join(missing)})")
    return ckpt


def model_from_checkpoint(ckpt):
    """Rebuild the Transformer a checkpoint holds, on the CPU, in eval mode."""
    cfg = from_settings(ModelConfig, ckpt["model_config"], where="the checkpoint's model_config", strict=True)
    model = Transformer(cfg)
    try:
        keys = model.load_state_dict(ckpt["model"], strict=False)
    except RuntimeError as e:  # wrong tensor shapes
        raise UserError(f"checkpoint does not match this model.py: {' '.join(str(e).split())[:300]}")
    if keys.missing_keys or keys.unexpected_keys:
        raise UserError(f"checkpoint does not match this model.py: it lacks {keys.missing_keys[:3]} and has "
                        f"{keys.unexpected_keys[:3]}; it was written by another version of model.py")
    return model.eval()


def checkpoint_tokenizer(ckpt):
    """The tokenizer the model was trained with: saved in the checkpoint, else the one beside its data."""
    if ckpt.get("tokenizer"):
        return Tokenizer.from_str(ckpt["tokenizer"])
    path = os.path.join("data", str(ckpt["settings"].get("dataset")), "tokenizer.json")  # where train.py read it
    if not os.path.isfile(path):
        raise UserError(f"the checkpoint holds no tokenizer and {path} does not exist: run prepare.py for its dataset")
    return load_tokenizer(path)
