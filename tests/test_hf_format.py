"""hf_format.py: our names and transformers' names map both ways, the stacked matrices split and join back."""

import torch

from conftest import EXPORT_CONFIG, EXPORT_MODELS
from hf_format import fuse, hf_name, our_name, unfuse, without_mtp
from model import ModelConfig, Transformer


def test_name_mapping_round_trips():
    for name in EXPORT_MODELS:
        cfg = ModelConfig(**EXPORT_CONFIG, **EXPORT_MODELS[name])
        state = without_mtp(Transformer(cfg).state_dict())  # exports leave the MTP modules out
        theirs = {hf_name(k): v for k, v in unfuse(state, cfg).items()}
        assert not any("wqkv" in k or "gate_up" in k for k in theirs)  # transformers keeps them apart
        back = fuse({our_name(k): v for k, v in theirs.items()})
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)


def test_without_mtp_keeps_exactly_the_main_model():
    cfg = ModelConfig(**EXPORT_CONFIG, **EXPORT_MODELS["mla_moe_mtp"])
    main = Transformer(ModelConfig(**EXPORT_CONFIG, **{**EXPORT_MODELS["mla_moe_mtp"], "mtp_depth": 0})).state_dict()
    assert cfg.mtp_depth == 1 and without_mtp(Transformer(cfg).state_dict()).keys() == main.keys()
