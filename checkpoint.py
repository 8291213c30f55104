"""
Checkpoints, shared by train.py, sample.py and export.py. One file, written to a temporary name and renamed,
holding only tensors, numbers, strings, lists and dicts, so that torch.load(weights_only=True) reads it and no
pickled code ever runs. train.py writes: the model's state dict and its ModelConfig fields (model_config), the
run's other settings (settings), the tokenizer's JSON, and what exact resume needs (optimizer, grad scaler,
iteration, tokens seen, best val loss, RNG states, the validation windows).
"""

import os

import torch
from tokenizers import Tokenizer

from configurator import UserError, first_line
from model import ModelConfig, Transformer
from tokenizer import load_tokenizer

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
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt: {first_line(e) or type(e).__name__})")
    missing = [k for k in ("model", "model_config") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a train.py checkpoint (no {', '.join(missing)})")
    if "settings" not in ckpt:  # written before the settings were stored apart from the model's fields
        ckpt["settings"] = ckpt.pop("config", {})
    return ckpt


def model_from_checkpoint(ckpt):
    """Rebuild the Transformer a checkpoint holds, on the CPU, in eval mode."""
    cfg = ModelConfig.from_settings(ckpt["model_config"], where="the checkpoint's model_config", strict=True)
    model = Transformer(cfg)
    try:
        keys = model.load_state_dict(ckpt["model"], strict=False)
    except RuntimeError as e:  # wrong tensor shapes
        raise UserError(f"checkpoint does not match this model.py: {' '.join(str(e).split())[:300]}")
    if keys.missing_keys or keys.unexpected_keys:  # e.g. written before W_q, W_k, W_v became one wqkv
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
