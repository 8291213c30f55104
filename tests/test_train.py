"""train.py: learning, batches, exact resume after SIGKILL/SIGTERM, DDP equivalence, loss-free balancing, a
multi-token-prediction module, NaN handling, checkpoints and bad input. Tiny models on a synthetic dataset (the
data and trained fixtures and the helpers come from conftest.py)."""

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

import train
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from configurator import UserError
from conftest import MOE, ROOT, TINY, VOCAB, metrics, run_inprocess, run_python, run_script, start_script
from data import Split, open_dataset
from generate import Sampling, generate


def logged_iters(out_dir):
    """Iterations logged so far by a running process (its last line may be half written)."""
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            return [json.loads(line)["iter"] for line in f if line.endswith("\n")]
    except (OSError, ValueError):
        return []


pytestmark = pytest.mark.usefixtures("one_thread")


def start(data, out_dir, *args):
    return start_script("train.py", *TINY, f"--dataset={data}", f"--out_dir={out_dir}", *args,
                        stdout=subprocess.DEVNULL)


def signal_when(proc, ready, signum):
    """Send signum once the running process shows the state ready() looks for. It is frozen (SIGSTOP) the moment
    that state is seen and gets the signal as it thaws, so however fast the machine, it has not moved on."""
    while not ready() and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)
    assert proc.poll() is None and ready(), "the run ended before reaching the state the test waits for"
    proc.send_signal(signum)
    proc.send_signal(signal.SIGCONT)


class Stderr:
    """A process's stderr, read as it comes (by a thread), e.g. to see where its progress bars are."""

    def __init__(self, proc):
        self.text = ""
        self.reader = threading.Thread(target=self.read, args=(proc.stderr,), daemon=True)
        self.reader.start()

    def read(self, stream):
        for chunk in iter(lambda: stream.read(1), ""):
            self.text += chunk

    def finish(self):
        self.reader.join()
        return self.text


# ---- learning, schedule, checkpoint contents ----

def test_val_loss_falls_and_checkpoint_reproduces_it(trained, data):
    val = [r["val_loss"] for r in metrics(trained) if "val_loss" in r]
    assert len(val) == 3 and val[0] > math.log(VOCAB) - 0.3  # starts near uniform guessing
    assert val[-1] < val[0] - 1.0                              # and learns the counting rule
    # the checkpoint's model, on the checkpoint's validation windows read straight from the shard,
    # gives the logged val loss again (an independent path: numpy slicing and a plain forward)
    ckpt = load_checkpoint(os.path.join(trained, "ckpt.pt"))
    model = model_from_checkpoint(ckpt)
    shard = np.fromfile(os.path.join(data, "val_00000.bin"), dtype=np.uint16).astype(np.int64)
    T = ckpt["model_config"]["block_size"]
    losses = []
    for windows in ckpt["val_windows"]:
        xy = torch.tensor(np.stack([shard[w:w + T + 1] for w in windows.tolist()]))
        with torch.no_grad():
            logits, _ = model(xy[:, :-1])
        losses.append(F.cross_entropy(logits.flatten(0, 1), xy[:, 1:].flatten()).item())
    assert ckpt["iter_num"] == 40 and ckpt["best_val_loss"] == pytest.approx(val[-1], abs=1e-6)
    assert sum(losses) / len(losses) == pytest.approx(val[-1], abs=1e-5)


