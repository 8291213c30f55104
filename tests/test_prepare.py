"""prepare.py: shards against a direct encoding, resume after a kill, and every bad input as a subprocess (one
line on stderr, non-zero exit, nothing touched)."""

import json
import os
import re
import shlex

import numpy as np
import pytest
from tokenizers import Tokenizer

import prepare
from configurator import UserError
from conftest import ROOT, run_python, run_script

ENV = dict(HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, USE_TORCH="0")  # as prepare.py sets for itself


def test_docstring_corpus_is_clean_deduplicated_and_deterministic():
    docs = prepare.docstring_corpus(["datasets", "tqdm"])
    assert len(docs) > 100 and docs == prepare.docstring_corpus(["datasets", "tqdm"])
    paragraphs = [p for d in docs for p in d.split("\n\n")]
    assert len(paragraphs) == len(set(paragraphs))
    for d in docs:
        assert len(d) >= 200 and d.isascii() and ">>>" not in d and "<|" not in d


# ---------------------------------------------------------------------------------------------------
# the pipeline on small files in the cosmopedia-v2 schema

WORDS = ("the cat sat on a warm mat while rain fell over quiet hills and 42 small birds sang "
         "café naïve 日本 😀 tabs\tand\nnewlines").split(" ")


def make_docs(n=30):
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 60)))) + f". Document {i}." for i in range(n)]


def cosmopedia_rows(docs):
    return [{"prompt": f"Write about {i}", "text": t, "token_length": len(t.split()), "audience": "general",
             "format": "textbook", "seed_data": "stanford"} for i, t in enumerate(docs)]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def run(cwd, *args, code=None, env=None):
    """Run prepare.py (or `code`, a python program calling it) in `cwd`, with ENV and env added to the tests'
    environment; the completed process."""
    env = {**ENV, **(env or {})}
    if code:
        return run_python("-c", code, *args, cwd=cwd, env=env, timeout=120)
    return run_script("prepare.py", *args, cwd=cwd, env=env, timeout=120)


def shards(out_dir, split):
    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    return [np.fromfile(os.path.join(out_dir, s["file"]), dtype="<u2") for s in meta["splits"][split]]


