"""
nanoGPT-style configuration, shared by every script.

A script declares its settings as a dataclass whose fields are the settings, each with its default and a comment
saying what it means (train.py's TrainConfig: a nested dataclass field, its ModelConfig, contributes its fields under
their own names), then calls `configure(defaults, argv)` (which also takes a plain dict of defaults):

    python train.py config/deepseek_moe.py --batch_size=8 --compile=False --start "Once upon a time" --quick

Arguments that do not start with `--` are python config files holding plain assignments, applied in
order; `--key=value` and `--key value` override single settings afterwards, and a bare `--flag`
sets a boolean to True. Unlike nanoGPT's exec of
globals, every key must already exist in the defaults and keep its type, so a typo is an error
rather than a silent new global.

Expected mistakes raise `UserError`; scripts run their `main` under `run_main`, which prints one
line to stderr and exits non-zero instead of a traceback.

`-h`/`--help` prints every setting with its default and the comment beside it in the dataclass's source (the
one place a setting is declared), and exits.

`read_file(path)` gives a config file's assignments unchecked, for readers that take only part of it;
`from_settings(ModelConfig, settings)` takes the fields of a dataclass out of such a dict (or a script's
settings, or a checkpoint's model_config) and checks them: the one route from settings to a model.
"""

import ast
import dataclasses
import difflib
import inspect
import io
import os
import sys
import textwrap
import tokenize


class UserError(Exception):
    """A mistake in the user's input: reported as one line, never as a traceback."""


def run_main(main):
    """Run `main()`, turning a UserError into `error: ...` on stderr and exit code 2, and a Ctrl-C that the script
    does not handle itself (e.g. while a model is being built) into one line and exit code 130."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def first_line(e):
    """The first line of an exception's message, for a one-line error."""
    return (str(e).strip().splitlines() or [""])[0][:300]


def check_type(key, value, default, where):
    """Return `value` if it fits the type of `default` (ints widen to floats), else raise."""
    if default is None or value is None:  # None means "any" / "unset"
        return value
    want = type(default)
    if want is float and type(value) is int:
        return float(value)
    if type(value) is not want:
        raise UserError(f"{where}: {key} must be {want.__name__}, got {value!r} ({type(value).__name__})")
    return value


def from_settings(cls, settings, where="settings", strict=False):
    """The dataclass cls (e.g. ModelConfig) from the keys of a settings dict that are its fields, each checked against
    the type of its default; the rest are other settings and stay out, unless strict (a checkpoint's model_config
    holds fields only: one this version does not know means another version wrote it). The dataclass's own checks
    (__post_init__'s ValueError) are the user's mistake too."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - set(defaults))
    if strict and unknown:
        raise UserError(f"{where} has fields this version does not know: {', '.join(unknown[:5])}")
    fields = {k: check_type(k, v, defaults[k], where) for k, v in settings.items() if k in defaults}
    try:
        return cls(**fields)
    except ValueError as e:
        raise UserError(f"{where}: bad {cls.__name__} settings: {e}") from None


def _parse_value(key, text, default):
    """Parse a command-line value: python literals, except that string settings keep the raw text."""
    if isinstance(default, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if default is None:
            return text
        raise UserError(f"--{key}={text}: not a valid {type(default).__name__}")


def read_file(path):
    """The assignments of a config file, {name: value}, leaving out names that start with _ and modules."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist (try one of config/*.py)")
    namespace = {"__file__": os.path.abspath(path)}  # a config may build on another beside it (finetune_smollm2.py)
    try:
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), namespace)
    except Exception as e:  # a broken config file is the user's mistake, not ours
        raise UserError(f"config file {path} failed: {type(e).__name__}: {e}")
    return {k: v for k, v in namespace.items() if not k.startswith("_") and type(v).__name__ != "module"}


