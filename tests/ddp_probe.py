"""train.py under torchrun with a DDP communication hook that counts the backward passes that all-reduced
gradients, written to COUNT_FILE.<rank> at exit: the proof that only a step's last micro-step syncs.

    torchrun --nproc_per_node=2 tests/ddp_probe.py COUNT_FILE [train.py settings...]
"""

import os
import sys

from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402  (after the path that finds it)
from configurator import run_main  # noqa: E402

synced = []
ddp_init = DistributedDataParallel.__init__


def counting_init(self, *args, **kwargs):
    ddp_init(self, *args, **kwargs)

    def hook(process_group, bucket):
        if bucket.is_last():  # one count per backward pass that all-reduces
            synced.append(1)
        return allreduce_hook(process_group, bucket)
    self.register_comm_hook(None, hook)


DistributedDataParallel.__init__ = counting_init
count_file, sys.argv = sys.argv[1], ["train.py", *sys.argv[2:]]
try:
    run_main(train.main)
finally:
    with open(f"{count_file}.{os.environ['RANK']}", "w") as f:
        f.write(str(len(synced)))