def test_bits_per_byte_and_samples_come_from_the_checkpointed_model(trained, data):
    """val_bpb = nats of the targets that are text / ln 2 / their UTF-8 bytes, recomputed from the checkpoint;
    the samples are that model's continuations, drawn with the fixed seed, one line per prompt and evaluation."""
    ckpt = load_checkpoint(os.path.join(trained, "ckpt.pt"))
    model, tok = model_from_checkpoint(ckpt), Tokenizer.from_str(ckpt["tokenizer"])
    shard = np.fromfile(os.path.join(data, "val_00000.bin"), dtype=np.uint16).astype(np.int64)
    T, eot = ckpt["model_config"]["block_size"], 0
    nats = n_bytes = 0.0
    for windows in ckpt["val_windows"]:
        xy = torch.tensor(np.stack([shard[w:w + T + 1] for w in windows.tolist()]))
        with torch.no_grad():
            losses = F.cross_entropy(model(xy[:, :-1])[0].flatten(0, 1), xy[:, 1:].flatten(), reduction="none")
        nats += losses[xy[:, 1:].flatten() != eot].sum().item()
        n_bytes += sum(len(tok.decode([t for t in row if t != eot]).encode()) for row in xy[:, 1:].tolist())
    logged = [r["val_bpb"] for r in metrics(trained) if "val_loss" in r]
    assert logged[-1] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-4) and logged[-1] < logged[0]

    with open(os.path.join(trained, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    prompts = ckpt["settings"]["sample_prompts"]
    assert [(s["iter"], s["prompt"]) for s in samples] == [(i, p) for i in (0, 20, 40) for p in prompts]
    generator = torch.Generator().manual_seed(ckpt["settings"]["seed"])
    for sample in samples[-len(prompts):]:
        ids = torch.tensor([tok.encode(sample["prompt"]).ids])
        new = generate(model, ids, ckpt["settings"]["sample_tokens"], Sampling(temperature=0.8, top_k=200, generator=generator))
        assert tok.decode(new[0, ids.size(1):].tolist()) == sample["text"]


def test_checkpoint_contract(trained, data):
    path = os.path.join(trained, "ckpt.pt")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "model_config", "settings", "tokenizer", "optimizer", "iter_num", "tokens_seen", "best_val_loss"):
        assert key in raw
    assert raw["tokenizer"] == open(os.path.join(data, "tokenizer.json")).read()
    assert raw["tokens_seen"] == 40 * 4 * 16 and raw["settings"]["max_iters"] == 40
    assert not set(raw["settings"]) & set(raw["model_config"])  # the model's fields are stored once
    # weight decay on matrices only: the embedding (tied to the head) and the norms are in the no-decay group
    model = model_from_checkpoint(raw)
    decay, no_decay = raw["optimizer"]["param_groups"]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    shapes = lambda group: [tuple(raw["optimizer"]["state"][i]["exp_avg"].shape) for i in group["params"]]
    is_decayed = lambda n, p: p.dim() == 2 and n != "tok_embeddings.weight"
    assert shapes(decay) == [tuple(p.shape) for n, p in model.named_parameters() if is_decayed(n, p)]
    assert shapes(no_decay) == [tuple(p.shape) for n, p in model.named_parameters() if not is_decayed(n, p)]
    assert len(no_decay["params"]) == 2 * 2 + 2  # per layer two norms; final norm; the tied embedding


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_step_of_k_micro_batches_equals_one_step_on_a_k_times_larger_batch(data, tmp_path, optimizer):
    """The same 8 sequences a step (their windows are drawn in the same order) as 2 micro-batches of 4 or as one of
    8: the same loss, the same gradient (its norm, logged before clipping, would double if the micro-steps' losses
    were summed rather than averaged) and the same weights, in float32."""
    args = ["--max_iters=3", "--eval_interval=3", "--lr_decay_iters=3", "--sample_tokens=0", "--grad_clip=0",
            f"--optimizer={optimizer}"]
    one = run_inprocess(data, tmp_path / "one", *args, "--batch_size=8", "--gradient_accumulation_steps=1")
    two = run_inprocess(data, tmp_path / "two", *args, "--batch_size=4", "--gradient_accumulation_steps=2")
    steps = lambda out: [r for r in metrics(out) if "loss" in r]
    assert len(steps(one)) == len(steps(two)) == 3
    for a, b in zip(steps(one), steps(two)):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5) and b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    a, b = final_checkpoint(one)["model"], final_checkpoint(two)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_lr_schedule():
    cfg = train.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    assert train.get_lr(0, cfg) == pytest.approx(1 / 11) and train.get_lr(9, cfg) == pytest.approx(10 / 11)
    assert train.get_lr(10, cfg) == pytest.approx(1.0)
    assert train.get_lr(60, cfg) == pytest.approx(0.55)       # halfway down the cosine
    assert train.get_lr(110, cfg) == train.get_lr(500, cfg) == 0.1


# ---- exact resume ----