def suggestion(key, known):
    """': did you mean --X?' for the known setting closest to an unknown key, else the list of known ones.
    Closest: the one it abbreviates, by initials (lr -> learning_rate) or word by word (grad_accum ->
    gradient_accumulation_steps), else the nearest spelling."""
    words = key.split("_")
    abbreviates = lambda k: "".join(w[:1] for w in k.split("_")) == key or \
        len(words) <= len(k.split("_")) and all(w.startswith(a) for a, w in zip(words, k.split("_")))
    close = sorted(k for k in known if abbreviates(k)) or difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f": did you mean --{close[0]}?" if close else f" (known: {', '.join(sorted(known))})"


def _apply_file(settings, path):
    for key, value in read_file(path).items():
        if key not in settings:
            raise UserError(f"{path}: unknown key '{key}'{suggestion(key, settings)}")
        settings[key] = check_type(key, value, settings[key], path)


def configure(defaults, argv=None):
    """Return a copy of `defaults` (a dict, or a dataclass instance) updated by the config files and overrides in
    `argv`; a dataclass's own checks (__post_init__) run on the result."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if dataclasses.is_dataclass(defaults):
        if "-h" in argv or "--help" in argv:
            print(settings_help(defaults))
            raise SystemExit(0)
        return rebuilt(defaults, configure(flat_fields(defaults), argv))
    settings = dict(defaults)
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            _apply_file(settings, arg)
            continue
        key, eq, text = arg[2:].partition("=")
        if not eq and isinstance(defaults.get(key), bool) and (i >= len(argv) or argv[i].startswith("--")):
            eq, text = "=", "True"  # a bare boolean flag: `--quick` means `--quick=True`
        if not eq:  # `--key value`
            if i >= len(argv):
                raise UserError(f"--{key} needs a value (--{key}=VALUE)")
            text = argv[i]
            i += 1
        if key not in defaults:
            raise UserError(f"unknown option --{key}{suggestion(key, defaults)}")
        settings[key] = check_type(key, _parse_value(key, text, defaults[key]), defaults[key], f"--{key}")
    return settings


def flat_fields(obj):
    """{name: value} of a dataclass instance's fields, a nested dataclass contributing its own fields instead."""
    flat = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        flat.update(flat_fields(value) if dataclasses.is_dataclass(value) else {f.name: value})
    return flat


def rebuilt(obj, flat):
    """A copy of the dataclass instance obj with its fields (and its nested dataclasses') from flat; their own
    checks' ValueError is the user's mistake."""
    changes = {f.name: rebuilt(getattr(obj, f.name), flat) if dataclasses.is_dataclass(getattr(obj, f.name))
               else flat[f.name] for f in dataclasses.fields(obj)}
    try:
        return dataclasses.replace(obj, **changes)
    except ValueError as e:
        raise UserError(f"bad {type(obj).__name__} settings: {e}") from None


def field_comments(cls):
    """{field: the comment beside it (and its indented continuation lines)} from a dataclass's source."""
    source = textwrap.dedent(inspect.getsource(cls))
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    body = next(t.end[1] for t in tokens if t.type == tokenize.INDENT)  # the class body's indentation
    comments, field, in_statement = {}, None, False
    for tok, following in zip(tokens, tokens[1:]):
        if tok.type == tokenize.NAME and tok.start[1] == body and not in_statement:
            field = tok.string if following.string == ":" else None  # a field, or a method/property
            comments.setdefault(field, [])
            in_statement = True
        elif tok.type == tokenize.NEWLINE:
            in_statement = False
        elif tok.type == tokenize.COMMENT and field:
            if in_statement or tok.start[1] > body:  # beside the field, or continuing that comment below it
                comments[field].append(tok.string.lstrip("#").strip())
            else:  # a section heading
                field = None
    return {k: " ".join(v) for k, v in comments.items() if k}


def settings_help(obj):
    """--help's text: every setting of the dataclass instance obj (a nested dataclass's fields under their own
    names) with its default and meaning."""
    lines = [f"usage: python {os.path.basename(sys.argv[0])} [CONFIG_FILE.py ...] [--key=value ...]", "",
             "Config files (python assignments) apply in order, then --key=value. Settings, with their defaults:"]

    def add(obj):
        comments = field_comments(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                add(value)
                continue
            lines.append(f"  --{f.name}={value!r}".ljust(34) + " " + comments.get(f.name, ""))
    add(obj)
    return "\n".join(lines)