def all_bytes(out_dir):
    return {f: open(os.path.join(out_dir, f), "rb").read() for f in sorted(os.listdir(out_dir))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = make_docs()
    rows = cosmopedia_rows(docs)
    return {"docs": docs, "dir": d, "jsonl": write_jsonl(d / "part.jsonl", rows),
            "parquet": write_parquet(d / "part.parquet", rows)}


ARGS = ["--val_docs=4", "--shard_tokens=97", "--max_tokens=0"]


@pytest.fixture(scope="module")
def reference(corpus):
    """One complete preparation of the jsonl file (one worker), the reference for the others."""
    proc = run(corpus["dir"], f"--data_files={corpus['jsonl']}", "--name=ref", "--num_proc=1", *ARGS)
    assert proc.returncode == 0, proc.stderr
    return os.path.join(corpus["dir"], "data", "ref")


def test_shards_hold_the_documents_joined_by_eot(corpus, reference):
    meta = json.load(open(os.path.join(reference, "meta.json")))
    tok = Tokenizer.from_file(os.path.join(reference, "tokenizer.json"))
    assert meta["complete"] and meta["eot_id"] == 0 and meta["vocab_size"] == 49152 and meta["dtype"] == "uint16"
    assert meta["source"]["type"] == "files" and meta["docs"] == {"val": 4, "train": 26}
    docs = corpus["docs"]
    for split, part in (("val", docs[:4]), ("train", docs[4:])):
        # meta.json's counts are the file sizes; every shard but the last is full
        sizes = [os.path.getsize(os.path.join(reference, s["file"])) // 2 for s in meta["splits"][split]]
        assert sizes == [s["tokens"] for s in meta["splits"][split]]
        assert all(n == 97 for n in sizes[:-1]) and 0 < sizes[-1] <= 97
        ids = np.concatenate(shards(reference, split))
        # an independent encoding, document by document
        want = [i for d in part for i in tok.encode(d, add_special_tokens=False).ids + [0]]
        assert ids.tolist() == want
        assert tok.decode(ids.tolist(), skip_special_tokens=False) == "<|endoftext|>".join(part) + "<|endoftext|>"
    train_text = tok.decode(np.concatenate(shards(reference, "train")).tolist(), skip_special_tokens=False)
    assert not set(train_text.split("<|endoftext|>")) & set(docs[:4])  # val is disjoint from train


def test_parquet_with_two_workers_gives_the_same_bytes(corpus, reference):
    proc = run(corpus["dir"], f"--data_files={corpus['parquet']}", "--name=pq", "--num_proc=2", *ARGS)
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stdout
    out = os.path.join(corpus["dir"], "data", "pq")
    got, want = all_bytes(out), all_bytes(reference)
    assert got.keys() == want.keys()
    assert all(got[f] == want[f] for f in got if f != "meta.json")
    # a finished preparation is left alone
    again = run(corpus["dir"], f"--data_files={corpus['parquet']}", "--name=pq", "--num_proc=2", *ARGS)
    assert again.returncode == 0 and "already prepared" in again.stdout
    assert all_bytes(out) == got


KILL = """
import contextlib, io, os, signal, sys
import prepare
calls, real = 0, prepare.atomic_write
@contextlib.contextmanager
def write_then_die(path, mode="w"):  # the K-th write is cut off halfway through, then SIGKILL: no cleanup
    global calls
    calls += 1
    if calls != int(os.environ["KILL_AT"]):
        with real(path, mode) as f:
            yield f
        return
    buf = io.BytesIO()
    yield buf
    open(path + ".tmp", "wb").write(buf.getvalue()[: len(buf.getvalue()) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
prepare.atomic_write = write_then_die
prepare.main(sys.argv[1:])
"""


def test_killed_run_resumes_to_identical_bytes(corpus, reference):
    args = [f"--data_files={corpus['jsonl']}", "--name=killed", *ARGS]
    out = os.path.join(corpus["dir"], "data", "killed")
    # writes: tokenizer.json, meta.json, shard, meta.json, ...: die in the 2nd shard; resumed with two workers,
    # die in the 5th meta.json; resumed with two workers again, finish
    for kill_at, workers in ((5, 1), (10, 2)):
        proc = run(corpus["dir"], *args, f"--num_proc={workers}", code=KILL, env={"KILL_AT": str(kill_at)})
        assert proc.returncode == -9
        meta = json.load(open(os.path.join(out, "meta.json")))
        got, want = all_bytes(out), all_bytes(reference)
        assert not meta["complete"] and any(f.endswith(".tmp") for f in got)  # a half-written file is left
        listed = meta["splits"]["val"] + meta["splits"]["train"]
        assert listed and all(got[s["file"]] == want[s["file"]] for s in listed)  # whole shards, as the reference
    proc = run(corpus["dir"], *args, "--num_proc=2")
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stdout
    got, want = all_bytes(out), all_bytes(reference)
    assert not [f for f in got if f.endswith(".tmp")]
    assert got == want  # shards, tokenizer.json and meta.json, byte for byte


def test_a_json_file_with_a_tokenizer_file_gives_the_reference_shards(corpus, reference, tmp_path):
    """A .json file (one array of records) and the reference's saved tokenizer.json named by its path: the
    same shards and tokenizer as the jsonl file with cosmo2."""
    path = tmp_path / "part.json"
    path.write_text(json.dumps(cosmopedia_rows(corpus["docs"])))
    tokenizer = os.path.join(reference, "tokenizer.json")
    proc = run(corpus["dir"], f"--data_files={path}", "--name=json", "--num_proc=1", f"--tokenizer={tokenizer}", *ARGS)
    assert proc.returncode == 0, proc.stderr
    out = os.path.join(corpus["dir"], "data", "json")
    got, want = all_bytes(out), all_bytes(reference)
    assert {f: b for f, b in got.items() if f != "meta.json"} == {f: b for f, b in want.items() if f != "meta.json"}
    meta, ref_meta = (json.load(open(os.path.join(d, "meta.json"))) for d in (out, reference))
    assert meta["tokenizer"] == tokenizer and meta["tokenizer_sha256"] == ref_meta["tokenizer_sha256"]
    assert meta["source"]["builder"] == "json" and meta["splits"] == ref_meta["splits"]


def test_offline_it_says_so_and_prepares_the_docstring_corpus_and_overwrite_replaces_it(tmp_path, monkeypatch, capsys):
    """The path make demo takes: the Hub unreachable (conftest sets HF_HUB_OFFLINE), no files given."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare, "DOCSTRING_PACKAGES", ("datasets", "tqdm"))  # a smaller corpus, the same path
    args = ["--name=offline", "--num_proc=1", "--val_docs=10", "--shard_tokens=5000"]
    prepare.main([*args, "--max_tokens=20000"])
    assert "the Hugging Face Hub is unreachable (or HF_HUB_OFFLINE is set): using the offline corpus" in capsys.readouterr().out
    meta = json.load(open("data/offline/meta.json"))
    assert meta["complete"] and meta["source"]["type"] == "docstrings" and set(meta["source"]["packages"]) == {"datasets", "tqdm"}
    tok = Tokenizer.from_file("data/offline/tokenizer.json")
    docs, ids = [], []
    for i in np.concatenate(shards("data/offline", "val")).tolist():  # each document ends with end-of-text
        docs, ids = (docs + [tok.decode(ids)], []) if i == meta["eot_id"] else (docs, ids + [i])
    assert docs == prepare.docstring_corpus(["datasets", "tqdm"])[:10]  # the val split: the first 10 documents
    total = sum(e["tokens"] for s in meta["splits"].values() for e in s)
    with pytest.raises(UserError, match="--overwrite=True"):  # other settings never mix with what is there
        prepare.main([*args, "--max_tokens=10000"])
    prepare.main([*args, "--max_tokens=10000", "--overwrite=True"])
    meta = json.load(open("data/offline/meta.json"))
    assert meta["settings"]["max_tokens"] == 10000 and sum(e["tokens"] for s in meta["splits"].values() for e in s) < total
    assert sorted(os.listdir("data/offline")) == sorted(["meta.json", "tokenizer.json"] +
                                                        [e["file"] for s in meta["splits"].values() for e in s])


def test_bpe_tokenizer_trained_saved_and_recorded(corpus, monkeypatch):
    monkeypatch.chdir(corpus["dir"])  # in-process: data/ lands beside the corpus
    prepare.main([f"--data_files={corpus['jsonl']}", "--name=bpe", "--num_proc=1", "--tokenizer=bpe:300", *ARGS])
    out = os.path.join(corpus["dir"], "data", "bpe")
    meta = json.load(open(os.path.join(out, "meta.json")))
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    assert meta["tokenizer"] == "bpe:300" and meta["vocab_size"] == tok.get_vocab_size() == 300
    assert meta["eot_id"] == tok.token_to_id("<|endoftext|>") == 0
    ids = np.concatenate(shards(out, "train")).tolist()
    assert max(ids) < 300
    assert tok.decode(ids, skip_special_tokens=False) == "<|endoftext|>".join(corpus["docs"][4:]) + "<|endoftext|>"


# ---------------------------------------------------------------------------------------------------
# bad input: one line on stderr, non-zero exit, no traceback, nothing already written changed

def assert_error(proc, *words):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("args, words", [
    (["--colour=blue"], ["unknown option --colour"]),
    (["--data_files=nowhere/*.parquet"], ["nowhere/*.parquet", "matches no file"]),
    (["--tokenizer=bpe:100"], ["bpe:100", "257"]),
    (["--tokenizer=bpe:70000"], ["bpe:70000", "65536"]),
])
def test_bad_options(tmp_path, args, words):
    assert_error(run(tmp_path, *args), *words)
    assert not os.path.exists(tmp_path / "data")


def test_bad_corpus_and_tokenizer_files(tmp_path):
    no_text = write_jsonl(tmp_path / "notext.jsonl", [{"prompt": "p", "body": "b"}] * 3)
    assert_error(run(tmp_path, f"--data_files={no_text}"), "no 'text' field", "prompt, body")
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}] * 3)
    assert_error(run(tmp_path, f"--data_files={empty}"), "corpus is empty")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not a tokenizer")
    good = write_jsonl(tmp_path / "good.jsonl", cosmopedia_rows(make_docs(8)))
    assert_error(run(tmp_path, f"--data_files={good}", f"--tokenizer={garbage}"), "cannot read tokenizer file")
    from tokenizers import models
    huge = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70000)}, unk_token="w0"))
    huge.save(str(tmp_path / "huge.json"))
    assert_error(run(tmp_path, f"--data_files={good}", f"--tokenizer={tmp_path / 'huge.json'}"), "70000", "65536")


def test_shards_from_another_tokenizer_are_refused_and_kept(corpus, reference):
    before = all_bytes(reference)
    proc = run(corpus["dir"], f"--data_files={corpus['jsonl']}", "--name=ref", "--tokenizer=bpe:300", *ARGS)
    assert_error(proc, "different tokenizer", "--overwrite=True")
    assert all_bytes(reference) == before


def test_txt_files_and_limits(corpus, monkeypatch):
    """txt: blank lines separate documents; --num_docs and --max_tokens cut the same stream short."""
    monkeypatch.chdir(corpus["dir"])
    docs = [d.replace("\n", " ") for d in corpus["docs"]]
    for i in range(2):
        (corpus["dir"] / f"t{i}.txt").write_text("\n\n".join(docs[i * 15:(i + 1) * 15]) + "\n")
    files = f"--data_files={corpus['dir'] / 't*.txt'}"
    prepare.main([files, "--name=txt", "--num_proc=1", "--val_docs=2", "--shard_tokens=1000", "--num_docs=20"])
    tok = Tokenizer.from_file("data/txt/tokenizer.json")
    ids = [np.concatenate(shards("data/txt", s)).tolist() for s in ("val", "train")]
    want = [[i for d in part for i in tok.encode(d).ids + [0]] for part in (docs[:2], docs[2:20])]
    assert ids == want
    prepare.main([files, "--name=cut", "--num_proc=1", "--val_docs=2", "--shard_tokens=1000", "--max_tokens=555"])
    got = np.concatenate(shards("data/cut", "val") + shards("data/cut", "train")).tolist()
    assert len(got) == 555 and got == (want[0] + want[1])[:555]


def test_a_larger_max_tokens_extends_the_dataset_as_one_run_would_write_it(corpus, monkeypatch, capsys):
    monkeypatch.chdir(corpus["dir"])
    docs = [d.replace("\n", " ") for d in corpus["docs"]]
    (corpus["dir"] / "ext.txt").write_text("\n\n".join(docs[:30]) + "\n")
    args = [f"--data_files={corpus['dir'] / 'ext.txt'}", "--num_proc=1", "--val_docs=2", "--shard_tokens=200"]
    stream = lambda name: np.concatenate(shards(f"data/{name}", "val") + shards(f"data/{name}", "train")).tolist()
    prepare.main([*args, "--name=once", "--max_tokens=900"])
    prepare.main([*args, "--name=grown", "--max_tokens=555"])  # cuts a document: the extension goes on inside it
    prepare.main([*args, "--name=grown", "--max_tokens=900"])
    assert "extending data/grown from --max_tokens=555 to 900" in capsys.readouterr().out
    assert stream("grown") == stream("once") and len(stream("once")) == 900
    with pytest.raises(UserError, match="--max_tokens=100 would cut"):
        prepare.main([*args, "--name=grown", "--max_tokens=100"])
    prepare.main([*args, "--name=grown", "--max_tokens=0"])  # to the corpus's end, which then has no more
    everything = stream("grown")
    assert len(everything) > 900 and json.load(open("data/grown/meta.json"))["exhausted"]
    prepare.main([*args, "--name=grown", "--max_tokens=0"])
    assert "already prepared" in capsys.readouterr().out and stream("grown") == everything


def test_train_s_note_on_repeated_data_prints_the_command_that_extends_it(corpus, monkeypatch, capsys):
    """train.py reading a small dataset many times prints the exact prepare.py command that gives it enough data;
    prepare.py --for_config sizes a dataset for a config the same way."""
    import train
    monkeypatch.chdir(corpus["dir"])
    docs = [d.replace("\n", " ") for d in corpus["docs"]]
    (corpus["dir"] / "small.txt").write_text("\n\n".join(docs[:30]) + "\n")
    prepare.main([f"--data_files={corpus['dir'] / 'small.txt'}", "--name=small", "--num_proc=1", "--val_docs=2",
                  "--shard_tokens=1000", "--max_tokens=600"])
    train.main(["--dataset=small", "--out_dir=out", "--device=cpu", "--dtype=float32", "--compile=False", "--n_layer=1",
                "--n_embd=16", "--n_head=2", "--n_kv_head=1", "--intermediate_size=16", "--block_size=16",
                "--batch_size=64", "--max_iters=1", "--eval_iters=1", "--sample_tokens=0"])  # 1,024 tokens a step
    note = re.search(r"note: .* memorise them; extend it with `(.*)`", capsys.readouterr().out)
    command = shlex.split(note.group(1))
    assert command[:2] == ["python", "prepare.py"] and command[-1] == "--max_tokens=1000000"
    prepare.main(command[2:])
    assert "extending data/small from --max_tokens=600 to 1000000" in capsys.readouterr().out
    assert json.load(open("data/small/meta.json"))["exhausted"]  # the 30 documents hold fewer tokens
    (corpus["dir"] / "run.py").write_text("max_iters = 1000\nbatch_size = 8\ngradient_accumulation_steps = 4\n"
                                          "block_size = 256\n")  # reads 8,192,000 tokens
    prepare.main([f"--data_files={corpus['dir'] / 'small.txt'}", "--name=small", "--num_proc=1", "--val_docs=2",
                  "--shard_tokens=1000", "--for_config=run.py"])
    said = capsys.readouterr().out
    assert "run.py reads 8,192,000 tokens (1,000 steps x 8,192)" in said and "holds no more tokens to add" in said
    (corpus["dir"] / "run.py").write_text("batch_size = 8\n")
    with pytest.raises(UserError, match="does not set max_iters, gradient_accumulation_steps, block_size"):
        prepare.main(["--for_config=run.py"])
