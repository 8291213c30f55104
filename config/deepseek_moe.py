# The main model: MLA + DeepSeekMoE, sized for one GPU.
# 536,418,048 parameters in total, 160,110,336 active per token (6 of 64 routed experts + 2 shared).
# python train.py config/deepseek_moe.py
attention = "mla"
block_size = 1024
n_layer = 12
n_embd = 768
n_head = 12
q_lora_rank = 0                      # no query compression at this width (as DeepSeek-V2-Lite)
kv_lora_rank = 256                   # cached latent: 256 + 32 numbers per token per layer
qk_nope_head_dim = 64
qk_rope_head_dim = 32
v_head_dim = 64
intermediate_size = 3072             # the dense first layer
n_routed_experts = 64
n_activated_experts = 6
n_shared_experts = 2
moe_intermediate_size = 256          # fine-grained experts
first_k_dense = 1
score_func = "sigmoid"
route_scale = 1.0
bias_update_rate = 1e-3
aux_loss_alpha = 1e-4
rope_theta = 10000.0
tie_embeddings = False

out_dir = "out"
batch_size = 16
gradient_accumulation_steps = 8      # 16 x 8 x 1024 = 131k tokens per step
learning_rate = 4e-4
min_lr = 4e-5
warmup_iters = 1000
max_iters = 20000
lr_decay_iters = 20000
weight_decay = 0.1
beta2 = 0.95
grad_clip = 1.0
eval_interval = 500
eval_iters = 100
