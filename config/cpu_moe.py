# A small MLA + DeepSeekMoE model of the deepseek_moe family that trains on 2 CPU cores (the demo).
# 3.5M parameters (3.1M of them the tied 49152 x 64 embedding), 3.3M active per token; 300 steps of
# 8 x 128 tokens (307k tokens, half the offline corpus).
attention = "mla"
block_size = 128
n_layer = 4
n_embd = 64                  # the LM head (49152 x 64) is ~90% of the FLOPs at this size: keep it narrow
n_head = 4
q_lora_rank = 0
kv_lora_rank = 32
qk_nope_head_dim = 16
qk_rope_head_dim = 8
v_head_dim = 16
intermediate_size = 192
n_routed_experts = 8
n_activated_experts = 2
n_shared_experts = 1
moe_intermediate_size = 48
first_k_dense = 1
bias_update_rate = 1e-2      # 10x DeepSeek-V3's 1e-3, as is the learning rate: the router moves that much faster
aux_loss_alpha = 1e-4
tie_embeddings = True

out_dir = "out/cpu_moe"
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
