"""bench.py end to end on tiny configs: every section runs, both sides compute the same logits, and the
figures it reports are consistent with the models it measured."""

import json
import math

import pytest

import bench
from configurator import from_settings, read_file
from model import ModelConfig, Transformer

DENSE = """attention = "gqa"
vocab_size = 256
n_layer = 2
n_embd = 32
n_head = 4
n_kv_head = 2
intermediate_size = 64
n_routed_experts = 0
"""
MOE = """attention = "mla"
vocab_size = 256
n_layer = 2
n_embd = 32
n_head = 4
q_lora_rank = 0
kv_lora_rank = 16
qk_nope_head_dim = 8
qk_rope_head_dim = 4
v_head_dim = 8
intermediate_size = 64
n_routed_experts = 8
n_activated_experts = 2
n_shared_experts = 1
moe_intermediate_size = 16
first_k_dense = 1
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_runs_every_section_on_tiny_models(tmp_path, capsys, dtype):
    (tmp_path / "dense.py").write_text(DENSE)
    (tmp_path / "moe.py").write_text(MOE)
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--prepare=False", "--batch_size=2", "--block_size=64", f"--out={out}", "--moe_tokens=256",
                f"--dtype={dtype}", f"--dense_config={tmp_path / 'dense.py'}", f"--moe_config={tmp_path / 'moe.py'}"])
    results = json.loads(out.read_text())
    assert set(results["train"]) == set(results["generate"]) == {"dense GQA", "MLA + MoE"}
    for family in results["train"]:
        for side in ("ours", "transformers"):
            assert results["train"][family][side]["tokens_per_s"] > 0
        for row in results["generate"][family].values():
            assert row["max_logit_diff"] < 1e-4  # the twins hold the same weights and compute the same function
            assert row["ours"] > 0 and row["transformers"] > 0
    # KV cache per token, all layers, float32: GQA keys + values; MLA the latent and the shared RoPE key
    assert results["kv_bytes_per_token"]["dense GQA"] == [2 * 2 * 2 * 8 * 4] * 2
    assert results["kv_bytes_per_token"]["MLA + MoE"][0] == 2 * (16 + 4) * 4
    assert set(results["moe_layer"]) == {"8 experts, top-2", "16 experts, top-2", "64 experts, top-6"}
    tolerance = 1e-4 if dtype == "float32" else 5e-2  # the grouped and looped MoE against the masked loop
    assert all(0 <= r["max_rel_diff"] < tolerance and r["dense_ms"] > 0 for r in results["moe_layer"].values())
    assert results["machine"].endswith(dtype)
    # MFU = training FLOPs per token (the model's own count, checked against FlopCounterMode in test_model.py)
    # x tokens/s / peak
    for family, path in (("dense GQA", "dense.py"), ("MLA + MoE", "moe.py")):
        cfg = from_settings(ModelConfig, {**read_file(str(tmp_path / path)), "block_size": 64})
        ours = results["train"][family]["ours"]
        assert ours["mfu"] == pytest.approx(Transformer(cfg).flops_per_token(64) * ours["tokens_per_s"] /
                                            results["peak_flops"], rel=1e-9)
    # speculative decoding: the same greedy tokens as plain decoding, and the acceptance its counts give. After the
    # first of the 32 tokens, a round drafts one token (one module) and emits the accepted draft and one token
    # more; a round at the 31st token drafts none. So accepted + rounds = 31, with one undrafted round or none.
    spec = results["speculative"]
    assert spec["same_tokens"] and spec["plain"] > 0 and spec["speculative"] > 0
    assert 30 <= spec["accepted"] + spec["drafted"] <= 31 and spec["acceptance"] == spec["accepted"] / spec["drafted"]
    if dtype == "float32":  # how well a tiny model learns in 40 steps of bfloat16 depends on the CPU's instruction set
        assert spec["mtp_loss"] < math.log(256) - 2 and 0.5 * spec["drafted"] < spec["accepted"]
    table = capsys.readouterr().out
    assert "| generate, MLA + MoE, batch 8 (tokens/s) |" in table and "differ" not in table
    assert "| speculative decoding, MLA + MoE + 1 MTP module, batch 1, greedy |" in table
