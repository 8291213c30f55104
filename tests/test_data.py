"""data.py: the batches are windows of the shards, the targets the inputs shifted by one."""

import os

import numpy as np
import torch

from conftest import write_dataset
from data import open_dataset


def test_batches_are_shifted_windows_of_the_shards(tmp_path):
    data = write_dataset(str(tmp_path / "two"), shard_lengths=(40, 27))
    split = open_dataset(data, 8).train
    assert split.starts.tolist() == [32, 19] and split.windows == 51  # windows of 9 tokens that fit per shard
    shards = [np.fromfile(os.path.join(data, f), dtype=np.uint16) for f in ("train_00000.bin", "train_00001.bin")]
    expected = [s[o:o + 9] for s in shards for o in range(len(s) - 8)]   # every window, in id order
    ids = torch.arange(51)
    x, y = split.batch(ids, torch.device("cpu"))
    assert x.dtype == torch.int64 and x.shape == y.shape == (51, 8)
    assert torch.equal(x, torch.tensor(np.stack([w[:-1] for w in expected]).astype(np.int64)))
    assert torch.equal(y[:, :-1], x[:, 1:])                    # targets[t] == inputs[t + 1]
    assert torch.equal(y[:, -1], torch.tensor([int(w[-1]) for w in expected]))
