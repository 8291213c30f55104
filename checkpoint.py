"""
A training run's state and its checkpoint, the one place that writes and reads the format; train.py saves and
restores it, sample.py, export.py and serve.py read the model and tokenizer from it. A checkpoint holds the model's
state dict and its ModelConfig fields (model_config), the run's other settings (settings, with the precision it
trained in), the tokenizer's JSON, and what exact resume needs (optimizer, grad scaler, iteration, tokens seen, best
val loss, evaluated, RNG states, the validation windows). It comes in two forms, both read by load_checkpoint:

- out_dir/ckpt.pt, one file (a run on one process or under DDP): written by rank 0 to a temporary name and renamed,
  holding only tensors, numbers, strings, lists and dicts, so that torch.load(weights_only=True) reads it and no
  pickled code ever runs.
- out_dir/ckpt.dcp/, a directory (a run under FSDP): torch.distributed.checkpoint (DCP) writes the model and
  optimizer tensors, each rank its own shards in parallel, and rank 0 adds train.pt with everything else. It is
  written as ckpt.dcp.tmp/ and swapped in by two renames (ckpt.dcp -> ckpt.dcp.old, ckpt.dcp.tmp -> ckpt.dcp): a
  run killed at any moment leaves ckpt.dcp or, between the renames, ckpt.dcp.old whole. DCP reads it back on any
  number of ranks, resharding as it loads (or whole, on one process), never unpickling more than its metadata
  through an allow-list (SafeReader) and never a python object (TensorsOnly).

Whichever form a run writes, it then removes the other, so that out_dir holds one run.
"""

import dataclasses
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from tokenizers import Tokenizer
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

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


PLAIN, SHARDED = "ckpt.pt", "ckpt.dcp"  # the two forms, in out_dir


