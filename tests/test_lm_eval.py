"""The evaluation harness people report with runs on export.py's transformers directory: lm-eval's "hf" model (what
`lm_eval --model hf --model_args pretrained=DIR` runs) on a small multiple-choice task defined here (a task YAML and
a JSONL file, since HellaSwag itself needs the Hub) computes, for every choice, the log-likelihood our own model
gives it, for a dense model (transformers' LlamaForCausalLM) and an MLA + MoE one (DeepseekV3ForCausalLM).

It calls lm_eval.simple_evaluate, the function the lm_eval command calls, in this process and with lm-eval's own
tasks left unindexed: the command takes 15 s longer, reading the YAML of thousands of tasks."""

import json

import pytest
import torch

from conftest import randomize_router_bias, small
from export import export_hf
from tokenizer import load_tokenizer

DOCS = [  # HellaSwag's shape: a context, endings to choose from, the right one's index
    {"context": "The cat sat on the", "endings": ["mat.", "moon, singing loudly.", "idea"], "label": 0},
    {"context": "To boil an egg, put it in", "endings": ["water and heat it.", "the freezer.", "a letter"], "label": 0},
    {"context": "She opened the door and", "endings": ["walked in.", "the door opened her.", "7 8 9"], "label": 0},
]

TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def log_likelihood(model, tokenizer, context, continuation):
    """Our model's log-probability of continuation after context, split into tokens as lm-eval splits them (the
    whole text's tokens past the context's)."""
    ids = tokenizer.encode(context + continuation).ids
    n = len(tokenizer.encode(context).ids)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    logp = logits[0, :-1].float().log_softmax(-1)
    return sum(logp[i - 1, ids[i]].item() for i in range(n, len(ids)))


@pytest.mark.parametrize("arch", ["gqa", "mla_moe"])
def test_lm_eval_log_likelihoods_are_our_model_s(arch, tmp_path):
    import lm_eval  # imported here: only this test needs it, and it takes seconds
    from lm_eval.tasks import TaskManager
    tokenizer = load_tokenizer("cosmo2")
    model = small(arch, vocab_size=tokenizer.get_vocab_size())
    randomize_router_bias(model)
    export_hf(model, tokenizer, str(tmp_path / "hf"))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (tmp_path / "tasks" / "tiny_choice.yaml").write_text(TASK.format(data=tmp_path / "tiny.jsonl"))
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'}", tasks=["tiny_choice"],
                                      task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                               include_defaults=False),
                                      device="cpu", batch_size=4, log_samples=True)
    scored = sorted(results["samples"]["tiny_choice"], key=lambda s: s["doc_id"])
    assert len(scored) == len(DOCS)
    right = 0
    for sample, doc in zip(scored, DOCS):
        theirs = [resp[0][0] for resp in sample["resps"]]
        ours = [log_likelihood(model, tokenizer, doc["context"], " " + ending) for ending in doc["endings"]]
        assert torch.allclose(torch.tensor(theirs), torch.tensor(ours), atol=1e-4, rtol=1e-5), (theirs, ours)
        right += max(range(len(ours)), key=ours.__getitem__) == doc["label"]
    assert results["results"]["tiny_choice"]["acc,none"] == pytest.approx(right / len(DOCS))
