"""jpeft.config: nested dataclasses as TOML layers and a tyro command line; the experiments' run
configs built on it (nesting, layering order, '+' compositions, errors, --help, and the old
command lines resolving to the same config)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jpeft.config import ConfigError, Flat, apply, from_dict, leaves, parse, to_dict

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Inner:
    r: int = field(default=8, metadata={"help": "the rank"})
    alpha: float = 16.0
    layers: tuple[int, ...] = ()
    pattern: dict[str, int] = field(default_factory=dict)
    flag: bool = False


@dataclass(frozen=True)
class Opt:
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    steps: int | None = None
    group_lr: dict[str, float] = field(default_factory=lambda: {"head": 10.0})
    group_wd: dict[str, float] = field(default_factory=lambda: {"head": 0.0})

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"--lr={self.lr} must be > 0")


@dataclass(frozen=True)
class Root:
    name: str = "run"
    use: bool = True
    opt: Flat[Opt] = field(default_factory=Opt)
    inner: Inner = field(default_factory=Inner)
    other: Inner = field(default_factory=lambda: Inner(r=4))


def run(argv, layers=()):
    return parse(Root, argv, prog="prog", description="A test.", layers=lambda a: list(layers))


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def refused(capsys, argv, layers=()) -> str:
    with pytest.raises(SystemExit) as exit_:
        run(argv, layers)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("prog: error: ") and err.count("\n") == 1, err  # one line
    return err


# -- keys, values, layers ------------------------------------------------------------------------

def test_keys_nest_groups_by_name_and_keep_flat_groups_unprefixed():
    keys = leaves(Root)
    assert list(keys)[:6] == ["name", "use", "lr", "steps", "group_lr", "group_wd"]
    assert keys["lr"].path == ("opt", "lr") and keys["inner.r"].path == ("inner", "r")
    assert keys["other.r"].path == ("other", "r") and keys["inner.layers"].type == tuple[int, ...]


def test_apply_coerces_toml_values_and_returns_a_new_config():
    base = Root()
    cfg = apply(base, {"lr": 1, "steps": "none", "inner": {"layers": [0, 1], "r": 2},
                       "other.pattern": {"q": 3}, "group_lr": {"prompt": 30}})
    assert base == Root() and cfg is not base and cfg.other is not base.other
    assert cfg.opt == Opt(lr=1.0, steps=None, group_lr={"prompt": 30.0}) and isinstance(cfg.opt.lr, float)
    assert cfg.inner == Inner(r=2, layers=(0, 1)) and cfg.other.pattern == {"q": 3}
    assert apply(base, {}) == base


def test_to_dict_and_from_dict_invert_each_other():
    cfg = apply(Root(), {"inner.layers": [3], "steps": 5, "use": False})
    data = to_dict(cfg)
    assert data["lr"] == 3e-4 and data["inner"]["layers"] == [3] and "opt" not in data
    assert json.loads(json.dumps(data)) == data and from_dict(Root, data) == cfg


@pytest.mark.parametrize("data, needle", [
    ({"inner": {"rr": 1}}, "unknown key 'inner.rr' (did you mean inner.r"),
    ({"alpha": 1.0}, "did you mean inner.alpha, other.alpha"),
    ({"opt": {"lr": 1.0}}, "unknown key 'opt.lr' (did you mean lr"),
    ({"inner.r": "x"}, "key 'inner.r': expected int, got 'x'"),
    ({"steps": 1.5}, "key 'steps': expected int"),
    ({"inner": 3}, "unknown key 'inner'"),
])
def test_apply_names_the_bad_key_and_the_closest_ones(data, needle):
    with pytest.raises(ConfigError) as err:
        apply(Root(), data, "a.toml")
    assert str(err.value).startswith("a.toml: ") and needle in str(err.value), err.value


def test_layering_order_defaults_layers_config_files_then_flags(tmp_path):
    layer = ("layer", {"lr": 0.1, "steps": 1, "name": "layer", "inner": {"r": 1}})
    first = write(tmp_path, "first.toml", "lr = 0.2\nsteps = 2\n[inner]\nalpha = 2.0\n")
    second = write(tmp_path, "second.toml", "steps = 3\n")
    cfg = run(["--lr=0.5", f"--config={first}", "--config", str(second)], [layer])
    assert cfg.opt.lr == 0.5  # flag > --config files, wherever it stands
    assert cfg.opt.steps == 3  # later --config file > earlier
    assert cfg.inner.alpha == 2.0 and cfg.inner.r == 1  # --config file > layer > default
    assert cfg.name == "layer" and cfg.other.r == 4  # layer > default; default


# -- flags ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, check", [
    (["--inner.r=3", "--other.r", "5"], lambda c: (c.inner.r, c.other.r) == (3, 5)),
    (["--lr", "2e-3", "--steps=none"], lambda c: (c.opt.lr, c.opt.steps) == (2e-3, None)),
    (["--steps=7", "--steps=9"], lambda c: c.opt.steps == 9),
    (["--no-use"], lambda c: c.use is False),
    (["--use=false"], lambda c: c.use is False),
    (["--no-use", "--use=TRUE"], lambda c: c.use is True),
    (["--inner.flag"], lambda c: c.inner.flag is True),
    (["--inner.flag=yes", "--inner.no-flag"], lambda c: c.inner.flag is False),
    (["--inner.layers", "0", "2"], lambda c: c.inner.layers == (0, 2)),
    (["--inner.layers"], lambda c: c.inner.layers == ()),
    (["--group-lr", "head", "2", "prompt", "30"], lambda c: c.opt.group_lr == {"head": 2.0, "prompt": 30.0}),
    (["--group-lr=head=2,prompt=30"], lambda c: c.opt.group_lr == {"head": 2.0, "prompt": 30.0}),
    (['--group-lr={"gates": 100}'], lambda c: c.opt.group_lr == {"gates": 100.0}),
    (["--inner.pattern", "q", "4"], lambda c: c.inner.pattern == {"q": 4}),
    (["--group_wd", "x", "1"], lambda c: c.opt.group_wd == {"x": 1.0}),  # '_' as '-'
])
def test_flags(argv, check):
    assert check(run(argv))


@pytest.mark.parametrize("argv, needles", [
    (["--inner.rr=3"], ["--inner.rr=3", "Perhaps you meant: --inner.r INT"]),
    (["--lr=fast"], ["--lr", "'fast'"]),
    (["--inner.r=1.5"], ["--inner.r", "'1.5'"]),
    (["--lr=-1"], ["--lr=-1.0 must be > 0"]),
    (["--use=maybe"], ["--use=maybe: give true or false (or --use, --no-use)"]),
    (["--group-lr", "head"], ["--group-lr", "KEY VALUE pairs"]),
    (["stray"], ["Unrecognized options: stray"]),
])
def test_bad_flags_are_one_line_and_exit_2(capsys, argv, needles):
    err = refused(capsys, argv)
    for needle in needles:
        assert needle in err, err


def test_bad_layers_and_config_files_are_one_line_and_exit_2(capsys, tmp_path):
    bad = write(tmp_path, "bad.toml", "[innr]\nr = 1\n")
    assert f"config file {bad}: unknown key 'innr.r' (did you mean inner.r, other.r" in refused(
        capsys, [f"--config={bad}"])
    assert "config file not found" in refused(capsys, [f"--config={tmp_path / 'none.toml'}"])
    broken = write(tmp_path, "broken.toml", "lr = [\n")
    assert f"cannot read config file {broken}" in refused(capsys, ["--config", str(broken)])
    assert "layer: key 'lr': expected float, got 'x'" in refused(capsys, [], [("layer", {"lr": "x"})])


def test_help_lists_every_flag_with_its_default_and_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        run(["--lr=5", "--help"], [("layer", {"inner": {"r": 2}})])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "usage: prog" in out and "A test." in out and "--config FILE" in out
    for key in leaves(Root):
        head, _, name = key.rpartition(".")
        assert f"--{head}{'.' if head else ''}{name.replace('_', '-')}" in out, key
    assert "--inner.r INT the rank (default: 2)" in out  # the layer's value is the default shown
    assert "peak learning rate (default: 0.0003)" in out and "--no-use" in out


# -- the experiments' run configs ----------------------------------------------------------------

def test_every_registered_method_has_its_group():
    from experiments.common import RunConfig
    from jpeft.methods import REGISTRY

    for name, spec in REGISTRY.items():
        assert isinstance(RunConfig().method_config(name), spec.config_cls), name


def test_every_field_of_the_reused_dataclasses_is_a_flag():
    from experiments.glue import GlueConfig
    from jpeft.methods import LoraConfig
    from jpeft.train.optim import OptimConfig

    keys = leaves(GlueConfig)
    assert all(f.name in keys for f in dataclasses.fields(OptimConfig))
    assert all(f"lora.{f.name}" in keys for f in dataclasses.fields(LoraConfig))
    assert {"batch_size", "max_steps", "output_dir", "base_dtype", "task", "process_id"} <= set(keys)


def test_a_composition_takes_each_part_from_its_own_group():
    from experiments.common import build_method
    from experiments.glue import parse_args

    cfg = parse_args(["--method=lora+bitfit", "--lora.r=4", "--bitfit.pattern=attention", "--ia3.targets=x"])
    assert (cfg.lora.r, cfg.bitfit.pattern) == (4, "attention")
    transform = build_method(cfg)
    assert transform.config["lora"] == cfg.lora and transform.config["bitfit"] == cfg.bitfit
    assert "ia3" not in transform.config  # a group of a method not in --method is ignored


def test_e2e_help_lists_its_flags(capsys):
    from experiments import e2e

    with pytest.raises(SystemExit) as exit_:
        e2e.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_.value.code == 0
    for flag in ("--max-test-mrs", "--num-beams", "--full-recipe", "--lora.r", "--lr", "--max-steps"):
        assert flag in out, flag
    assert "SmolLM2-135M-Instruct" in out and "(default: 300)" in out


# The command lines below, parsed by the hand-written parser this module replaced
# (tests/old_cli_configs.json: ``to_dict(parse_args(argv))`` of that version), resolve to the same
# config with these spellings changed (README.md lists them): a sequence takes several values.
CHANGED = {"--buckets=32,64,128": ["--buckets", "32", "64", "128"], "--lora.layers=0,1": ["--lora.layers", "0", "1"],
           "--buckets=64,128": ["--buckets", "64", "128"]}
OLD = json.loads((ROOT / "tests" / "old_cli_configs.json").read_text())


def _same(old: dict, new: dict, default: dict, where: str = "") -> None:
    """``new`` holds ``old`` exactly (values and types); keys ``old`` lacks (fields added since)
    hold their defaults."""
    for key, value in new.items():
        if key not in old:
            assert value == default[key], f"{where}{key}: new field not at its default"
        elif isinstance(value, dict) and key in default and isinstance(default[key], dict) \
                and not key.startswith("group"):
            _same(old[key], value, default[key], f"{where}{key}.")
        else:
            assert json.dumps(value) == json.dumps(old[key]), f"{where}{key}: {value!r} != {old[key]!r}"
    assert not set(old) - set(new), set(old) - set(new)


@pytest.mark.parametrize("experiment, case", [(e, c) for e in OLD for c in OLD[e]],
                         ids=lambda x: " ".join(x["argv"]) if isinstance(x, dict) else x)
def test_old_command_lines_resolve_to_the_same_config(monkeypatch, experiment, case):
    from experiments import e2e, glue

    monkeypatch.chdir(ROOT)  # the --config paths are relative to the repository
    module = glue if experiment == "glue" else e2e
    argv = [new for old in case["argv"] for new in CHANGED.get(old, [old])]
    cfg = module.parse_args(argv)
    default = to_dict(type(cfg)())
    _same(case["config"], to_dict(cfg), default)
