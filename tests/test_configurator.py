"""configurator.py: config files and --key=value overrides, their types, unknown keys, from_settings (a
dataclass's fields out of the settings), -h/--help from the settings' own comments, and Ctrl-C in run_main."""

import dataclasses
import importlib

import pytest

from configurator import UserError, configure, field_comments, flat_fields, from_settings
from conftest import run_python, run_script
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


@dataclasses.dataclass
class Example:
    """A docstring, then a section heading: neither is a setting's meaning."""
    # a section
    lr: float = 1e-3                    # the peak learning rate
    prompts: list = dataclasses.field(  # continued at every evaluation
        default_factory=lambda: ["a # not a comment"])
    dtype: str = "auto"                 # "auto" or a precision,
                                        # said on two lines
    # another section
    quiet: bool = False

    @property
    def doubled(self):  # a method's comment belongs to no setting
        return 2 * self.lr


def test_field_comments_are_the_comments_beside_the_fields():
    assert field_comments(Example) == {"lr": "the peak learning rate", "prompts": "continued at every evaluation",
                                       "dtype": '"auto" or a precision, said on two lines', "quiet": ""}


@pytest.mark.parametrize("script, config", [("train", "TrainConfig"), ("prepare", "PrepareConfig"),
                                            ("export", "ExportConfig"), ("sample", "SampleConfig"),
                                            ("bench", "BenchConfig"), ("serve", "ServeConfig"),
                                            ("memory", "MemoryConfig")])
def test_help_lists_every_setting_with_its_default_and_meaning(script, config, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    settings = [line for line in lines if line.startswith("  --")]
    defaults = flat_fields(getattr(module, config)())
    assert len(settings) == len(defaults)
    for line, (key, value) in zip(settings, defaults.items()):
        shown = f"  --{key}={value!r}"
        assert line.startswith(shown) and line[len(shown):].strip(), line  # in order, each with its meaning
    if script == "train":  # a meaning in train.py and one in model.py, word for word
        assert any(line.split() == ["--eval_interval=250", *"evaluate (and checkpoint) every this many optimizer "
                                    "steps".split()] for line in lines)
        assert any(line.startswith("  --n_embd=768 ") and line.endswith(" model width") for line in lines)


def test_h_exits_0_from_the_command_line():
    r = run_script("train.py", "config/cpu_moe.py", "-h")  # (--help in-process above)
    assert r.returncode == 0 and r.stderr == "" and "--max_iters=5000 " in r.stdout


def test_a_ctrl_c_outside_a_script_s_own_handling_is_one_line(tmp_path):
    """e.g. while train.py builds its model: `interrupted` and exit code 130, no traceback."""
    r = run_python("-c", "from configurator import run_main\n"
                         "def main():\n    raise KeyboardInterrupt\n"
                         "run_main(main)")
    assert (r.returncode, r.stderr) == (130, "interrupted\n")
