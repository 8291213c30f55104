# CustomLLM 1.08B (reported 1,075.06M parameters), an earlier project's MLA + MoE model on cosmopedia-v2:
# width 1024, 24 layers, 16 heads, latent attention with a compression ratio of 4 (query and key/value latents
# of 256), a MoE in every layer (1 shared + 7 routed experts of width 1536, top-2), untied head, dropout 0.1,
# trained on 256-token sequences. Ours: 1,061,131,264 parameters, 494,900,224 active per token. The difference:
# their 2,048 learned position embeddings (we use RoPE, no parameters), the bias of their head, and their
# variant of latent attention (ours is DeepSeek-V2's, with a decoupled RoPE key shared by the heads).
# python train.py config/customllm_1b.py
attention = "mla"
block_size = 256                     # they trained at 256 (with 2,048 learned positions; RoPE needs none)
n_layer = 24
n_embd = 1024
n_head = 16
q_lora_rank = 256                    # 1024 / 4
kv_lora_rank = 256
qk_nope_head_dim = 32
qk_rope_head_dim = 32
v_head_dim = 64
n_routed_experts = 7
n_activated_experts = 2
n_shared_experts = 1
moe_intermediate_size = 1536
first_k_dense = 0                    # a MoE in every layer
tie_embeddings = False
dropout = 0.1

out_dir = "out/customllm_1b"
batch_size = 32                      # not given by the reference: 32 x 4 x 256 = 32,768 tokens per step
gradient_accumulation_steps = 4
learning_rate = 3e-4                 # not given by the reference: the usual for this size
min_lr = 3e-5
max_iters = 5000
lr_decay_iters = 5000
