# A small dense GQA model of the SmolLM2 family that trains on 2 CPU cores.
attention = "gqa"
vocab_size = 49152
block_size = 128
n_layer = 4
n_embd = 128
n_head = 4
n_kv_head = 2
intermediate_size = 384
n_routed_experts = 0
tie_embeddings = True

out_dir = "out/cpu_gqa"
device = "cpu"
compile = False
batch_size = 16
gradient_accumulation_steps = 1
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
max_iters = 600
lr_decay_iters = 600
eval_interval = 100
eval_iters = 10
log_interval = 10
