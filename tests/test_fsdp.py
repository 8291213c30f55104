"""train.py --fsdp=True (FSDP2 with DCP checkpoints), rehearsed on two Gloo ranks on the CPU: it trains as one process
does (float32, within 1e-5), resumes bit for bit after every rank is killed, continues on one process from a 2-rank
checkpoint (and on two from a one-process one), and sample.py and export.py read its sharded checkpoint as they read a
plain one. The DCP reader never unpickles more than its allow-list."""

import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from filelock import FileLock
from safetensors.torch import load_file

import checkpoint
import conftest
import export
import sample
from configurator import UserError
from conftest import MOE, ROOT, TINY, metrics, run_inprocess, run_script, write_dataset

TRAIN, PROBE = os.path.join(ROOT, "train.py"), os.path.join(ROOT, "tests", "sync_probe.py")
# MLA + MoE with an MTP module and Muon, 3 micro-batches a step (not divisible by 2 ranks: each is split in two);
# a checkpoint every 2 steps
MOE_RUN = [*MOE, "--mtp_depth=1", "--optimizer=muon", "--gradient_accumulation_steps=3", "--batch_size=4",
           "--eval_interval=2", "--lr_decay_iters=10"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
    """A directory of this session that every xdist worker sees (the parent of each worker's own temp directory;
    without xdist, the session's): a fixture made there once, under a lock of its own, serves the tests of both
    workers (pytest-xdist's recipe)."""
    root = tmp_path_factory.getbasetemp()
    root = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "fsdp"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def text_data(shared_dir):
    """The tests' counting dataset with token 0 named <|endoftext|>, so that export.py can name the end of text."""
    root = shared_dir
    with FileLock(root / "tiny.lock"):
        if not (root / "tiny" / "meta.json").exists():
            write_dataset(str(root / "tiny"), eot="<|endoftext|>")
    return str(root / "tiny")


def launch_ranks(logs, script, *args):
    """`script args` on 2 ranks started directly with the variables torchrun gives them (its launcher would be one
    more process importing torch), so that a test holds each rank's process; rank r writes logs/r.out and logs/r.err.
    [Popen, Popen]."""
    with socket.socket() as s:  # a free port for the ranks' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.makedirs(logs, exist_ok=True)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    ranks = []
    for rank in (0, 1):
        with open(logs / f"{rank}.out", "w") as out, open(logs / f"{rank}.err", "w") as err:
            ranks.append(subprocess.Popen([sys.executable, script, *args], cwd=ROOT, stdout=out, stderr=err,
                                          env=conftest.tests_env({**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})))
    return ranks


def run_ranks(logs, script, *args):
    """launch_ranks's run to its end, which must succeed; rank 0's stdout."""
    for rank, proc in enumerate(launch_ranks(logs, script, *args)):
        assert proc.wait(timeout=600) == 0, (logs / f"{rank}.err").read_text()[-3000:]
    return (logs / "0.out").read_text()


def probe_run(data, out_dir, count, *args):
    """train.py on 2 ranks under tests/sync_probe.py; rank 0's stdout."""
    return run_ranks(out_dir.parent / f"{out_dir.name}.logs", PROBE, count, *TINY, f"--dataset={data}",
                     f"--out_dir={out_dir}", *args)


@pytest.fixture(scope="session")
def moe_runs(text_data, shared_dir):
    """MOE_RUN for 8 steps: on 2 ranks under FSDP (tests/sync_probe.py counting), and in one process; made once for
    both workers. (the directory, the FSDP run's stdout)."""
    tmp = shared_dir / "moe"
    with FileLock(shared_dir / "moe.lock"):
        if not (tmp / "fsdp.out").exists():
            stdout = probe_run(text_data, tmp / "fsdp", tmp / "synced", *MOE_RUN, "--max_iters=8", "--fsdp=True")
            run_inprocess(text_data, tmp / "single", *MOE_RUN, "--max_iters=8")
            (tmp / "fsdp.out").write_text(stdout)  # last: its presence says that both runs are whole
    return tmp, (tmp / "fsdp.out").read_text()


def assert_same_records(two, one, tolerance):
    """Two metrics.jsonl: the same records, losses (main and MTP) and gradient norms within tolerance, expert loads
    equal."""
    assert [r["iter"] for r in two] == [r["iter"] for r in one]
    for r2, r1 in zip(two, one):
        for key in ("loss", "val_loss", "grad_norm"):
            assert (key in r2) == (key in r1) and r2.get(key) == pytest.approx(r1.get(key), abs=tolerance), key
        for key in ("mtp_losses", "val_mtp_losses"):
            assert r2.get(key, []) == pytest.approx(r1.get(key, []), abs=tolerance)
        assert r2.get("expert_counts") == r1.get("expert_counts")


def weights(out_dir):
    """The model a run's checkpoint holds (ckpt.pt or ckpt.dcp, as sample.py reads it): its state dict."""
    ckpt = checkpoint.load_checkpoint(checkpoint.checkpoint_in(str(out_dir)))
    return checkpoint.model_from_checkpoint(ckpt).state_dict()


def assert_close_weights(a, b, tolerance):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tolerance, rtol=0), k


