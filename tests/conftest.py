"""What several test files share: the project's root, the tiny models, the tiny dataset and a tiny trained run,
train.py's tiny settings, and the way the tests run the project's scripts. Test files import these names from
here (`from conftest import ...`) and never from one another; the fixtures (data, trained) need no import."""

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models as tokenizer_models

# tests import the project's top-level modules (model, train, prepare, ...) and run its scripts
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach the Hub

# the suite's models are tiny: one intra-op thread is faster than two for such small ops, and does not
# spin against the other processes (torchrun ranks, scripts under test) that share the machine's cores
torch.set_num_threads(1)

import checkpoint  # noqa: E402  (after the path that finds it)
import generate  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402


# ---- the project's scripts in a subprocess ----

def tests_env(env=None):
    """The environment of the tests' subprocesses: this one, with one OpenMP thread (tiny matmuls gain nothing
    from more, and oversubscribed threads crawl when other test processes share the two cores; subprocesses and
    in-process runs then also compute identically), plus the variables in env."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}


def run_python(*args, env=None, **kwargs):
    """`python ARGS` (e.g. "-c", code or "-m", module) in a subprocess, from ROOT unless cwd says otherwise, in
    the tests' environment plus env; stdout and stderr captured as text. The CompletedProcess."""
    kwargs = {"cwd": ROOT, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **kwargs}
    return subprocess.run([sys.executable, *map(str, args)], env=tests_env(env), **kwargs)


def run_script(name, *args, **kwargs):
    """One of the project's scripts (train.py, sample.py, export.py, prepare.py, plot.py, ...) run to its end, as
    run_python runs it. The CompletedProcess."""
    return run_python(os.path.join(ROOT, name), *args, **kwargs)


def start_script(name, *args, env=None, **kwargs):
    """One of the project's scripts started as run_script runs it, without waiting for it. The Popen."""
    kwargs = {"cwd": ROOT, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **kwargs}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, name), *map(str, args)], env=tests_env(env),
                            **kwargs)


# ---- tiny models ----

# model.py's, generate.py's tests and the MTP tests: every kind of attention and MoE, vocabulary 97
TINY_CONFIG = dict(vocab_size=97, block_size=64, n_layer=2, n_embd=48, n_head=4, n_kv_head=2, intermediate_size=96,
                   kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, moe_intermediate_size=32)
VARIANTS = {
    "gqa": dict(attention="gqa"),
    "mqa": dict(attention="gqa", n_kv_head=1),
    "mla": dict(attention="mla", q_lora_rank=0),
    "mla_qlora_moe": dict(attention="mla", q_lora_rank=16, n_routed_experts=6, n_activated_experts=2,
                          n_shared_experts=1, first_k_dense=1),
    "gqa_moe_softmax": dict(attention="gqa", n_routed_experts=5, n_activated_experts=3, n_shared_experts=0,
                            first_k_dense=0, score_func="softmax", route_scale=2.0),
}
ARCHS = {"gqa": VARIANTS["gqa"], "mla_moe": VARIANTS["mla_qlora_moe"]}  # one dense, one MLA + MoE


def tiny(seed=0, **overrides):
    """A seeded TINY_CONFIG model with overrides (e.g. **VARIANTS["mla"]), in eval mode."""
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY_CONFIG, **overrides})).eval()


def randomize_router_bias(model, scale=0.3):
    for moe in model.moe_layers():  # non-zero biases so that tests cover biased selection
        moe.router.bias.uniform_(-scale, scale)


# sample.py's checkpoints (test_sample.py) and generate.py's decoding against full forwards: a vocabulary of 512
# (the checkpoints widen it to the cosmo2 tokenizer's), block_size 32
SMALL_CONFIG = dict(vocab_size=512, block_size=32, n_layer=2, n_embd=32, n_head=4)
SMALL_MODELS = {
    "gqa": dict(attention="gqa", n_kv_head=2, intermediate_size=64),
    "mla_moe": dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                    intermediate_size=64, n_routed_experts=4, n_activated_experts=2, moe_intermediate_size=16),
}


def small(name, **change):
    """The seeded SMALL_MODELS[name] with changes, in eval mode."""
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**SMALL_CONFIG, **SMALL_MODELS[name], **change})).eval()


