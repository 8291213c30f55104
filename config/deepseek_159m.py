# DeepSeek 159M (reported 159,019,568 parameters), an earlier project's GQA + MoE model on cosmopedia-v2:
# width 512, 12 layers, 8 query heads and 2 key/value heads, a MoE of 4 experts of width 2048 in every layer
# with loss-free balancing, untied head; sequences of 256, micro-batch 4, effective batch 16.
# Ours: 209,228,288 parameters, 133,730,816 active per token. Their experts were two-matrix feed-forwards
# with biases, ours SwiGLU (three matrices, no biases): one 512 x 2048 matrix more per expert (+50,331,648)
# and no expert or router biases (-122,928), which accounts for the difference exactly.
# python train.py config/deepseek_159m.py
attention = "gqa"
block_size = 256
n_layer = 12
n_embd = 512
n_head = 8
n_kv_head = 2
n_routed_experts = 4
n_activated_experts = 2              # not given by the reference: top-2
n_shared_experts = 0
moe_intermediate_size = 2048
first_k_dense = 0
tie_embeddings = False

out_dir = "out/deepseek_159m"
batch_size = 4
gradient_accumulation_steps = 4      # 4 x 4 = 16 sequences of 256 per step
max_iters = 5000
lr_decay_iters = 5000
