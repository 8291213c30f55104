# A small dense GQA model of the SmolLM2 family that trains on 2 CPU cores, the dense twin of cpu_moe.py.
# 3.4M parameters (3.1M of them the tied 49152 x 64 embedding); 300 steps of 8 x 128 tokens.
attention = "gqa"
block_size = 128
n_layer = 4
n_embd = 64                  # the LM head (49152 x 64) is ~90% of the FLOPs at this size: keep it narrow
n_head = 4
n_kv_head = 2
intermediate_size = 192
n_routed_experts = 0
tie_embeddings = True

out_dir = "out/cpu_gqa"
device = "cpu"
compile = False
batch_size = 8
gradient_accumulation_steps = 1
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 20
max_iters = 300
lr_decay_iters = 300
eval_interval = 50
eval_iters = 4
log_interval = 10
