# CustomLLM 973M (reported 973.12M parameters), an earlier project's MLA + MoE model on cosmopedia-v2:
# width 768, 30 layers, 12 heads, query and key/value latents of 192 (a compression ratio of 4), per head
# 32 + 32 query/key dims and 64 value dims, 1 shared + 7 routed experts of width 1536 (top-2), untied head,
# dropout 0.1. Ours: 963,402,240 parameters, 432,560,640 active per token; the difference comes from the
# same places as for config/customllm_1b.py (learned positions, the head's bias, their attention variant).
# python train.py config/customllm_973m.py
attention = "mla"
block_size = 256
n_layer = 30
n_embd = 768
n_head = 12
q_lora_rank = 192                    # 768 / 4
kv_lora_rank = 192
qk_nope_head_dim = 32
qk_rope_head_dim = 32
v_head_dim = 64
n_routed_experts = 7
n_activated_experts = 2
n_shared_experts = 1
moe_intermediate_size = 1536
first_k_dense = 0
tie_embeddings = False
dropout = 0.1

out_dir = "out/customllm_973m"
batch_size = 32                      # not given by the reference: 32 x 4 x 256 = 32,768 tokens per step
gradient_accumulation_steps = 4
learning_rate = 3e-4                 # not given by the reference
min_lr = 3e-5
max_iters = 5000
lr_decay_iters = 5000
