"""train.py under torchrun, counting the backward passes that synchronised gradients across the ranks (DDP's
all-reduce, through a communication hook; FSDP's reduce-scatter of the root's parameters, through its all-reduce
hook, which 1-D FSDP calls after each reduce-scatter): the proof that only a step's last micro-step syncs. At exit it
writes COUNT_FILE.<rank>, JSON: {"synced": that count, "router_bias": this rank's balancing biases, layer by layer}.

    torchrun --nproc_per_node=2 tests/sync_probe.py COUNT_FILE [train.py settings...]
"""

import json
import os
import sys

from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402  (after the path that finds it)
from configurator import run_main  # noqa: E402

synced, models = [], []
ddp_init, shard = DistributedDataParallel.__init__, train.shard


def counting_init(self, *args, **kwargs):
    ddp_init(self, *args, **kwargs)

    def hook(process_group, bucket):
        if bucket.is_last():  # one count per backward pass that all-reduces
            synced.append(1)
        return allreduce_hook(process_group, bucket)
    self.register_comm_hook(None, hook)


def counting_shard(model, job):
    model = shard(model, job)
    models.append(model)
    if job.fsdp:  # the root's parameters (embedding, final norm, head): one reduce-scatter per syncing backward
        model.set_all_reduce_hook(lambda reduced: synced.append(1))
    return model


DistributedDataParallel.__init__ = counting_init
train.shard = counting_shard
count_file, sys.argv = sys.argv[1], ["train.py", *sys.argv[2:]]
try:
    run_main(train.main)
finally:
    biases = [moe.router.bias.tolist() for moe in models[0].moe_layers()] if models else []
    with open(f"{count_file}.{os.environ['RANK']}", "w") as f:
        json.dump({"synced": len(synced), "router_bias": biases}, f)
