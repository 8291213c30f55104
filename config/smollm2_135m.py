# SmolLM2-135M architecture (dense GQA, Llama-style): exactly 134,515,008 parameters.
# Train from scratch: python train.py config/smollm2_135m.py
# Fine-tune the released weights: python train.py config/smollm2_135m.py --init_from=smollm2-135m
attention = "gqa"
vocab_size = 49152
block_size = 2048
n_layer = 30
n_embd = 576
n_head = 9
n_kv_head = 3
intermediate_size = 1536
n_routed_experts = 0
rope_theta = 100000.0
norm_eps = 1e-5
tie_embeddings = True

out_dir = "out/smollm2_135m"
batch_size = 16
gradient_accumulation_steps = 16     # 16 x 16 x 2048 = 524k tokens per step on one GPU
learning_rate = 3e-3                 # SmolLM2 used 3e-3 (WSD); here warmup + cosine
min_lr = 3e-4
warmup_iters = 500
max_iters = 10000
lr_decay_iters = 10000
weight_decay = 0.1
beta2 = 0.95
