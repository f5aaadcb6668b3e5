"""Tests for jpeft.config: dataclasses <-> command line and TOML."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jpeft.config import (
    ConfigError,
    FieldInfo,
    apply_overrides,
    flatten_fields,
    format_value,
    from_dict,
    load_toml_overrides,
    parse_config,
    to_argv,
    to_dict,
)


@dataclass(frozen=True)
class LoRAConfig:
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("query", "value")
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "per-target rank"})
    use_bias: bool = False


@dataclass(frozen=True)
class ModelConfig:
    name: str = "minilm"
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(r=4))
    dropout: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    max_steps: int = 1000
    seed: int | None = 0
    data_dir: str = "data"
    out_dir: Path | None = None
    buckets: tuple[int, ...] = (32, 64)
    shape: tuple[int, int] = (2, 3)
    eval: bool = True
    cache: bool | None = None
    method: Literal["lora", "ia3"] = "lora"
    lora: LoRAConfig = field(default_factory=LoRAConfig, metadata={"help": "LoRA adapter"})
    model: ModelConfig = field(default_factory=ModelConfig)


@dataclass
class Required:
    name: str
    steps: int = 3


@dataclass
class Scalars:
    i: int = 0
    f: float = 0.0
    s: str = ""
    words: tuple[str, ...] = ()
    floats: tuple[float, ...] = ()


def parse(argv: list[str], **kw) -> TrainConfig:
    return parse_config(TrainConfig, argv, prog="train", **kw)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- command line ------------------------------------------------------------------------------


def test_defaults_without_flags() -> None:
    assert parse([]) == TrainConfig()


def test_nested_override() -> None:
    cfg = parse(["--lora.r=16", "--model.lora.r", "2", "--model.lora.alpha=1.5"])
    assert cfg.lora.r == 16
    assert cfg.model.lora == LoRAConfig(r=2, alpha=1.5)
    assert cfg.model.name == "minilm"
    assert TrainConfig().lora.r == 8 and TrainConfig().model.lora.r == 4  # defaults untouched


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-steps=7", "--data-dir=x"],
        ["--max_steps=7", "--data_dir=x"],
        ["--max-steps", "7", "--data_dir", "x"],
    ],
)
def test_dash_and_underscore_spellings(argv: list[str]) -> None:
    cfg = parse(argv)
    assert (cfg.max_steps, cfg.data_dir) == (7, "x")


def test_equals_and_space_forms_and_negative_values() -> None:
    assert parse(["--lr", "-1e-3"]).lr == -1e-3
    assert parse(["--lr=-1e-3"]).lr == -1e-3
    assert parse(["--data_dir=a=b"]).data_dir == "a=b"


def test_last_flag_wins() -> None:
    assert parse(["--lora.r=1", "--lora.r=2"]).lora.r == 2


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--eval"], True),
        (["--no-eval"], False),
        (["--no_eval"], False),
        (["--eval=false"], False),
        (["--eval=0"], False),
        (["--eval=no"], False),
        (["--eval=yes"], True),
        (["--eval=1"], True),
        (["--eval=TRUE"], True),
        (["--eval", "false"], False),
        (["--no-eval", "--eval"], True),
    ],
)
def test_bool_forms(argv: list[str], expected: bool) -> None:
    assert parse(argv).eval is expected


def test_nested_bool_negation() -> None:
    assert parse(["--lora.use-bias"]).lora.use_bias is True
    assert parse(["--lora.use_bias", "--no-lora.use-bias"]).lora.use_bias is False
    assert parse(["--lora.use_bias", "--lora.no-use_bias"]).lora.use_bias is False


def test_bool_flag_does_not_swallow_next_flag() -> None:
    cfg = parse(["--eval", "--max-steps=2"])
    assert cfg.eval is True and cfg.max_steps == 2


def test_optional_none() -> None:
    assert parse(["--seed=none"]).seed is None
    assert parse(["--seed=None"]).seed is None
    assert parse(["--seed=5"]).seed == 5
    assert parse(["--out-dir=runs/a"]).out_dir == Path("runs/a")
    assert parse(["--cache"]).cache is True
    assert parse(["--cache=none"]).cache is None
    assert parse(["--cache", "none"]).cache is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("32,64,128", (32, 64, 128)),
        (" 1, 2 ", (1, 2)),
        ("[8, 16]", (8, 16)),
        ("7", (7,)),
        ("", ()),
        ("[]", ()),
    ],
)
def test_tuple_parsing(value: str, expected: tuple[int, ...]) -> None:
    assert parse([f"--buckets={value}"]).buckets == expected


def test_tuple_of_strings_and_fixed_length() -> None:
    modules = parse(["--lora.target_modules=query,key,value"]).lora.target_modules
    assert modules == ("query", "key", "value")
    assert parse(['--lora.target_modules=["a,b", "c"]']).lora.target_modules == ("a,b", "c")
    assert parse(["--lora.target_modules=[CLS],[SEP]"]).lora.target_modules == ("[CLS]", "[SEP]")
    assert parse(["--shape=4,5"]).shape == (4, 5)


def test_dict_json_parsing() -> None:
    cfg = parse(['--lora.rank_pattern={"query": 4, "value": 2}'])
    assert cfg.lora.rank_pattern == {"query": 4, "value": 2}
    cfg = parse(["--lora.rank-pattern=query=4,value=2"])
    assert cfg.lora.rank_pattern == {"query": 4, "value": 2}
    assert parse(["--lora.rank_pattern={}"]).lora.rank_pattern == {}


def test_literal_choice() -> None:
    assert parse(["--method=ia3"]).method == "ia3"


# -- config files ------------------------------------------------------------------------------


def test_load_toml_overrides_flattens_tables(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "a.toml",
        'lr = 0.1\n[lora]\nr = 8\n[lora.rank_pattern]\nquery = 2\n[model.lora]\nalpha = 2.0\n',
    )
    assert load_toml_overrides(path) == {
        "lr": 0.1,
        "lora.r": 8,
        "lora.rank_pattern.query": 2,
        "model.lora.alpha": 2.0,
    }
    # given the class, a table at a dict-typed field stays whole
    assert load_toml_overrides(path, TrainConfig)["lora.rank_pattern"] == {"query": 2}


def test_precedence_defaults_toml_cli(tmp_path: Path) -> None:
    base = write(tmp_path, "base.toml", "max_steps = 10\nlr = 0.5\n[lora]\nr = 2\nalpha = 3.0\n")
    over = write(tmp_path, "over.toml", "lr = 0.25\n[lora]\nr = 5\n")
    cfg = parse(["--lora.r=9"], config_files=[base, str(over)])
    assert cfg.max_steps == 10  # only in base
    assert cfg.lr == 0.25  # over beats base
    assert cfg.lora.alpha == 3.0
    assert cfg.lora.r == 9  # command line beats both
    assert cfg.seed == 0  # default


def test_config_flag_ordering(tmp_path: Path) -> None:
    builtin = write(tmp_path, "builtin.toml", "max_steps = 1\nlr = 1.0\ndata_dir = 'b'\n")
    user1 = write(tmp_path, "u1.toml", "max_steps = 2\nlr = 2.0\n")
    user2 = write(tmp_path, "u2.toml", "max_steps = 3\n")
    # --config files apply after config_files and before other flags, wherever they appear
    cfg = parse(["--lr=9.0", f"--config={user1}", "--config", str(user2)], config_files=[builtin])
    assert cfg.max_steps == 3
    assert cfg.lr == 9.0
    assert cfg.data_dir == "b"


def test_toml_dict_field_and_dashed_keys(tmp_path: Path) -> None:
    text = 'max-steps = 4\n[lora]\nrank_pattern = { query = 4 }\ntarget_modules = ["k"]\n'
    path = write(tmp_path, "c.toml", text)
    cfg = parse([], config_files=[path])
    assert cfg.max_steps == 4
    assert cfg.lora.rank_pattern == {"query": 4}
    assert cfg.lora.target_modules == ("k",)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[lorra]\nr = 8\n", "lorra.r"),
        ("[lorra]\n", "lorra"),
        ("lora = 3\n", "sub-config"),
        ("[lora]\nr = 'x'\n", "expected INT"),
        ("max_steps = 1.5\n", "expected INT"),
    ],
)
def test_bad_toml_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, needle: str
) -> None:
    path = write(tmp_path, "bad.toml", text)
    with pytest.raises(SystemExit) as exc:
        parse([], config_files=[path])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "bad.toml" in err


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse([f"--config={tmp_path / 'nope.toml'}"])
    assert exc.value.code == 2
    assert "not found" in capsys.readouterr().err


# -- errors and help ---------------------------------------------------------------------------


def test_unknown_flag_suggests(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(["--lora.rr=3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: train" in err
    assert "--lora.rr" in err and "did you mean --lora.r" in err


def test_unknown_flag_suggests_by_leaf_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(["--alpha=3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--lora.alpha" in err and "--model.lora.alpha" in err


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--lora.r=abc"], ["--lora.r", "INT", "'abc'"]),
        (["--max-steps", "1.5"], ["--max-steps", "INT", "'1.5'"]),
        (["--lr=fast"], ["--lr", "FLOAT", "'fast'"]),
        (["--eval=maybe"], ["--eval", "BOOL", "'maybe'"]),
        (["--buckets=1,x"], ["--buckets", "INT,...", "'1,x'"]),
        (["--shape=1,2,3"], ["--shape", "INT,INT"]),
        (["--lora.rank_pattern={bad"], ["--lora.rank_pattern", "{STR:INT}", "JSON"]),
        (["--method=adam"], ["--method", "{lora,ia3}", "'adam'"]),
        (["--lora.r"], ["--lora.r", "expected one argument"]),
        (["stray"], ["unrecognized arguments: stray"]),
        (["--no-eval=1"], ["--no-eval"]),
    ],
)
def test_bad_values_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], needles: list[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err


def test_required_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_config(Required, ["--name=x"]) == Required("x", 3)
    with pytest.raises(SystemExit) as exc:
        parse_config(Required, [], prog="req")
    assert exc.value.code == 2
    assert "--name" in capsys.readouterr().err


def test_help_lists_flags_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(["--lora.r=3", "--help"], description="Fine-tune with LoRA.")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: train" in out and "Fine-tune with LoRA." in out
    lines = out.splitlines()
    (r_line,) = [line for line in lines if line.strip().startswith("--lora.r INT")]
    assert "LoRA rank" in r_line and "(default: 8)" in r_line
    assert "--model.lora.r" in out and "(default: 4)" in out
    assert any("peak learning rate" in line and "(default: 0.0003)" in line for line in lines)
    assert "--config PATH" in out and "--no-eval" in out
    # grouped by sub-config, in declaration order
    assert "lora: LoRA adapter" in lines and "model:" in lines and "model.lora:" in lines
    assert lines.index("lora: LoRA adapter") < lines.index("model:") < lines.index("model.lora:")


def test_short_help_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(["-h"])
    assert exc.value.code == 0
    assert "--max_steps INT" in capsys.readouterr().out


# -- programmatic API --------------------------------------------------------------------------


def test_flatten_fields() -> None:
    fields = flatten_fields(TrainConfig)
    names = [f.name for f in fields]
    assert names[:3] == ["lr", "max_steps", "seed"]
    assert "lora.r" in names and "model.lora.rank_pattern" in names
    by_name = {f.name: f for f in fields}
    assert by_name["lora.r"] == FieldInfo("lora.r", int, 8, "LoRA rank")
    assert by_name["model.lora.r"].default == 4
    assert by_name["buckets"].type == tuple[int, ...]
    assert flatten_fields(Required)[0].default is dataclasses.MISSING


def test_apply_overrides_returns_new_instance() -> None:
    base = TrainConfig()
    new = apply_overrides(base, {"lora.r": "16", "max-steps": 5, "model": {"lora": {"alpha": 1}}})
    assert new is not base and base == TrainConfig()
    assert new.lora.r == 16 and new.max_steps == 5
    assert new.model.lora.alpha == 1.0 and isinstance(new.model.lora.alpha, float)
    assert new.model.lora.r == 4  # the sub-config's own default is kept
    assert apply_overrides(base, {}) == base


def test_apply_overrides_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ValueError) as exc:
        apply_overrides(TrainConfig(), {"lora.rr": 3})
    msg = str(exc.value)
    assert "lora.rr" in msg and "did you mean lora.r" in msg
    valid = msg.split("Valid keys: ")[1]
    assert valid.startswith("lora.r") and "model.lora.use_bias" in valid


def test_apply_overrides_bad_value() -> None:
    with pytest.raises(ConfigError, match="expected INT"):
        apply_overrides(TrainConfig(), {"max_steps": True})


def test_to_dict_round_trip() -> None:
    cfg = parse(
        [
            "--lora.r=2",
            "--out-dir=/tmp/x",
            "--buckets=1,2",
            '--model.lora.rank_pattern={"q": 3}',
            "--seed=none",
            "--cache=false",
        ]
    )
    data = to_dict(cfg)
    assert json.loads(json.dumps(data)) == data
    assert data["out_dir"] == "/tmp/x" and data["buckets"] == [1, 2]
    assert data["model"]["lora"]["rank_pattern"] == {"q": 3}
    assert apply_overrides(TrainConfig(), data) == cfg
    assert from_dict(TrainConfig, data) == cfg


def test_to_argv_round_trip() -> None:
    cfg = apply_overrides(
        TrainConfig(),
        {
            "lora.target_modules": ("a,b", " c"),
            "seed": None,
            "model.name": "",
            "lora.rank_pattern": {"x": 1},
        },
    )
    assert parse(to_argv(cfg)) == cfg


@settings(max_examples=200, deadline=None)
@given(
    i=st.integers(),
    f=st.floats(allow_nan=True, allow_infinity=True),
    s=st.text(),
    words=st.lists(st.text(), max_size=4).map(tuple),
    floats=st.lists(st.floats(allow_nan=False), max_size=4).map(tuple),
)
def test_format_parse_round_trip(
    i: int, f: float, s: str, words: tuple[str, ...], floats: tuple[float, ...]
) -> None:
    argv = [
        f"--i={format_value(i)}",
        f"--f={format_value(f)}",
        f"--s={format_value(s)}",
        f"--words={format_value(words)}",
        f"--floats={format_value(floats)}",
    ]
    cfg = parse_config(Scalars, argv)
    assert cfg.i == i
    assert cfg.f == f or (math.isnan(f) and math.isnan(cfg.f))
    assert cfg.s == s
    assert cfg.words == words
    assert cfg.floats == floats
