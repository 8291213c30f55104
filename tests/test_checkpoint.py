"""checkpoint.py: what loads and what is refused, with one line that says why."""

import argparse
import dataclasses

import pytest
import torch

from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from configurator import UserError
from conftest import TINY_CONFIG
from hf_format import unfuse
from model import ModelConfig, Transformer

CFG = ModelConfig(**TINY_CONFIG)  # dense GQA


def test_load_checkpoint_refuses_pickle(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    torch.save({"model": {}, "model_config": {}, "settings": {}, "x": argparse.Namespace(a=1)}, path)
    with pytest.raises(UserError, match="pickle"):
        load_checkpoint(path)


def test_checkpoint_of_another_model_layout_is_refused_by_name():
    """A checkpoint with separate wq, wk, wv (before they became one wqkv) names what does not match."""
    state = Transformer(CFG).state_dict()
    ckpt = {"model": unfuse(state, CFG), "model_config": dataclasses.asdict(CFG)}
    with pytest.raises(UserError, match=r"lacks \['layers.0.attn.wqkv.weight'.*has \['layers.0.attn.wq.weight'"):
        model_from_checkpoint(ckpt)
    ckpt["model"] = {**state, "norm.weight": torch.ones(3)}
    with pytest.raises(UserError, match="size mismatch for norm.weight"):
        model_from_checkpoint(ckpt)
    ckpt["model"] = state
    assert torch.equal(model_from_checkpoint(ckpt).norm.weight, state["norm.weight"])


def test_a_checkpoint_of_another_layout_gets_one_line(tmp_path):
    """A checkpoint without the run's settings (as earlier versions wrote them, under "config") is refused with
    what it lacks, before anything reads it further."""
    model = Transformer(CFG)
    path = str(tmp_path / "ckpt.pt")
    model_config = dataclasses.asdict(CFG)
    save_checkpoint({"model": model.state_dict(), "model_config": model_config,
                     "config": {**model_config, "dataset": "old", "max_iters": 7}}, path)
    with pytest.raises(UserError, match=r"is not a train.py checkpoint \(no settings\)"):
        load_checkpoint(path)


def test_model_settings_this_version_does_not_know_are_refused():
    ckpt = {"model": Transformer(CFG).state_dict(), "model_config": {**dataclasses.asdict(CFG), "attention_sink": 1}}
    with pytest.raises(UserError, match="does not know: attention_sink"):
        model_from_checkpoint(ckpt)