# the exports' models (test_export.py, test_hf_format.py, test_gguf_format.py): a vocabulary of 512, every layout
# transformers and llama.cpp have a name for
EXPORT_CONFIG = dict(vocab_size=512, block_size=64, n_embd=64, n_head=4, intermediate_size=96)
EXPORT_MODELS = {
    "dense_gqa": dict(attention="gqa", n_layer=2, n_kv_head=2, tie_embeddings=True, rope_theta=100000.0),
    # q_lora_rank 0 (q_proj), untied head, norm_eps large enough that transformers' fixed 1e-6 latent eps
    # would show if the export did not compensate for it
    "mla_moe": dict(attention="mla", n_layer=3, q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=16,
                    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=6, n_activated_experts=2,
                    n_shared_experts=2, moe_intermediate_size=32, first_k_dense=1, route_scale=1.5,
                    norm_eps=1e-3, tie_embeddings=False, bias_update_rate=0.01, rope_theta=500.0),
    # compressed queries (q_a_proj, q_a_layernorm, q_b_proj), all layers MoE, tied head
    "mla_moe_q_lora": dict(attention="mla", n_layer=2, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
                           qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_activated_experts=3,
                           n_shared_experts=1, moe_intermediate_size=32, first_k_dense=0,
                           norm_eps=1e-4, tie_embeddings=True, bias_update_rate=0.01),
    # a multi-token-prediction module, which exports leave out: the main model's logits must stay the same
    "mla_moe_mtp": dict(attention="mla", n_layer=2, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                        v_head_dim=16, n_routed_experts=4, n_activated_experts=2, moe_intermediate_size=32,
                        first_k_dense=1, mtp_depth=1, bias_update_rate=0.01),
    # MLA with dense SwiGLU layers only: DeepSeek-V3 with every layer among the "first dense" ones
    "mla_dense": dict(attention="mla", n_layer=2, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                      v_head_dim=16, n_routed_experts=0),
}


def export_model(name, trained, models=EXPORT_MODELS):
    """The seeded EXPORT_CONFIG model models[name], in eval mode; trained: after a few AdamW steps on random
    tokens, with loss-free balancing moving the router biases."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**EXPORT_CONFIG, **models[name]))
    if trained:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(3):
            x = torch.randint(0, 512, (4, 33))
            _, losses = model(x[:, :-1], x[:, 1:])
            losses.total.backward()
            opt.step()
            opt.zero_grad()
            model.update_router_bias(model.pop_expert_counts())
        for moe in model.moe_layers():
            assert moe.router.bias.abs().sum() > 0
    return model.eval()


def write_checkpoint(model, tokenizer, out_dir):
    """out_dir/ckpt.pt holding a given model and tokenizer, as export.py and sample.py read it (no training
    state); for a checkpoint of a train.py run, use the trained fixture."""
    os.makedirs(out_dir, exist_ok=True)
    checkpoint.save_checkpoint({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                                "settings": {"dataset": "none"}, "tokenizer": tokenizer.to_str()},
                               os.path.join(out_dir, "ckpt.pt"))


# ---- train.py on a tiny synthetic dataset ----

VOCAB = 64
# AdamW, whose figures the tests' thresholds were measured with; the tests that cover Muon, the default, say so
TINY = ["--device=cpu", "--dtype=float32", "--compile=False", "--optimizer=adamw", f"--vocab_size={VOCAB}", "--n_layer=2", "--n_embd=32", "--n_head=2",
        "--n_kv_head=1", "--intermediate_size=64", "--block_size=16", "--batch_size=4", "--eval_iters=2",
        "--warmup_iters=2", "--learning_rate=3e-3", "--min_lr=3e-4", "--log_interval=1", "--sample_tokens=4"]
MOE = ["--attention=mla", "--kv_lora_rank=16", "--qk_nope_head_dim=8", "--qk_rope_head_dim=8", "--v_head_dim=8",
       "--n_routed_experts=8", "--n_activated_experts=2", "--n_shared_experts=1", "--moe_intermediate_size=16",
       "--first_k_dense=1"]


def write_dataset(root, shard_lengths=(12_000,), val_tokens=2_000, seed=0, eot="t0"):
    """Counting with random restarts (next = previous + 1 mod VOCAB, 10% jumps): learnable in a few steps. Token i
    is "ti", token 0 (the end of text) `eot` ("<|endoftext|>" for a checkpoint that export.py can name)."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)

    def tokens(n):
        jumps = rng.random(n) < 0.1
        start = np.maximum.accumulate(np.where(jumps, np.arange(n), 0))      # index of the last jump
        return ((rng.integers(VOCAB, size=n)[start] + np.arange(n) - start) % VOCAB).astype(np.uint16)

    splits = {"train": [], "val": []}
    for split, lengths in (("train", shard_lengths), ("val", (val_tokens,))):
        for i, n in enumerate(lengths):
            name = f"{split}_{i:05d}.bin"
            tokens(n).tofile(os.path.join(root, name))
            splits[split].append({"file": name, "tokens": n})
    tok = Tokenizer(tokenizer_models.WordLevel({eot: 0, **{f"t{i}": i for i in range(1, VOCAB)}}, unk_token=eot))
    with open(os.path.join(root, "tokenizer.json"), "w") as f:
        f.write(tok.to_str())
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump({"tokenizer": "tokenizer.json", "vocab_size": VOCAB, "eot_id": 0, "dtype": "uint16",
                   "source": {"synthetic": "counting"}, "splits": splits, "complete": True}, f)
    return root


