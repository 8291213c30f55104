"""
Export a checkpoint for other runtimes: a Hugging Face transformers directory, or one GGUF file for llama.cpp
(and so for the tools built on it: Ollama, LM Studio, llama-cpp-python).

    python export.py --out_dir=out                              # out/hf, a transformers directory
    python export.py --out_dir=out --format=gguf                # out/model-f16.gguf
    python export.py --out_dir=out --format=gguf --outtype=q8_0 --output=small.gguf

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out/hf")
    llama-cli -m out/model-f16.gguf -p "Once upon a time"       # llama.cpp

Dense GQA models become transformers' LlamaForCausalLM and llama.cpp's `llama`; MLA models (DeepSeekMoE or
dense) become DeepseekV3ForCausalLM and llama.cpp's `deepseek2`. The transformers directory holds config.json,
model.safetensors, generation_config.json, tokenizer.json and tokenizer_config.json; the GGUF file holds the
weights and the tokenizer. Neither transformers nor llama.cpp is needed to export, only to load. The mappings
are in hf_format.py and gguf_format.py; a model a format cannot represent is refused before anything is written.
"""

import json
import os
from dataclasses import dataclass

from safetensors.torch import save_file

from atomic import atomic_write
from checkpoint import checkpoint_in, checkpoint_tokenizer, load_checkpoint, model_from_checkpoint
from configurator import UserError, configure, run_main
from gguf_format import write_gguf
from hf_format import hf_config, hf_tensors
from tokenizer import eot_id


@dataclass
class ExportConfig:
    """export.py's settings (configurator.py: --key=value)."""
    out_dir: str = "out"                # the directory holding the checkpoint (ckpt.pt or ckpt.dcp)
    format: str = "hf"                  # "hf" (a transformers directory) or "gguf" (one file for llama.cpp)
    outtype: str = ""                   # gguf only: f32, f16, bf16 or q8_0; "" means f16
    output: str = ""                    # where to write; "" means out_dir/hf or out_dir/model-{outtype}.gguf


def write_json(path, obj):
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def export_hf(model, tokenizer, hf_dir):
    """Write model + tokenizer as a transformers directory; refuses (UserError) what transformers cannot represent."""
    cfg = model.config
    eot = eot_id(tokenizer)
    config = hf_config(cfg, eot, next(model.parameters()).dtype)  # refuses before anything is written
    tensors = hf_tensors(model)
    os.makedirs(hf_dir, exist_ok=True)
    with atomic_write(os.path.join(hf_dir, "model.safetensors"), "wb") as f:
        save_file(tensors, f.name, metadata={"format": "pt"})  # safetensors opens the temporary file by name
    write_json(os.path.join(hf_dir, "config.json"), config)
    write_json(os.path.join(hf_dir, "generation_config.json"),
               {"bos_token_id": eot, "eos_token_id": eot})
    with atomic_write(os.path.join(hf_dir, "tokenizer.json"), "wb") as f:
        f.write(tokenizer.to_str(pretty=True).encode())  # the bytes of tokenizer.save(path)
    eot_token = tokenizer.id_to_token(eot)
    write_json(os.path.join(hf_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot_token, "eos_token": eot_token, "unk_token": eot_token,
        "model_max_length": cfg.block_size,
        "clean_up_tokenization_spaces": False,
    })


def main(argv=None):
    settings = configure(ExportConfig(), argv)
    fmt, outtype = settings.format, settings.outtype
    if fmt not in ("hf", "gguf"):
        raise UserError(f"--format={fmt}: use hf (a transformers directory) or gguf (llama.cpp)")
    if fmt == "hf" and outtype:
        raise UserError("--outtype is for --format=gguf; the transformers export keeps the checkpoint's float32")
    outtype = outtype or "f16"  # write_gguf refuses any other than OUTTYPES before it writes
    ckpt = load_checkpoint(checkpoint_in(settings.out_dir))
    model, tokenizer = model_from_checkpoint(ckpt), checkpoint_tokenizer(ckpt)
    mla = model.config.attention == "mla"
    if fmt == "hf":
        output = settings.output or os.path.join(settings.out_dir, "hf")
        export_hf(model, tokenizer, output)
        kind = "DeepseekV3ForCausalLM" if mla else "LlamaForCausalLM"
    else:
        output = settings.output or os.path.join(settings.out_dir, f"model-{outtype}.gguf")
        write_gguf(model, tokenizer, eot_id(tokenizer), output, outtype)
        kind = f"llama.cpp {'deepseek2' if mla else 'llama'}, {outtype}, {os.path.getsize(output) / 2**20:.1f} MiB,"
    mtp = sum(p.numel() for p in model.mtp.parameters())
    print(f"wrote {kind} ({model.num_params() - mtp:,} parameters) to {output}")
    if mtp:
        print(f"left out the {model.config.mtp_depth} multi-token-prediction module(s) ({mtp:,} parameters): "
              f"{'transformers' if fmt == 'hf' else 'llama.cpp'} runs the main model only")


if __name__ == "__main__":
    run_main(main)
