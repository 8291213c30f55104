"""
Export a checkpoint to a Hugging Face transformers directory that loads with no custom code:

    python export_hf.py --out_dir=out                # writes out/hf
    python export_hf.py --out_dir=out --hf_dir=somewhere/else

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("out/hf")

Dense GQA models become LlamaForCausalLM; MLA models (DeepSeekMoE or dense) become
DeepseekV3ForCausalLM. The directory holds config.json, model.safetensors, generation_config.json,
tokenizer.json and tokenizer_config.json. transformers itself is not needed to export, only to load. The
mapping, and the two reparametrisations that make DeepSeek-V3 compute our numbers, are in hf_format.py.
"""

import json
import os

from safetensors.torch import save_file

from checkpoint import checkpoint_tokenizer, load_checkpoint, model_from_checkpoint
from configurator import UserError, configure, run_main
from hf_format import hf_config, hf_tensors
from tokenizer import eot_id

DEFAULTS = dict(
    out_dir="out",  # the directory holding ckpt.pt
    hf_dir="",      # where to write the transformers files; "" means out_dir/hf
)

def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


def export(model, tokenizer, hf_dir):
    """Write model + tokenizer as a transformers directory; refuses (UserError) what transformers cannot represent."""
    cfg = model.config
    eot = eot_id(tokenizer)
    config = hf_config(cfg, eot, next(model.parameters()).dtype)  # refuses before anything is written
    tensors = hf_tensors(model)
    os.makedirs(hf_dir, exist_ok=True)
    path = os.path.join(hf_dir, "model.safetensors")
    save_file(tensors, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)
    write_json(os.path.join(hf_dir, "config.json"), config)
    write_json(os.path.join(hf_dir, "generation_config.json"),
               {"bos_token_id": eot, "eos_token_id": eot})
    path = os.path.join(hf_dir, "tokenizer.json")
    eot_token = tokenizer.id_to_token(eot)
    tokenizer.save(path + ".tmp")
    os.replace(path + ".tmp", path)
    write_json(os.path.join(hf_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot_token, "eos_token": eot_token, "unk_token": eot_token,
        "model_max_length": cfg.block_size,
        "clean_up_tokenization_spaces": False,
    })


def main(argv=None):
    settings = configure(DEFAULTS, argv)
    ckpt_path = os.path.join(settings["out_dir"], "ckpt.pt")
    if not os.path.isfile(ckpt_path):
        raise UserError(f"no checkpoint at {ckpt_path}: train one first (python train.py) or pass --out_dir=DIR")
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt)
    hf_dir = settings["hf_dir"] or os.path.join(settings["out_dir"], "hf")
    export(model, checkpoint_tokenizer(ckpt), hf_dir)
    kind = "LlamaForCausalLM" if model.config.attention == "gqa" else "DeepseekV3ForCausalLM"
    print(f"wrote {kind} ({model.num_params():,} parameters) to {hf_dir}")


if __name__ == "__main__":
    run_main(main)