def metrics(out_dir):
    """The records of a finished run's metrics.jsonl."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_inprocess(data, out_dir, *args):
    """train.main with TINY's settings on the dataset data, into out_dir; the out_dir."""
    import train
    train.main([*TINY, f"--dataset={data}", f"--out_dir={out_dir}", *args])
    return str(out_dir)


@pytest.fixture
def one_thread():
    """Training in the test process on one intra-op thread (the subprocesses' OMP_NUM_THREADS=1), whatever an
    earlier test set; its setting back afterwards. Test files that train use it for every test (pytestmark)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """write_dataset's default dataset (read only: train.py never writes beside it)."""
    return write_dataset(str(tmp_path_factory.mktemp("data") / "tiny"))


@pytest.fixture(scope="session")
def trained(data, tmp_path_factory):
    """The out_dir of a train.py run: a tiny dense GQA model (TINY) trained for 40 steps, evaluated (and
    checkpointed, sampled) every 20. Shared by the session: copy it before changing anything in it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = run_inprocess(data, tmp_path_factory.mktemp("trained"), "--max_iters=40", "--eval_interval=20",
                        "--lr_decay_iters=40")
    torch.set_num_threads(threads)
    return out


# ---- serve.py's app, served in a thread of the test process (test_serve.py, test_serve_page.py) ----

@pytest.fixture(scope="session")
def text_checkpoint(tmp_path_factory):
    """The out_dir of a small dense model with the cosmo2 tokenizer (so that prompts are text), block_size 128."""
    from tokenizer import load_tokenizer
    root = tmp_path_factory.mktemp("text") / "ckpt"
    tokenizer = load_tokenizer("cosmo2")
    write_checkpoint(small("gqa", vocab_size=tokenizer.get_vocab_size(), block_size=128), tokenizer, root)
    return root


class Gate:
    """generate.stream as serve.py calls it, paced by a test: the first `free` tokens pass, then the stream waits
    (`waiting` set) until the test calls open(). Counts the tokens given out and sets `closed` when the stream ends."""

    def __init__(self, free):
        self.free, self.given = free, 0
        self.waiting, self.opened, self.closed = threading.Event(), threading.Event(), threading.Event()

    def open(self):
        self.opened.set()

    def stream(self, *args, **kwargs):
        try:
            for tokens in generate.stream(*args, **kwargs):
                if self.given == self.free:
                    self.waiting.set()
                    assert self.opened.wait(timeout=120), "the test never opened the gate"
                self.given += 1
                yield tokens
        finally:
            self.closed.set()


@dataclasses.dataclass
class Serving:
    url: str        # http://127.0.0.1:PORT
    server: object  # the uvicorn.Server: server_state.connections holds the connections it has open


@contextlib.contextmanager
def serving(app):
    """app (serve.build_app's) served by uvicorn in a thread on a free port: a Serving. In this process, so that a
    test can pace the decoding with a Gate."""
    import uvicorn
    import serve
    sock = serve.listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:  # uvicorn's own flag, set once it accepts connections
            assert thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        yield Serving(f"http://127.0.0.1:{sock.getsockname()[1]}", server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