@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_after_sigkill_and_sigterm_is_bitwise_exact(data, tmp_path, optimizer):
    args = [*MOE, "--gradient_accumulation_steps=2", "--dropout=0.1", "--max_iters=40", "--eval_interval=10",
            "--lr_decay_iters=40", f"--optimizer={optimizer}"]
    whole = run_inprocess(data, tmp_path / "whole", *args)

    out = tmp_path / "killed"
    ckpt_path = out / "ckpt.pt"
    proc = start(data, out, *args)
    while not ckpt_path.exists() and proc.poll() is None:    # killed right after its first checkpoint
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    killed_at = torch.load(ckpt_path, weights_only=True)["iter_num"]
    assert killed_at < 40

    proc = start(data, out, *args, "--init_from=resume")     # resumed, then stopped by SIGTERM mid-way
    signal_when(proc, lambda: any(i > killed_at for i in logged_iters(out)), signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    stopped_at = torch.load(ckpt_path, weights_only=True)["iter_num"]
    assert killed_at < stopped_at < 40

    run_inprocess(data, out, *args, "--init_from=resume")
    whole_path = os.path.join(whole, "ckpt.pt")
    a = torch.load(whole_path, weights_only=True)
    b = torch.load(ckpt_path, weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 40
    assert any("router.bias" in k for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):  # moments, momenta
        assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert a["best_val_loss"] == b["best_val_loss"]
    # the log was cut back to the checkpoint on each resume, so it matches the uninterrupted one
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_sec", "mfu")} for r in rs]
    assert strip(metrics(out)) == strip(metrics(whole))


def test_sigterm_in_a_long_evaluation_stops_within_seconds_and_resumes_exactly(data, tmp_path):
    """An evaluation of 300 batches (hours, for a big model on a CPU) is cut short by SIGTERM:
    the run checkpoints its last completed step and exits at once; resumed, it redoes that evaluation and
    ends exactly where an uninterrupted run ends, logs and samples included."""
    args = [*MOE, "--max_iters=6", "--eval_interval=3", "--eval_iters=300", "--lr_decay_iters=6", "--dropout=0.1",
            "--sample_tokens=4"]
    whole = run_inprocess(data, tmp_path / "whole", *args)
    out = tmp_path / "cut"
    proc = start(data, out, *args)
    err = Stderr(proc)
    # the evaluation at 3 has begun when its bar shows (the one at 0 showed it first)
    signal_when(proc, lambda: 3 in logged_iters(out) and err.text.count(" 0/300 ") >= 2, signal.SIGTERM)
    proc.wait()
    said = err.finish()
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in said
    cut = load_checkpoint(str(out / "ckpt.pt"))
    assert cut["iter_num"] == 3 and cut["evaluated"] == 0  # the evaluation at 3 did not finish
    assert not [r for r in metrics(out) if r["iter"] == 3 and "val_loss" in r]
    run_inprocess(data, out, *args, "--init_from=resume")
    a, b = load_checkpoint(os.path.join(whole, "ckpt.pt")), load_checkpoint(str(out / "ckpt.pt"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    untimed = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_sec", "mfu")} for r in rs]
    assert untimed(metrics(out)) == untimed(metrics(whole))
    assert open(out / "samples.jsonl").read() == open(os.path.join(whole, "samples.jsonl")).read()


def test_sigterm_inside_a_step_goes_back_to_the_step_s_start(data, tmp_path, monkeypatch):
    """SIGTERM during step 3's second micro-batch (dropout on, so the RNG matters): the step's gradients,
    expert counts, batch order and dropout draws are rolled back, the checkpoint holds step 2, and the
    resumed run ends bitwise where an uninterrupted one does."""
    args = [*MOE, "--gradient_accumulation_steps=2", "--dropout=0.1", "--max_iters=5", "--eval_interval=5",
            "--lr_decay_iters=5", "--sample_tokens=0"]
    whole = run_inprocess(data, tmp_path / "whole", *args)
    calls, real_batch = [], Split.batch

    def batch(*a):
        calls.append(1)
        if len(calls) == 2 + 2 + 2 * 2 + 2:  # validation text counted, evaluation at 0, 2 micro-batches a step
            os.kill(os.getpid(), signal.SIGTERM)
        return real_batch(*a)
    monkeypatch.setattr(Split, "batch", batch)
    with pytest.raises(SystemExit) as stopped:
        run_inprocess(data, tmp_path / "cut", *args)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert load_checkpoint(str(tmp_path / "cut" / "ckpt.pt"))["iter_num"] == 2
    monkeypatch.setattr(Split, "batch", real_batch)
    run_inprocess(data, tmp_path / "cut", *args, "--init_from=resume")
    a, b = load_checkpoint(os.path.join(whole, "ckpt.pt")), load_checkpoint(str(tmp_path / "cut" / "ckpt.pt"))
    assert a["iter_num"] == b["iter_num"] == 5
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_an_interrupt_before_a_resumed_run_s_first_step_leaves_its_checkpoint_alone(trained, data, tmp_path,
                                                                                     monkeypatch, capsys):
    out = tmp_path / "reused"
    shutil.copytree(trained, out)
    before = (out / "ckpt.pt").read_bytes()
    calls, real_batch = [], Split.batch

    def batch(*a):
        calls.append(1)
        if len(calls) == 2 + 1:  # the first micro-batch of step 41 (after counting the validation text)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_batch(*a)
    monkeypatch.setattr(Split, "batch", batch)
    with pytest.raises(SystemExit) as stopped:
        run_inprocess(data, out, "--max_iters=50", "--init_from=resume")
    assert stopped.value.code == 128 + signal.SIGTERM
    assert (out / "ckpt.pt").read_bytes() == before
    said = capsys.readouterr().out
    assert f"interrupted at iteration 40; nothing new to save, {out / 'ckpt.pt'} is unchanged; continue with: " \
           "python train.py " in said and said.count("--init_from=resume") == 1


def test_a_run_stopped_before_its_first_step_leaves_nothing_behind(data, tmp_path, monkeypatch, capsys):
    real_batch = Split.batch

    def batch(*a):  # the first batch of the first evaluation, after counting the validation text
        if batch.calls == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        batch.calls += 1
        return real_batch(*a)
    batch.calls = 0
    monkeypatch.setattr(Split, "batch", batch)
    with pytest.raises(SystemExit):
        run_inprocess(data, tmp_path / "new", "--max_iters=10")
    assert "interrupted at iteration 0; no step had completed: nothing was saved" in capsys.readouterr().out
    assert os.listdir(tmp_path / "new") == []  # no checkpoint, and no empty metrics.jsonl or samples.jsonl


def test_a_new_run_never_replaces_a_run_unless_asked(trained, data, tmp_path, capsys):
    """A run from scratch into an out_dir holding a run stops before writing, with the command that resumes that run
    instead (which works as printed); --overwrite=True replaces it."""
    out = tmp_path / "kept"
    shutil.copytree(trained, out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    args = [*TINY, f"--dataset={data}", f"--out_dir={out}", "--max_iters=42", "--eval_interval=2"]
    with pytest.raises(UserError) as refused:
        train.main(args)
    message = str(refused.value)
    assert message.startswith(f"{out} holds a run") and "--overwrite=True" in message and "--out_dir" in message
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    command = shlex.split(re.search(r"`(.*?)`", message).group(1))
    assert command[:2] == ["python", "train.py"] and command[2:] == [*args, "--init_from=resume"]
    capsys.readouterr()
    train.main(command[2:])
    assert "resuming at iteration 40" in capsys.readouterr().out
    assert load_checkpoint(str(out / "ckpt.pt"))["iter_num"] == 42
    train.main([*args[:-2], "--max_iters=2", "--eval_interval=2", "--overwrite=True"])
    assert load_checkpoint(str(out / "ckpt.pt"))["iter_num"] == 2
    assert max(r["iter"] for r in metrics(out)) == 2  # the old run's records went with it


def test_the_vocabulary_is_the_dataset_s_unless_set(data, tmp_path, capsys):
    """From scratch the model takes meta.json's vocab_size and says so; a checkpoint with another vocabulary than
    its dataset's is refused with the numbers."""
    wider = tmp_path / "wider"
    shutil.copytree(data, wider)
    meta = json.loads((wider / "meta.json").read_text())
    (wider / "meta.json").write_text(json.dumps({**meta, "vocab_size": VOCAB + 16}))
    unset = [a for a in TINY if not a.startswith("--vocab_size=")]
    out = tmp_path / "out"
    train.main([*unset, f"--dataset={wider}", f"--out_dir={out}", "--max_iters=1", "--eval_interval=1"])
    assert f"the model's vocabulary: its {VOCAB + 16} tokens" in capsys.readouterr().out
    assert load_checkpoint(str(out / "ckpt.pt"))["model_config"]["vocab_size"] == VOCAB + 16
    with pytest.raises(UserError, match=f"has a vocabulary of {VOCAB} tokens but the checkpoint .* has {VOCAB + 16}"):
        train.main([*unset, f"--dataset={data}", f"--out_dir={out}", "--max_iters=2", "--init_from=resume"])
    padded = tmp_path / "padded"  # set explicitly, it may be larger than the data's (padding)
    train.main([*unset, f"--dataset={data}", f"--out_dir={padded}", "--max_iters=1", f"--vocab_size={VOCAB + 16}"])
    assert f"the model's vocabulary: {VOCAB + 16} (vocab_size), its {VOCAB}" in capsys.readouterr().out


def test_ctrl_c_checkpoints_the_step_it_stopped_at(data, tmp_path):
    out = tmp_path / "interrupted"
    proc = start_script("train.py", *TINY, f"--dataset={data}", f"--out_dir={out}",
                        "--max_iters=100000", "--eval_interval=100000")  # no checkpoint but Ctrl-C's
    while not any(i >= 1 for i in logged_iters(out)) and proc.poll() is None:  # a step has completed
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    said, err = proc.communicate()
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert f"interrupted at iteration {ckpt['iter_num']}; continue with: python train.py " in said
    assert f"--out_dir={out} --max_iters=100000 --eval_interval=100000 --init_from=resume\n" in said
    assert 0 < ckpt["iter_num"] < 100000 and ckpt["iter_num"] >= max(logged_iters(out))


# ---- the GPU paths, rehearsed on the CPU: mixed precision and torch.compile ----

def final_checkpoint(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


def assert_same_weights(a, b):
    assert a["iter_num"] == b["iter_num"] and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize("arch, dtype, optimizer", [("gqa", "bfloat16", "adamw"), ("gqa", "float16", "adamw"),
                                                    ("mla_moe", "bfloat16", "adamw"), ("mla_moe", "float16", "adamw"),
                                                    ("mla_moe", "float16", "muon")])
def test_mixed_precision_learns_and_resumes_exactly(data, tmp_path, arch, dtype, optimizer):
    """bfloat16 autocast, and float16 with the GradScaler (older GPUs): the loss falls, and 8 steps, a
    checkpoint and 8 more equal 16 steps bit for bit, the scaler's state included."""
    args = [*(MOE if arch == "mla_moe" else []), f"--dtype={dtype}", "--eval_interval=8", "--lr_decay_iters=16",
            f"--optimizer={optimizer}"]
    whole = run_inprocess(data, tmp_path / "whole", *args, "--max_iters=16")
    part = run_inprocess(data, tmp_path / "part", *args, "--max_iters=8")
    run_inprocess(data, part, *args, "--max_iters=16", "--init_from=resume")
    val = [r["val_loss"] for r in metrics(whole) if "val_loss" in r]
    assert len(val) == 3 and all(map(math.isfinite, val)) and val[-1] < val[0] - 0.3
    a, b = final_checkpoint(whole), final_checkpoint(part)
    assert_same_weights(a, b)
    assert a["scaler"] == b["scaler"] and bool(a["scaler"]) == (dtype == "float16")  # a GradScaler for float16 only
    untimed = lambda out: [{k: v for k, v in r.items() if k not in ("tokens_per_sec", "mfu")} for r in metrics(out)]
    assert untimed(part) == untimed(whole)


@pytest.fixture
def fresh_dynamo():
    """Each compiled run starts from a clean dynamo cache (many runs in one process would hit its recompile
    limit and silently fall back to eager); inductor's compiled kernels stay cached on disk."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("arch, dtype, optimizer", [("mla_moe", "bfloat16", "adamw"), ("gqa", "float32", "adamw"),
                                                    ("gqa", "float32", "muon")])
def test_compiled_training_matches_eager_and_resumes_exactly(data, tmp_path, arch, dtype, optimizer, fresh_dynamo):
    """torch.compile (inductor runs on CPUs too) as train.py uses it on a GPU: per-step losses within
    float32 rounding (1e-4 relative) or bfloat16's (2e-2) of eager, a checkpoint without the compiled
    wrapper's names, and an exact resume of a compiled run."""
    args = [*(MOE if arch == "mla_moe" else []), f"--dtype={dtype}", "--eval_interval=4", "--lr_decay_iters=8",
            f"--optimizer={optimizer}"]
    eager = run_inprocess(data, tmp_path / "eager", *args, "--max_iters=8")
    compiled = run_inprocess(data, tmp_path / "compiled", *args, "--max_iters=8", "--compile=True")
    tol = 1e-4 if dtype == "float32" else 2e-2
    losses = lambda out: [r.get("loss", r.get("val_loss")) for r in metrics(out)]
    assert len(losses(compiled)) == 11 and losses(compiled) == pytest.approx(losses(eager), rel=tol)
    part = run_inprocess(data, tmp_path / "part", *args, "--max_iters=4", "--compile=True")
    run_inprocess(data, part, *args, "--max_iters=8", "--compile=True", "--init_from=resume")
    assert_same_weights(final_checkpoint(compiled), final_checkpoint(part))
    assert final_checkpoint(compiled)["model"].keys() == final_checkpoint(eager)["model"].keys()


# ---- DDP ----

PROBE = os.path.join(ROOT, "tests", "sync_probe.py")


@pytest.mark.parametrize("accumulation, batch, mtp_depth, optimizer", [(4, 4, 0, "adamw"), (3, 4, 1, "adamw"),
                                                                       (3, 4, 1, "muon")],
                         ids=["micro_steps_shared", "micro_batches_split_mtp", "micro_batches_split_mtp_muon"])
def test_torchrun_two_ranks_match_one_process(data, tmp_path, accumulation, batch, mtp_depth, optimizer):
    """Two Gloo ranks against one process with the same settings: the same losses, expert loads, balancing
    biases and weights. With 4 micro-batches each rank runs 2 of them and all-reduces on the second only; with
    3 (not divisible by 2) every micro-batch of 4 sequences is split into two halves. The second run has an
    MTP module: its losses, its MoE block's loads and its weights agree too."""
    args = [*TINY, *MOE, f"--dataset={data}", "--max_iters=4", "--eval_interval=4",
            f"--gradient_accumulation_steps={accumulation}", f"--batch_size={batch}", f"--mtp_depth={mtp_depth}",
            f"--optimizer={optimizer}"]
    count = tmp_path / "synced"
    ddp = run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", PROBE, count, *args,
                     f"--out_dir={tmp_path / 'ddp'}")
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    micro_steps = accumulation // 2 if accumulation % 2 == 0 else accumulation
    assert f"2 rank(s) x {micro_steps} micro-steps x {batch if accumulation % 2 == 0 else batch // 2} sequences" in ddp.stdout
    # one all-reducing backward per optimizer step on each rank: the other micro-steps keep their gradients local
    assert [json.load(open(f"{count}.{rank}"))["synced"] for rank in (0, 1)] == [4, 4]
    train.main([*args, f"--out_dir={tmp_path / 'single'}"])
    two, one = metrics(tmp_path / "ddp"), metrics(tmp_path / "single")
    assert [r["iter"] for r in two] == [r["iter"] for r in one] and len(one) == 6
    for r2, r1 in zip(two, one):
        key = "loss" if "loss" in r1 else "val_loss"
        assert r2[key] == pytest.approx(r1[key], abs=1e-5)
        assert r2.get("expert_counts") == r1.get("expert_counts")  # the all-reduced loads
        mtp = "mtp_losses" if "loss" in r1 else "val_mtp_losses"
        assert len(r1.get(mtp, [])) == mtp_depth and r2.get(mtp, []) == pytest.approx(r1.get(mtp, []), abs=1e-5)
    a = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "single" / "ckpt.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()  # no DistributedDataParallel "module." prefix in the checkpoint
    assert torch.equal(a["layers.1.ffn.router.bias"], b["layers.1.ffn.router.bias"])
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


# ---- a multi-token-prediction module ----

def test_training_with_an_mtp_module(data, tmp_path):
    """A tiny MLA + MoE model with one MTP module: the logged loss is the main head's and mtp_losses the module's
    (recomputed from the checkpoint on the step's batch), the val loss is the main head's (recomputed on the
    validation windows), 4 steps + a checkpoint + 4 more equal 8 steps bit for bit (the MTP block, its router bias
    and its expert loads included), and a resumed run may lower the MTP loss weight, as DeepSeek-V3 did."""
    args = [*MOE, "--mtp_depth=1", "--eval_interval=4", "--lr_decay_iters=8", "--sample_tokens=0"]
    whole = run_inprocess(data, tmp_path / "whole", *args, "--max_iters=8")
    part = run_inprocess(data, tmp_path / "part", *args, "--max_iters=4")
    at_4 = load_checkpoint(os.path.join(part, "ckpt.pt"))
    run_inprocess(data, part, *args, "--max_iters=8", "--init_from=resume")
    a, b = load_checkpoint(os.path.join(whole, "ckpt.pt")), load_checkpoint(os.path.join(part, "ckpt.pt"))
    assert a["model"].keys() == b["model"].keys() and a["model"]["mtp.0.block.ffn.router.bias"].abs().sum() > 0
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    untimed = lambda out: [{k: v for k, v in r.items() if k not in ("tokens_per_sec", "mfu")} for r in metrics(out)]
    assert untimed(part) == untimed(whole)

    records = metrics(whole)
    steps, evals = [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]
    assert all(len(r["mtp_losses"]) == 1 and len(r["max_vio_layers"]) == 2 for r in steps)
    assert [len(r["val_mtp_losses"]) for r in evals] == [1, 1, 1]
    # step 5's batch, drawn from the checkpoint at 4's data generator, through the checkpoint at 4's model
    split = open_dataset(data, 16).train
    generator = torch.Generator()
    generator.set_state(at_4["data_rng"])
    x, y = split.batch(torch.randint(split.windows, (1, 4), generator=generator)[0], torch.device("cpu"))
    net = model_from_checkpoint(at_4).train()
    with torch.no_grad():
        _, losses = net(x, y)
        logits = net.lm_head(net.trunk(x)[0])
    step_5 = next(r for r in steps if r["iter"] == 5)
    assert step_5["loss"] == pytest.approx(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item(), abs=1e-5)
    assert step_5["mtp_losses"][0] == pytest.approx(losses.mtp[0].item(), abs=1e-5)
    assert losses.total.item() == pytest.approx(step_5["loss"] + 0.3 * step_5["mtp_losses"][0], abs=1e-5)
    # the val losses at 8, from the final checkpoint on its validation windows
    net = model_from_checkpoint(a)
    val = torch.tensor(np.fromfile(os.path.join(data, "val_00000.bin"), dtype=np.uint16).astype(np.int64))
    main, mtp = [], []
    for windows in a["val_windows"]:
        xy = torch.stack([val[w:w + 17] for w in windows.tolist()])
        with torch.no_grad():
            h, emb = net.trunk(xy[:, :-1])
            main.append(F.cross_entropy(net.lm_head(h).flatten(0, 1), xy[:, 1:].flatten()).item())
            mtp.append(F.cross_entropy(net.lm_head(net.mtp_states(h, emb)[0]).flatten(0, 1), xy[:, 2:].flatten()).item())
    assert evals[-1]["val_loss"] == pytest.approx(sum(main) / len(main), abs=1e-5)
    assert evals[-1]["val_mtp_losses"][0] == pytest.approx(sum(mtp) / len(mtp), abs=1e-5)
    assert not math.isclose(evals[-1]["val_loss"], evals[-1]["val_mtp_losses"][0], abs_tol=1e-3)

    run_inprocess(data, part, *args, "--max_iters=9", "--init_from=resume", "--mtp_loss_weight=0.1")
    assert load_checkpoint(os.path.join(part, "ckpt.pt"))["model_config"]["mtp_loss_weight"] == 0.1


def test_resuming_a_checkpoint_from_before_mtp_with_an_mtp_module_is_refused(trained, data, tmp_path):
    """A checkpoint that predates the MTP fields holds a model without MTP modules: --mtp_depth=1 is a different
    model, not a setting to drop silently. (The trained run's checkpoint, at step 40, with those fields taken out.)"""
    out = tmp_path / "old"
    shutil.copytree(trained, out)
    path = os.path.join(out, "ckpt.pt")
    ckpt = load_checkpoint(path)
    del ckpt["model_config"]["mtp_depth"], ckpt["model_config"]["mtp_loss_weight"]
    save_checkpoint(ckpt, path)
    with pytest.raises(UserError, match=r"different model: mtp_depth=0 \(the settings say 1\)"):
        run_inprocess(data, out, "--max_iters=41", "--init_from=resume", "--mtp_depth=1")
    run_inprocess(data, out, "--max_iters=41", "--init_from=resume", "--sample_tokens=0")
    assert load_checkpoint(path)["iter_num"] == 41


# ---- MoE balancing, NaN ----

def test_loss_free_balancing_lowers_max_violation(data, tmp_path):
    vio = {}
    for gamma in (3e-3, 0.0):
        out = run_inprocess(data, tmp_path / str(gamma), *MOE, "--batch_size=16", "--max_iters=40",
                            "--eval_interval=40", f"--bias_update_rate={gamma}")
        rec = [r for r in metrics(out) if "max_vio" in r]
        assert len(rec[-1]["max_vio_layers"]) == 1 and len(rec[-1]["expert_counts"][0]) == 8
        vio[gamma] = np.mean([r["max_vio"] for r in rec[-20:]])
    assert vio[3e-3] < 0.8 * vio[0.0], vio


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(trained, tmp_path):
    out = tmp_path / "nan"
    shutil.copytree(trained, out)
    before = (out / "ckpt.pt").read_bytes()
    settings = torch.load(out / "ckpt.pt", weights_only=True)["settings"]
    r = run_script("train.py", *TINY, f"--dataset={settings['dataset']}", f"--out_dir={out}", "--init_from=resume",
                   "--learning_rate=1e30", "--min_lr=1e30", "--max_iters=50", "--eval_interval=5", "--grad_clip=0")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    # at lr 1e30 step 40's update makes the weights ~1e30: step 41's loss is huge but finite (RMSNorm and a
    # float32 log-sum-exp keep it so); step 42's update overflows: its loss is the first NaN
    assert line.startswith("error: loss is nan at iteration 42;"), r.stderr[-500:]
    assert (out / "ckpt.pt").read_bytes() == before
    load_checkpoint(str(out / "ckpt.pt"))


def test_best_only_checkpoints_and_a_non_finite_validation_loss(trained, data, tmp_path):
    """always_save_checkpoint=False keeps the best checkpoint when a later evaluation is worse, and a NaN
    validation loss stops the run without saving."""
    out = tmp_path / "best"
    shutil.copytree(trained, out)
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(UserError, match="validation loss is nan at iteration 42; stopped without saving"):
        run_inprocess(data, out, "--init_from=resume", "--learning_rate=1e30", "--min_lr=1e30", "--max_iters=50",
                      "--eval_interval=1", "--grad_clip=0", "--always_save_checkpoint=False")
    val = {r["iter"]: r["val_loss"] for r in metrics(out) if "val_loss" in r}
    assert val[41] > val[40] and math.isfinite(val[41])  # worse but finite: evaluated, not saved
    assert (out / "ckpt.pt").read_bytes() == before
    with open(out / "samples.jsonl") as f:  # sampled at 41; at 42 the NaN stopped the run before sampling
        assert {json.loads(line)["iter"] for line in f} == {0, 20, 40, 41}


def test_dtype_auto_on_a_cpu_says_its_choice_and_a_resumed_run_keeps_it(data, tmp_path, monkeypatch, capsys):
    """dtype=auto takes auto_cpu_dtype's choice for this model (injected here), says it and measures MFU against
    that precision's peak; the checkpoint records it, and a resumed run keeps it whatever a timing would say
    then, ending bitwise where a run pinned to bfloat16 ends."""
    args = [*MOE, "--max_iters=6", "--eval_interval=3", "--lr_decay_iters=6", "--dropout=0.1"]
    pinned = run_inprocess(data, tmp_path / "pinned", *args, "--dtype=bfloat16")
    capsys.readouterr()
    monkeypatch.setattr(train, "auto_cpu_dtype", lambda time_step, peaks, flops: ("bfloat16", "injected 1.50x"))
    out = run_inprocess(data, tmp_path / "auto", *args, "--dtype=auto", "--max_iters=3")
    said = capsys.readouterr().out
    assert "precision: bfloat16 on cpu (injected 1.50x); MFU against measured bfloat16 matmul peak" in said
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["settings"]["dtype"] == "bfloat16"

    def timed_again(*a):
        raise AssertionError("a resumed run must not time its precision again")
    monkeypatch.setattr(train, "auto_cpu_dtype", timed_again)
    run_inprocess(data, out, *args, "--dtype=auto", "--init_from=resume")
    assert "precision: bfloat16 on cpu (dtype=auto keeps the checkpoint's precision)" in capsys.readouterr().out
    a, b = load_checkpoint(os.path.join(pinned, "ckpt.pt")), load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert a["iter_num"] == b["iter_num"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_timing_the_precisions_leaves_the_run_as_it_was(data, tmp_path, monkeypatch):
    """The timed steps run on a copy of the model with their own random tokens: with dropout on, a run that timed
    both precisions ends bitwise where a run that did not ends, and the timed steps took real time."""
    args = [*MOE, "--max_iters=4", "--eval_interval=4", "--lr_decay_iters=4", "--dropout=0.1"]
    pinned = run_inprocess(data, tmp_path / "pinned", *args, "--dtype=float32")
    timed = []

    def time_both(time_step, peaks, flops):
        timed.extend(time_step(d) for d in ("float32", "bfloat16", "float32"))
        return "float32", "timed"
    monkeypatch.setattr(train, "auto_cpu_dtype", time_both)
    out = run_inprocess(data, tmp_path / "auto", *args, "--dtype=auto")
    assert len(timed) == 3 and all(t > 0 for t in timed)
    a, b = load_checkpoint(os.path.join(pinned, "ckpt.pt")), load_checkpoint(os.path.join(out, "ckpt.pt"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert metrics(pinned)[-1]["val_loss"] == metrics(out)[-1]["val_loss"]


def test_log_records_average_their_interval_and_speed_follows_its_definitions(data, tmp_path, capsys):
    args = ["--max_iters=8", "--eval_interval=8", "--lr_decay_iters=8"]
    every = [r for r in metrics(run_inprocess(data, tmp_path / "every", *args)) if "loss" in r]  # log_interval=1
    capsys.readouterr()
    t0 = time.perf_counter()
    four = run_inprocess(data, tmp_path / "four", *args, "--log_interval=4")
    wall = time.perf_counter() - t0
    records = [r for r in metrics(four) if "loss" in r]
    assert [r["iter"] for r in records] == [4, 8]
    for r, steps in zip(records, (every[:4], every[4:])):  # logging does not change the training
        assert r["loss"] == pytest.approx(sum(s["loss"] for s in steps) / 4, rel=1e-12)
        assert (r["lr"], r["grad_norm"], r["tokens"]) == (steps[-1]["lr"], steps[-1]["grad_norm"], steps[-1]["tokens"])
    # tokens/s: an interval's tokens over its steps' time, which adds up to less than the whole run
    tokens_per_step = 4 * 16
    assert 0 < sum(4 * tokens_per_step / r["tokens_per_sec"] for r in records) < wall
    # MFU: training FLOPs per token x tokens/s over the peak that the startup line reports
    peak = float(re.search(r"matmul peak ([\d.]+) GFLOP/s", capsys.readouterr().out).group(1)) * 1e9
    flops = model_from_checkpoint(load_checkpoint(os.path.join(four, "ckpt.pt"))).flops_per_token(16)
    for r in records:
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_sec"] / peak, rel=2e-3)  # the peak is printed rounded


def test_gradients_are_clipped_to_grad_clip(data, tmp_path):
    """AdamW's first moment after one step is (1 - beta1) x the gradient it was given: its norm shows the clip."""
    out = run_inprocess(data, tmp_path / "clip", "--max_iters=1", "--eval_interval=1", "--grad_clip=1e-3")
    assert [r for r in metrics(out) if "loss" in r][0]["grad_norm"] > 0.1  # the norm before clipping is logged
    state = load_checkpoint(os.path.join(out, "ckpt.pt"))["optimizer"]["state"]
    moment = math.sqrt(sum(s["exp_avg"].double().square().sum().item() for s in state.values()))
    assert moment == pytest.approx((1 - 0.9) * 1e-3, rel=1e-4)


# ---- bad input: one line on stderr, non-zero exit, no traceback, nothing lost ----

BAD = {  # name: (extra args, env, what the message must say)
    "no_dataset": (["--dataset=/nonexistent/tiny", "--out_dir={new}"], {}, "prepare.py"),
    "vocab_too_big": (["--vocab_size=32", "--out_dir={new}"], {}, "vocab"),
    "shards_too_short": (["--block_size=3000", "--out_dir={new}"], {}, "block_size + 1"),
    "a_run_is_there": ([], {}, "--init_from=resume`"),
    "overwrite_bad_settings": (["--overwrite=True", "--vocab_size=32"], {}, "vocab"),  # and nothing is lost
    "overwrite_resume": (["--overwrite=True", "--init_from=resume"], {}, "does not go with"),
    "no_checkpoint": (["--init_from=resume", "--out_dir={empty}"], {}, "no checkpoint"),
    "other_architecture": (["--init_from=resume", "--n_layer=3"], {}, "different model"),
    "other_optimizer": (["--init_from=resume", "--optimizer=muon"], {}, "trained with --optimizer=adamw, not muon"),
    "truncated": (["--init_from=resume", "--out_dir={truncated}"], {}, "truncated or corrupt"),
    "corrupt": (["--init_from=resume", "--out_dir={corrupt}"], {}, "truncated or corrupt"),
    "pickle": (["--init_from=resume", "--out_dir={pickle}"], {}, "pickle"),
    "no_config_file": (["config/does_not_exist.py"], {}, "does not exist"),
    "unknown_key": (["--bogus=1"], {}, "unknown option --bogus"),
    "wrong_type": (["--batch_size=lots"], {}, "batch_size"),
    "ranks_do_not_divide": (["--batch_size=3"], {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "divides"),
    "unwritable_out_dir": (["--out_dir={file}/sub"], {}, "cannot write"),
    "unknown_device": (["--device=gpu"], {}, "unknown device"),
    "fsdp_float16": (["--fsdp=True", "--dtype=float16"], {}, "--fsdp=True trains on CUDA GPUs or CPUs in bfloat16"),
}


# Each case runs train.py's entry point, run_main(train.main), in a child process forked from one
# interpreter that imported torch once: 13 fresh interpreters would spend ~30 s of CPU importing torch.
# The children are real processes: their exit status and stderr are what the tests check.
FORK_RUNNER = """
import json, os, sys, traceback
sys.path.insert(0, sys.argv[1])
import train
from configurator import run_main
codes = {}
for name, (args, env, err) in json.loads(sys.argv[2]).items():
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.environ.update(env)
        sys.argv = ["train.py", *args]
        try:
            run_main(train.main)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # what the interpreter would do with an uncaught exception
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    codes[name] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(codes))
"""


@pytest.fixture(scope="module")
def bad_runs(trained, data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    dirs = {name: str(tmp / name) for name in ("empty", "truncated", "corrupt", "pickle")}
    for name in ("truncated", "corrupt", "pickle"):
        os.makedirs(dirs[name])
    good = open(os.path.join(trained, "ckpt.pt"), "rb").read()
    open(os.path.join(dirs["truncated"], "ckpt.pt"), "wb").write(good[:len(good) // 2])
    open(os.path.join(dirs["corrupt"], "ckpt.pt"), "wb").write(np.random.default_rng(0).bytes(5000))
    torch.save({"model": {}, "model_config": {}, "settings": {}, "evil": argparse_namespace()},
               os.path.join(dirs["pickle"], "ckpt.pt"))
    dirs["file"], dirs["new"] = str(tmp / "a_file"), str(tmp / "new")
    open(dirs["file"], "w").close()
    files = [os.path.join(trained, "ckpt.pt"), os.path.join(trained, "metrics.jsonl")] + \
        [os.path.join(dirs[n], "ckpt.pt") for n in ("truncated", "corrupt", "pickle")]
    before = [open(f, "rb").read() for f in files]
    cases = {name: ([*TINY, f"--dataset={data}", f"--out_dir={trained}", *[a.format(**dirs) for a in args]],
                    env, str(tmp / f"{name}.err")) for name, (args, env, _) in BAD.items()}
    r = run_python("-c", FORK_RUNNER, ROOT, json.dumps(cases))
    assert r.returncode == 0, r.stderr[-2000:]
    codes = json.loads(r.stdout.strip().splitlines()[-1])
    results = {name: (codes[name], open(cases[name][2]).read()) for name in BAD}
    after = [open(f, "rb").read() for f in files]
    return results, before, after


def argparse_namespace():
    import argparse
    return argparse.Namespace(a=1)


@pytest.mark.parametrize("name", BAD)
def test_bad_input(bad_runs, name):
    results, before, after = bad_runs
    returncode, stderr = results[name]
    assert returncode != 0
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-1000:]
    assert BAD[name][2] in lines[0]
    assert before == after  # no checkpoint or log was touched, corrupt checkpoints included


def test_the_startup_line_says_which_mla_attention_path_runs(monkeypatch):
    from device import Job
    job = Job(torch.device("cpu"), "float32")
    assert train.attention_path(job, 24, 16).startswith("values zero-padded from 16 to 24 dims")  # a CPU pads
    monkeypatch.setattr(train, "unpadded_attention_runs", lambda device, dtype, qk, v: True)
    assert train.attention_path(job, 24, 16) == "values unpadded (16 dims, queries and keys 24), cuDNN's kernel"
