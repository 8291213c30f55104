import os
import sys

import torch

# tests import the project's top-level modules (model, train, prepare, ...) and run its scripts
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach the Hub

# the suite's models are tiny: one intra-op thread is faster than two for such small ops, and does not
# spin against the other processes (torchrun ranks, scripts under test) that share the machine's cores
torch.set_num_threads(1)