def held_per_parameter(stdout):
    """The bytes per parameter that a run's memory line says its rank 0 holds."""
    return float(re.search(r"memory of rank 0.*; ([\d.]+) bytes per parameter", stdout).group(1))


def test_mla_moe_on_two_ranks_trains_as_one_process(moe_runs):
    """Losses, MTP losses, gradient norms (clipped over all the shards), expert loads and weights as one process;
    one reduce-scatter per step (the micro-steps before the last keep their gradients), and the balancing biases
    equal on both ranks and to one process's."""
    tmp, stdout = moe_runs
    assert "FSDP over 2 rank(s)" in stdout and "2 rank(s) x 3 micro-steps x 2 sequences" in stdout
    assert_same_records(metrics(tmp / "fsdp"), metrics(tmp / "single"), 1e-5)
    assert os.path.isdir(tmp / "fsdp" / "ckpt.dcp") and not os.path.exists(tmp / "fsdp" / "ckpt.pt")
    two, one = weights(tmp / "fsdp"), weights(tmp / "single")
    assert_close_weights(two, one, 1e-5)
    probes = [json.load(open(tmp / f"synced.{rank}")) for rank in (0, 1)]
    assert [p["synced"] for p in probes] == [8, 8]
    biases = [k for k in two if k.endswith("router.bias")]  # the main model's MoE layer and the MTP block's
    assert probes[0]["router_bias"] == probes[1]["router_bias"] == [two[k].tolist() for k in biases]
    assert len(biases) == 2 and all(torch.equal(two[k], one[k]) for k in biases)


def test_dense_gqa_on_two_ranks_trains_as_one_process_and_holds_half_the_bytes(text_data, tmp_path, capsys):
    """AdamW, 4 micro-batches a step (2 on each rank, whole): the same run within 1e-5, and each rank holds half the
    bytes of parameters, gradients and optimizer state that one process holds (16 per parameter)."""
    args = ["--gradient_accumulation_steps=4", "--max_iters=6", "--eval_interval=3", "--lr_decay_iters=6"]
    stdout = probe_run(text_data, tmp_path / "fsdp", tmp_path / "synced", *args, "--fsdp=True")
    capsys.readouterr()
    run_inprocess(text_data, tmp_path / "single", *args)
    single_stdout = capsys.readouterr().out
    assert [json.load(open(tmp_path / f"synced.{rank}"))["synced"] for rank in (0, 1)] == [6, 6]
    assert_same_records(metrics(tmp_path / "fsdp"), metrics(tmp_path / "single"), 1e-5)
    assert_close_weights(weights(tmp_path / "fsdp"), weights(tmp_path / "single"), 1e-5)
    assert held_per_parameter(single_stdout) == 16.0 and held_per_parameter(stdout) == 8.0


