"""
The training data, as prepare.py writes it under data/<name>/: uint16 shards read through memory maps, sampled
as windows of block_size + 1 tokens whose last block_size tokens are the targets of the first block_size.
"""

import json
import os
import shlex
from dataclasses import dataclass

import numpy as np
import torch

from configurator import UserError


class Split:
    """The shards of one split ("train" or "val") and, per shard, how many windows of block_size + 1 tokens fit.

    A window id numbers the windows of all shards one after the other, so that sampling ids uniformly samples
    every starting position of every shard equally often."""

    def __init__(self, data_dir, files, block_size, name):
        self.block_size, self.shards = block_size, []
        for file in files:
            path = os.path.join(data_dir, file)
            try:
                self.shards.append(np.memmap(path, dtype=np.uint16, mode="r") if os.path.getsize(path)
                                   else np.zeros(0, np.uint16))
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read shard {path} ({type(e).__name__}): rerun prepare.py")
        self.starts = torch.tensor([max(len(s) - block_size, 0) for s in self.shards], dtype=torch.long)
        if self.starts.sum() == 0:
            longest = max((len(s) for s in self.shards), default=0)
            raise UserError(f"the {name} shards in {data_dir} hold at most {longest} tokens, fewer than "
                            f"block_size + 1 = {block_size + 1}: lower block_size or prepare more data")

    @property
    def windows(self):
        return int(self.starts.sum())

    @property
    def tokens(self):
        return sum(len(s) for s in self.shards)

    def batch(self, windows, device):
        """Inputs and targets [B, block_size] for window ids [B]; targets are the inputs shifted by one."""
        ends = self.starts.cumsum(0)
        shard = torch.searchsorted(ends, windows, right=True)
        offset = windows - (ends[shard] - self.starts[shard])
        rows = [torch.from_numpy(self.shards[s][o:o + self.block_size + 1].astype(np.int64))
                for s, o in zip(shard.tolist(), offset.tolist())]
        xy = torch.stack(rows)
        x, y = xy[:, :-1], xy[:, 1:]
        if device.type == "cuda":  # page-locked memory lets the copies overlap with compute
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


@dataclass
class Dataset:
    dir: str
    meta: dict                 # meta.json
    tokenizer: str | None      # tokenizer.json's text, where prepare.py wrote one
    train: Split
    val: Split


def open_dataset(name, block_size):
    """data/<name>/ (or the path `name`) with its meta.json checked and both splits opened."""
    data_dir = os.path.join("data", name)
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isdir(data_dir):
        raise UserError(f"dataset directory {data_dir} does not exist: run `python prepare.py --name={name}` first")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        files = {s: [e["file"] for e in meta["splits"][s]] for s in ("train", "val")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path} is missing or unreadable ({type(e).__name__}): rerun prepare.py")
    if not meta.get("complete", False):
        raise UserError(f"{meta_path} says prepare.py did not finish: rerun prepare.py")
    if meta.get("dtype", "uint16") != "uint16":
        raise UserError(f"{meta_path}: dtype {meta.get('dtype')!r}, expected uint16")
    tok_path = os.path.join(data_dir, "tokenizer.json")
    tokenizer = open(tok_path).read() if os.path.isfile(tok_path) else None
    return Dataset(data_dir, meta, tokenizer, Split(data_dir, files["train"], block_size, "train"),
                   Split(data_dir, files["val"], block_size, "val"))


def more_data(dataset, tokens):
    """How to give a run `tokens` tokens without reading this dataset over and over: the prepare.py command that
    extends it (prepare.py continues where its max_tokens stopped), or, where its corpus is used up, your own files."""
    meta = dataset.meta
    if meta.get("exhausted") or meta["source"].get("type") not in ("hub", "files") or "end" not in meta:
        return ("this corpus has no more: add documents of your own (prepare.py --data_files=..., see the README's "
                "'Your own data')")
    args = [f"--name={os.path.basename(os.path.normpath(dataset.dir))}", f"--tokenizer={meta['tokenizer']}"]
    if meta["source"]["type"] == "files":
        args.append("--data_files=" + ",".join(f["path"] for f in meta["source"]["files"]))
    args += [f"--{k}={v}" for k, v in meta["settings"].items() if k != "max_tokens" and (v or k != "num_docs")]
    return f"extend it with `python prepare.py {shlex.join(args)} --max_tokens={tokens_to_prepare(tokens)}`"


def tokens_to_prepare(reads):
    """prepare.py's max_tokens for a run that reads `reads` tokens once: 1% more for the val split, whole millions."""
    return -(-int(reads * 1.01) // 1_000_000) * 1_000_000


def text_bytes(tok, split, val_windows, eot):
    """UTF-8 bytes of the validation targets' text (end-of-text tokens left out): what bits per byte divides
    by, so that models with different tokenizers compare (nanochat reports it too)."""
    n = 0
    for windows in val_windows:
        _, y = split.batch(windows, torch.device("cpu"))
        n += sum(len(tok.decode([t for t in row if t != eot]).encode("utf-8")) for row in y.tolist())
    return n
