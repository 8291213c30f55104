"""configurator.py: config files and --key=value overrides, their types, unknown keys, and from_settings (a
dataclass's fields out of the settings)."""

import pytest

from configurator import UserError, configure, from_settings
from model import ModelConfig

DEFAULTS = {"batch_size": 12, "learning_rate": 6e-4, "compile": True, "out_dir": "out", "top_k": None}


def write(tmp_path, text):
    path = tmp_path / "cfg.py"
    path.write_text(text)
    return str(path)


def test_file_then_overrides_in_order(tmp_path):
    path = write(tmp_path, "import math\nbatch_size = 4\nlearning_rate = 1e-3\n_private = 'ignored'\n")
    config = configure(DEFAULTS, [path, "--batch_size=8", "--compile", "False", "--out_dir=out/x"])
    assert config == {"batch_size": 8, "learning_rate": 1e-3, "compile": False, "out_dir": "out/x", "top_k": None}
    assert DEFAULTS["batch_size"] == 12  # the defaults themselves are untouched


def test_types():
    assert configure(DEFAULTS, ["--learning_rate=1"])["learning_rate"] == 1.0  # ints widen to floats
    assert configure(DEFAULTS, ["--out_dir", "123"])["out_dir"] == "123"       # strings stay raw text
    assert configure(DEFAULTS, ["--top_k=5"])["top_k"] == 5                    # None accepts any literal
    assert configure(DEFAULTS, ["--compile=False", "--compile"])["compile"] is True  # a bare boolean flag
    with pytest.raises(UserError, match="batch_size must be int"):
        configure(DEFAULTS, ["--batch_size=2.5"])
    with pytest.raises(UserError, match="compile"):
        configure(DEFAULTS, ["--compile=maybe"])


def test_unknown_keys_and_missing_things(tmp_path):
    with pytest.raises(UserError, match="unknown option --batchsize: did you mean --batch_size"):
        configure(DEFAULTS, ["--batchsize=3"])
    with pytest.raises(UserError, match="unknown key 'lr'"):
        configure(DEFAULTS, [write(tmp_path, "lr = 3e-4\n")])
    with pytest.raises(UserError, match="does not exist"):
        configure(DEFAULTS, ["config/nope.py"])
    with pytest.raises(UserError, match="needs a value"):
        configure(DEFAULTS, ["--batch_size"])
    with pytest.raises(UserError, match="failed: NameError"):
        configure(DEFAULTS, [write(tmp_path, "batch_size = undefined_name\n")])


def test_an_unknown_option_suggests_the_closest_known_one():
    known = {"learning_rate": 1e-3, "gradient_accumulation_steps": 1, "grad_clip": 1.0, "max_iters": 10, "n_layer": 2}
    for typed, meant in [("lr", "learning_rate"), ("grad_accum", "gradient_accumulation_steps"), ("max_iter", "max_iters"),
                         ("learnin_rate", "learning_rate"), ("n_layers", "n_layer")]:
        with pytest.raises(UserError, match=f"unknown option --{typed}: did you mean --{meant}\\?$"):
            configure(known, [f"--{typed}=1"])
    with pytest.raises(UserError, match=r"unknown option --zzz \(known: grad_clip, gradient_accumulation_steps, "):
        configure(known, ["--zzz=1"])


def test_from_settings_takes_the_model_fields_and_checks_their_types():
    cfg = from_settings(ModelConfig, {"n_layer": 3, "route_scale": 2, "batch_size": 8, "out_dir": "x"})
    assert (cfg.n_layer, cfg.route_scale, cfg.n_embd) == (3, 2.0, ModelConfig().n_embd)  # ints widen to floats
    with pytest.raises(UserError, match="config/x.py: n_layer must be int, got '3'"):
        from_settings(ModelConfig, {"n_layer": "3"}, where="config/x.py")
    with pytest.raises(UserError, match="bad ModelConfig settings: n_head .* multiple of n_kv_head"):
        from_settings(ModelConfig, {"n_head": 6, "n_kv_head": 4})
    with pytest.raises(UserError, match="does not know: batch_size"):
        from_settings(ModelConfig, {"n_layer": 3, "batch_size": 8}, strict=True)