def test_bfloat16_compiled_per_block_under_fsdp_trains_as_one_process(text_data, tmp_path):
    """A GPU's configuration, rehearsed: bfloat16 with --compile=True under FSDP, which gathers bfloat16 parameters
    (gradients reduced in float32) and compiles each block on its own (torchtitan's way, so that FSDP's hooks stay
    around the compiled blocks), where one eager process autocasts float32 ones: the same val losses within
    bfloat16's rounding, falling as fast. On one FSDP rank (`python train.py --fsdp=True`): the same gathers and
    casts as on two, at half the CPU of compiling the blocks in two processes (the other tests cover two ranks)."""
    args = ["--dtype=bfloat16", "--gradient_accumulation_steps=2", "--max_iters=4", "--eval_interval=2",
            "--lr_decay_iters=4", "--sample_tokens=0"]
    run = run_script("train.py", *TINY, f"--dataset={text_data}", f"--out_dir={tmp_path / 'fsdp'}", *args,
                     "--fsdp=True", "--compile=True", timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "precision: bfloat16 on cpu, torch.compile, FSDP over 1 rank(s)" in run.stdout
    run_inprocess(text_data, tmp_path / "single", *args)
    val = lambda out: [r["val_loss"] for r in metrics(out) if "val_loss" in r]
    two, one = val(tmp_path / "fsdp"), val(tmp_path / "single")
    assert len(two) == 3 and two == pytest.approx(one, abs=0.03)
    assert two[-1] < two[0] - 0.1


def test_every_rank_killed_resumes_bit_for_bit(moe_runs, text_data, tmp_path):
    """kill -9 of both ranks once the first checkpoint is there, then --init_from=resume on 2 ranks: the same
    metrics and weights as the uninterrupted run, bit for bit."""
    out = tmp_path / "killed"
    run = [*TINY, f"--dataset={text_data}", f"--out_dir={out}", *MOE_RUN, "--max_iters=8", "--fsdp=True"]
    ranks = launch_ranks(tmp_path / "killed.logs", TRAIN, *run)
    while not os.path.isdir(out / "ckpt.dcp") and all(r.poll() is None for r in ranks):
        time.sleep(0.005)
    for sig in (signal.SIGSTOP, signal.SIGKILL):  # frozen the moment it is seen: the run has not moved on
        for r in ranks:
            r.send_signal(sig)
    for r in ranks:
        r.wait()
    killed_at = checkpoint.load_checkpoint(str(out / "ckpt.dcp"))["iter_num"]
    assert killed_at == 2 and [r.returncode for r in ranks] == [-signal.SIGKILL] * 2
    run_ranks(tmp_path / "resumed.logs", TRAIN, *run, "--init_from=resume")
    whole = moe_runs[0] / "fsdp"
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_sec", "mfu")} for r in rs]
    assert strip(metrics(out)) == strip(metrics(whole))
    a, b = weights(out), weights(whole)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_two_rank_checkpoint_continues_on_one_process_samples_and_exports(moe_runs, text_data, tmp_path,
                                                                            capsys):
    """The 2-rank checkpoint at step 8, left as a run killed between the two renames of a save leaves it (ckpt.dcp.old
    and a partial ckpt.dcp.tmp): one process (no FSDP) continues it to step 10 as the one-process run continues its
    own, within float32's differences (weights, AdamW's moments and Muon's momenta, the data order), and writes ckpt.pt
    in its place; 2 FSDP ranks continue the one-process ckpt.pt as well. sample.py and export.py read the sharded checkpoint as they read the one-process run's ckpt.pt."""
    tmp = moe_runs[0]
    two, one = tmp_path / "two", tmp_path / "one"
    shutil.copytree(tmp / "fsdp", two)
    shutil.copytree(tmp / "single", one)
    os.rename(two / "ckpt.dcp", two / "ckpt.dcp.old")
    os.makedirs(two / "ckpt.dcp.tmp")
    (two / "ckpt.dcp.tmp" / "__0_0.distcp").write_bytes(b"half a shard")
    for out in (two, one):
        run_inprocess(text_data, out, *MOE_RUN, "--max_iters=10", "--init_from=resume")
    assert sorted(os.listdir(two)) == ["ckpt.pt", "metrics.jsonl", "samples.jsonl"]
    assert_same_records(metrics(two), metrics(one), 1e-4)
    assert_close_weights(weights(two), weights(one), 1e-4)
    # and the other way: the one-process ckpt.pt continued on 2 ranks under FSDP, its optimizer state sharded
    sharded = tmp_path / "sharded"
    shutil.copytree(tmp / "single", sharded)
    run_ranks(tmp_path / "logs", TRAIN, *TINY, f"--dataset={text_data}", f"--out_dir={sharded}", *MOE_RUN,
              "--max_iters=10", "--init_from=resume", "--fsdp=True")
    assert sorted(os.listdir(sharded)) == ["ckpt.dcp", "metrics.jsonl", "samples.jsonl"]
    assert_same_records(metrics(sharded), metrics(one), 1e-4)
    assert_close_weights(weights(sharded), weights(one), 1e-4)

    texts = []
    for name in ("fsdp", "single"):
        export.main([f"--out_dir={tmp / name}", f"--output={tmp_path / name}"])
        capsys.readouterr()
        sample.main([f"--out_dir={tmp / name}", "--start=t5", "--max_new_tokens=12", "--temperature=0", "--device=cpu"])
        texts.append(capsys.readouterr().out)
    assert texts[0].strip() and texts[0] == texts[1]
    exported = [load_file(tmp_path / name / "model.safetensors") for name in ("fsdp", "single")]
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.allclose(exported[0][k], exported[1][k], atol=1e-5, rtol=0) for k in exported[0])


def test_the_dcp_reader_unpickles_nothing_but_dcp_metadata(moe_runs, tmp_path):
    """A .metadata naming another global (here os.system) is refused before it runs, and so is a python object where
    train.py saves tensors (DCP would torch.load it with pickle)."""
    evil = tmp_path / "evil"
    shutil.copytree(moe_runs[0] / "fsdp" / "ckpt.dcp", evil)
    proof = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {proof}",)
    (evil / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError, match="system, which no checkpoint.*refusing to unpickle"):
        checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(str(evil)))
    assert not proof.exists()

    objects = tmp_path / "objects"
    ckpt = checkpoint.load_checkpoint(str(moe_runs[0] / "fsdp" / "ckpt.dcp"))
    state = checkpoint.model_from_checkpoint(ckpt).state_dict()
    state["norm.weight"] = "a python object"
    import torch.distributed.checkpoint as dcp
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"model": state}, checkpoint_id=str(objects))
    shutil.copy(moe_runs[0] / "fsdp" / "ckpt.dcp" / "train.pt", objects / "train.pt")
    with pytest.raises(UserError, match="python object at model.norm.weight"):
        checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(str(objects)))
