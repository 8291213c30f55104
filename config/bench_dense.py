# bench.py's dense GQA model (SmolLM2 family), sized for a CPU benchmark: with an 8192-token vocabulary
# the LM head is about a quarter of the FLOPs, as in the full-size configs, so the benchmark measures
# the transformer body rather than one big matmul that every implementation runs alike.
attention = "gqa"
vocab_size = 8192
block_size = 256
n_layer = 4
n_embd = 256
n_head = 8
n_kv_head = 2
intermediate_size = 768
n_routed_experts = 0
tie_embeddings = True