def save_state(out_dir, state, cfg, tokenizer, rng):
    """Checkpoint the run at its last step into out_dir, as the form cfg.fsdp says, and remove the other form; the
    path written. state: the TrainState; cfg: the run's settings (a TrainConfig; the model's fields are saved once, as
    the model's model_config); tokenizer: its JSON or None; rng: every rank's RNG states. Every rank calls it under
    FSDP (each writes its shards), rank 0 alone otherwise."""
    record = {
        "model_config": dataclasses.asdict(state.model.config),
        "settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "model"},
        "tokenizer": tokenizer, "scaler": state.scaler.state_dict(),
        "iter_num": state.iter_num, "tokens_seen": state.tokens_seen, "best_val_loss": state.best_val_loss,
        "evaluated": state.evaluated, "data_rng": state.data_gen.get_state(), "rng": rng,
        "val_windows": state.val_windows,
    }
    path, other = os.path.join(out_dir, SHARDED), os.path.join(out_dir, PLAIN)
    if cfg.fsdp:
        save_sharded(path, state, record)
    else:
        path, other = other, path
        save_checkpoint({**record, "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict()}, path)
    if not dist.is_initialized() or dist.get_rank() == 0:
        remove_checkpoint(other)
    return path


def save_sharded(path, state, record):
    """The DCP directory `path` (see the top of this file), written by every rank: its shards of the model and
    optimizer tensors (get_state_dict: keyed by parameter name, so that another number of ranks can load them), and
    rank 0's train.pt with the rest."""
    tmp, old, master = path + ".tmp", path + ".old", dist.get_rank() == 0
    if master:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier
    dist.barrier()
    model, optimizer = get_state_dict(state.model, state.optimizer)
    dcp.save({"model": model, "optimizer": optimizer["state"]}, checkpoint_id=tmp)  # tensors only: no pickle to load
    if master:  # dcp.save returns on rank 0 once every rank's files and the metadata are written
        save_checkpoint(record, os.path.join(tmp, "train.pt"))
        if os.path.isdir(path):
            shutil.rmtree(old, ignore_errors=True)  # ckpt.dcp is whole: an .old beside it is a leftover
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()  # no rank goes on (and may save again) before the swap


def remove_checkpoint(path):
    """Remove a checkpoint of either form (a file, or a DCP directory with its .old and .tmp), if there."""
    if path.endswith(SHARDED):
        for p in (path, path + ".old", path + ".tmp"):
            shutil.rmtree(p, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def checkpoint_in(out_dir):
    """The path of out_dir's checkpoint: ckpt.pt or the DCP directory ckpt.dcp (ckpt.dcp.old when a run was killed
    between its renames), the newer where both are there (a run killed before it removed the other form); ckpt.pt's
    path when there is none, for the message that says so."""
    found = [p for p in (os.path.join(out_dir, n) for n in (PLAIN, SHARDED, SHARDED + ".old")) if os.path.exists(p)]
    if not found:
        return os.path.join(out_dir, PLAIN)
    written = lambda p: os.path.getmtime(os.path.join(p, "train.pt") if os.path.isdir(p) else p)
    return max(found, key=written)


def restore_state(state, ckpt):
    """Continue state (freshly built for this run: its model holds the checkpoint's weights if the checkpoint is one
    file) from a checkpoint: optimizer (and, from a DCP directory, the model), grad scaler, data order, counters, and
    the validation windows where this run asks for the same number of the same size."""
    if "sharded" in ckpt:
        load_sharded(ckpt["sharded"], state.model, state.optimizer)
    elif any(isinstance(p, DTensor) for p in state.model.parameters()):  # a one-file checkpoint continued under FSDP
        shard_optimizer_state(state.optimizer, ckpt["optimizer"])
    else:
        state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scaler.load_state_dict(ckpt["scaler"])
    state.data_gen.set_state(ckpt["data_rng"])
    state.iter_num = state.start_iter = ckpt["iter_num"]
    state.tokens_seen, state.best_val_loss, state.evaluated = ckpt["tokens_seen"], ckpt["best_val_loss"], ckpt["evaluated"]
    if ckpt["val_windows"].shape == state.val_windows.shape:
        state.val_windows = ckpt["val_windows"]


def load_sharded(path, model, optimizer=None):
    """Load a DCP directory's model (and optimizer) tensors into `model` (and `optimizer`) as this process holds
    them: sharded under FSDP on any number of ranks, whole otherwise. DCP reads the pieces each tensor needs from
    whichever ranks' files hold them; get_state_dict/set_state_dict map the optimizer's state by parameter name."""
    if optimizer is None:
        model_sd, saved = model.state_dict(), {}
    else:  # get_state_dict gives a fresh optimizer its state's tensors first, so that they can be loaded into
        model_sd, optim_sd = get_state_dict(model, optimizer)
        saved = {"optimizer": optim_sd["state"]}
    reader = SafeReader(path)
    reader.read_metadata()  # a .metadata outside the allow-list is refused here, where DCP does not rewrap the error
    try:
        with warnings.catch_warnings():  # that one process reads the whole checkpoint is the intent, not an accident
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": model_sd, **saved}, storage_reader=reader, planner=TensorsOnly(),
                     no_dist=not dist.is_initialized())
    except CheckpointException as e:  # what failed on each rank, wrapped: TensorsOnly's refusal is said as it is
        raise next((exc for exc, _ in e.failures.values() if isinstance(exc, UserError)), e)
    if optimizer is None:
        model.load_state_dict(model_sd)
    else:
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


def shard_optimizer_state(optimizer, saved):
    """Load a one-file checkpoint's optimizer state (saved: optimizer.state_dict(), whole tensors) into an optimizer of
    FSDP's sharded parameters: each tensor shaped as its parameter cut to this rank's shard as the parameter is
    (distribute_tensor, with no communication: every rank holds the whole), then optimizer.load_state_dict."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    of = dict(zip([i for group in saved["param_groups"] for i in group["params"]], params))
    shard = lambda t, p: distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None) \
        if t.shape == p.shape else t
    optimizer.load_state_dict({**saved, "state": {i: {k: shard(v, of[i]) for k, v in s.items()}
                                                  for i, s in saved["state"].items()}})


class SafeReader(FileSystemReader):
    """DCP's file reader with its .metadata (written by pickle) read through MetadataUnpickler's allow-list."""

    def read_metadata(self, *args, **kwargs):
        with open(os.path.join(self.path, ".metadata"), "rb") as f:
            metadata = MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata (its classes, torch sizes, dtypes and layouts, paths) and refuses anything else, so
    that a crafted .metadata cannot run code (Python's "restricting globals")."""
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "WindowsPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module, name):
        found = super().find_class(module, name) if module.startswith(("torch", "pathlib")) else None
        dcp_class = module == "torch.distributed.checkpoint.metadata" and isinstance(found, type)
        torch_constant = module == "torch" and isinstance(found, (torch.dtype, torch.layout, torch.memory_format))
        if dcp_class or torch_constant or (module, name) in self.ALLOWED:
            return found
        raise UserError(f"a DCP checkpoint's .metadata names {module}.{name}, which no checkpoint written by train.py "
                        "holds: refusing to unpickle it")


class TensorsOnly(DefaultLoadPlanner):
    """DCP's load planner, refusing the python objects that DCP would unpickle (train.py saves tensors only)."""

    def load_bytes(self, read_item, value):
        raise UserError(f"a DCP checkpoint holds a python object at {read_item.dest_index.fqn} where train.py saves "
                        "tensors only: refusing to unpickle it")


def rng_states(job):
    """Every rank's torch RNG states, for save_state (each rank must call it: under DDP it gathers them)."""
    device = job.device
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if not job.distributed:
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
    """Load a checkpoint written by train.py (a ckpt.pt file, or a ckpt.dcp directory: checkpoint_in finds it) onto
    the CPU, never with pickle; bad files raise UserError. From a DCP directory, the dict has no "model" and
    "optimizer" but "sharded", its path: model_from_checkpoint and restore_state load those tensors from there."""
    sharded = os.path.isdir(path)
    file = os.path.join(path, "train.pt") if sharded else path
    if not os.path.isfile(file):
        raise UserError(f"no checkpoint at {path}: train one first (python train.py CONFIG) or pass the --out_dir of "
                        "a trained run")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Unsupported global" in str(e):  # weights_only refused a python class: pickle would run code
            raise UserError(f"{file} holds python objects that only pickle can load; refusing to run "
                            "its code (only checkpoints written by train.py are supported)")
        raise UserError(f"{file} is not a readable checkpoint (truncated or corrupt: {first_line(e) or type(e).__name__})")
    missing = [k for k in ("model_config", "settings") + (() if sharded else ("model",))
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{file} is not a train.py checkpoint (no {', '.join(missing)})")
    if sharded:
        ckpt["sharded"] = path
    return ckpt


def model_from_checkpoint(ckpt, weights=True):
    """Rebuild the Transformer a checkpoint holds, on the CPU, in eval mode; weights=False leaves it as initialised
    (train.py then loads a DCP checkpoint's weights as its ranks shard them: restore_state)."""
    cfg = from_settings(ModelConfig, ckpt["model_config"], where="the checkpoint's model_config", strict=True)
    model = Transformer(cfg)
    if not weights:
        return model.eval()
    if "sharded" in ckpt:
        try:
            load_sharded(ckpt["sharded"], model)
        except CheckpointException as e:  # DCP names the missing or misshapen tensors
            raise UserError(f"{ckpt['sharded']} does not match this model.py: {' '.join(str(e).split())[:300]}")
        return model.eval()
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
