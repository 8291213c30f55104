"""export.py: with --format=hf, what transformers loads from the exported directory computes our numbers; the
options it refuses. (--format=gguf, what llama.cpp loads: test_gguf_format.py.)"""

import dataclasses
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import export
import pretrained
from configurator import UserError, run_main
from conftest import EXPORT_CONFIG, EXPORT_MODELS, export_model, run_script, write_checkpoint
from generate import Sampling, generate
from model import ModelConfig, Transformer
from tokenizer import eot_id, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("cosmo2")


@pytest.mark.parametrize("trained", [False, True], ids=["random", "trained"])
@pytest.mark.parametrize("name", list(EXPORT_MODELS))
def test_round_trip(name, trained, tokenizer, tmp_path, capsys):
    model = export_model(name, trained)
    write_checkpoint(model, tokenizer, tmp_path)
    export.main([f"--out_dir={tmp_path}"])  # the script's path: checkpoint -> out_dir/hf
    said = capsys.readouterr().out
    assert ("left out the 1 multi-token-prediction module(s)" in said) == (model.config.mtp_depth == 1)
    hf_dir = tmp_path / "hf"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(hf_dir))

    theirs, info = AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    kind = "LlamaForCausalLM" if model.config.attention == "gqa" else "DeepseekV3ForCausalLM"
    assert type(theirs).__name__ == kind
    theirs.eval()

    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits, _ = model(ids)
        their_logits = theirs(ids).logits
    torch.testing.assert_close(their_logits, ours_logits, atol=1e-4, rtol=0)

    prompt = ids[:1, :6]
    ours_greedy = generate(model, prompt, 20, Sampling(temperature=0))
    their_greedy = theirs.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours_greedy.tolist() == their_greedy.tolist()

    their_tok = AutoTokenizer.from_pretrained(hf_dir)
    text = "Once upon a time, 42 dragons<|endoftext|>"
    assert their_tok(text)["input_ids"] == tokenizer.encode(text).ids
    assert their_tok.eos_token_id == eot_id(tokenizer) == theirs.config.eos_token_id


def test_hub_loader_reads_an_exported_llama(tokenizer, tmp_path):
    """pretrained.load_hub (the Hub safetensors path, which this machine cannot reach) reads back what
    export wrote, through the same name mapping."""
    model = export_model("dense_gqa", trained=True)
    export.export_hf(model, tokenizer, tmp_path)
    fresh = Transformer(model.config)
    pretrained.load_hub(fresh, tmp_path / "config.json", tmp_path / "model.safetensors")
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    other = Transformer(dataclasses.replace(model.config, n_layer=3))
    with pytest.raises(UserError, match="n_layer=2"):
        pretrained.load_hub(other, tmp_path / "config.json", tmp_path / "model.safetensors")


@pytest.mark.parametrize("change, message", [
    (dict(score_func="softmax"), "sigmoid"),
    (dict(attention="gqa", n_kv_head=2), "GQA model with MoE"),
])
def test_refuses_what_transformers_cannot_represent(change, message, tokenizer, tmp_path):
    cfg = ModelConfig(**EXPORT_CONFIG, **{**EXPORT_MODELS["mla_moe"], **change})
    with pytest.raises(UserError, match=message):
        export.export_hf(Transformer(cfg), tokenizer, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # nothing written


def test_bad_input(tokenizer, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:  # as `python export.py` runs it, without a new process
        run_main(lambda: export.main([f"--out_dir={tmp_path / 'nothing'}"]))
    assert exit.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: no checkpoint at {tmp_path / 'nothing' / 'ckpt.pt'}")
    # the script itself, on a checkpoint that transformers cannot represent
    cfg = ModelConfig(**EXPORT_CONFIG, **{**EXPORT_MODELS["mla_moe"], "score_func": "softmax"})
    write_checkpoint(Transformer(cfg), tokenizer, tmp_path / "softmax")
    run = run_script("export.py", f"--out_dir={tmp_path / 'softmax'}", timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("error: cannot export score_func='softmax'") and run.stderr.count("\n") == 1
    assert not (tmp_path / "softmax" / "hf").exists()


@pytest.mark.parametrize("args, message", [
    (["--format=onnx"], "error: --format=onnx: use hf (a transformers directory) or gguf (llama.cpp)"),
    (["--format=gguf", "--outtype=q4_0"], "error: --outtype=q4_0: use one of f32, f16, bf16, q8_0"),
    (["--outtype=f16"], "error: --outtype is for --format=gguf"),
])
def test_bad_options(args, message, tokenizer, tmp_path, capsys):
    # options are checked before the export; gguf's output type once the checkpoint is read, so it is an exportable
    # one (its tokenizer has an end-of-text token)
    write_checkpoint(export_model("dense_gqa", False), tokenizer, tmp_path)
    with pytest.raises(SystemExit) as exit:  # as `python export.py` runs it, without a new process
        run_main(lambda: export.main([f"--out_dir={tmp_path}", *args]))
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # nothing written beside the checkpoint
