"""export.py --format=hf: what transformers loads from the exported directory computes our numbers."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import checkpoint
import export
import pretrained
from configurator import UserError, run_main
from generate import Sampling, generate
from model import ModelConfig, Transformer
from tokenizer import eot_id, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TINY = dict(vocab_size=512, block_size=64, n_embd=64, n_head=4, intermediate_size=96)
CONFIGS = {
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


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("cosmo2")


def tiny_model(name, trained, configs=CONFIGS):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, **configs[name]))
    if trained:  # a few AdamW steps on random tokens, with loss-free balancing moving the router biases
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


def save_checkpoint(model, tokenizer, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    checkpoint.save_checkpoint({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                                "settings": {"dataset": "none"}, "tokenizer": tokenizer.to_str()},
                               os.path.join(out_dir, "ckpt.pt"))


@pytest.mark.parametrize("trained", [False, True], ids=["random", "trained"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip(name, trained, tokenizer, tmp_path, capsys):
    model = tiny_model(name, trained)
    save_checkpoint(model, tokenizer, tmp_path)
    export.main([f"--out_dir={tmp_path}"])  # the script's path: checkpoint -> out_dir/hf
    said = capsys.readouterr().out
    assert ("left out the 1 multi-token-prediction module(s)" in said) == (model.config.mtp_depth == 1)
    hf_dir = tmp_path / "hf"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(hf_dir))

    theirs, info = AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    kind = "LlamaForCausalLM" if model.config.attention == "gqa" else "DeepseekV3ForCausalLM"
    assert type(theirs).__name__ == kind
    theirs.eval()

    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits, _ = model(ids)
        their_logits = theirs(ids).logits
    torch.testing.assert_close(their_logits, ours_logits, atol=1e-4, rtol=0)

    prompt = ids[:1, :6]
    ours_greedy = generate(model, prompt, 20, Sampling(temperature=0))
    their_greedy = theirs.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours_greedy.tolist() == their_greedy.tolist()

    their_tok = AutoTokenizer.from_pretrained(hf_dir)
    text = "Once upon a time, 42 dragons<|endoftext|>"
    assert their_tok(text)["input_ids"] == tokenizer.encode(text).ids
    assert their_tok.eos_token_id == eot_id(tokenizer) == theirs.config.eos_token_id


def test_hub_loader_reads_an_exported_llama(tokenizer, tmp_path):
    """pretrained.load_hub (the Hub safetensors path, which this machine cannot reach) reads back what
    export wrote, through the same name mapping."""
    model = tiny_model("dense_gqa", trained=True)
    export.export_hf(model, tokenizer, tmp_path)
    fresh = Transformer(model.config)
    pretrained.load_hub(fresh, tmp_path / "config.json", tmp_path / "model.safetensors")
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    other = Transformer(dataclasses.replace(model.config, n_layer=3))
    with pytest.raises(UserError, match="n_layer=2"):
        pretrained.load_hub(other, tmp_path / "config.json", tmp_path / "model.safetensors")


@pytest.mark.parametrize("change, message", [
    (dict(score_func="softmax"), "sigmoid"),
    (dict(attention="gqa", n_kv_head=2), "GQA model with MoE"),
])
def test_refuses_what_transformers_cannot_represent(change, message, tokenizer, tmp_path):
    cfg = ModelConfig(**TINY, **{**CONFIGS["mla_moe"], **change})
    with pytest.raises(UserError, match=message):
        export.export_hf(Transformer(cfg), tokenizer, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # nothing written


def test_bad_input(tokenizer, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:  # as `python export.py` runs it, without a new process
        run_main(lambda: export.main([f"--out_dir={tmp_path / 'nothing'}"]))
    assert exit.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: no checkpoint at {tmp_path / 'nothing' / 'ckpt.pt'}")
    # the script itself, on a checkpoint that transformers cannot represent
    cfg = ModelConfig(**TINY, **{**CONFIGS["mla_moe"], "score_func": "softmax"})
    save_checkpoint(Transformer(cfg), tokenizer, tmp_path / "softmax")
    run = subprocess.run([sys.executable, "export.py", f"--out_dir={tmp_path / 'softmax'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("error: cannot export score_func='softmax'") and run.stderr.count("\n") == 1
    assert not (tmp_path / "softmax" / "hf").exists()
