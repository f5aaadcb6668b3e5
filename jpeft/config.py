"""Nested plain dataclasses as a command line, with TOML config files.

A *config* is a dataclass whose fields are

* scalars: ``int``, ``float``, ``str``, ``bool``, ``pathlib.Path``, ``Literal[...]`` of those;
* ``X | None`` of a scalar (the strings ``none``/``None``/``null`` mean ``None``);
* sequences of scalars: ``tuple[int, ...]``, ``tuple[str, str]``, ``list[float]``;
* string-keyed dicts of scalars: ``dict[str, int]``, ``dict[str, float]`` (e.g. a per-target rank);
* nested config dataclasses (sub-configs), addressed with a dotted prefix: ``lora.r``.

Field help comes from ``field(metadata={"help": "..."})``. Annotations are resolved with
:func:`typing.get_type_hints`, so ``from __future__ import annotations`` works (classes must then
live at module level).

Command line (:func:`parse_config`)::

    --lr=3e-4  --lr 3e-4  --lr -1e-3           (a value may start with one dash, never two)
    --max-steps=10  --max_steps=10             ('-' and '_' are interchangeable in names)
    --lora.r=16                                (nested)
    --flag  --flag=false  --flag no  --no-flag  --no-lora.flag  --lora.no-flag
    --seed=none                                (Optional fields)
    --buckets=32,64,128  --buckets='[32, 64]'  --buckets=     (tuple; empty string = empty)
    --lora.rank_pattern='{"query": 4}'  --lora.rank_pattern=query=4,value=8
    --config=extra.toml                        (repeatable)

Precedence, lowest first: dataclass defaults < ``config_files`` (in order) < ``--config`` files (in
order) < the other command-line flags (the last occurrence of a flag wins). TOML files use tables
for sub-configs (``[lora]`` then ``r = 8``); unknown keys and tables are errors.

Nothing is mutated: every function returns new instances (:func:`dataclasses.replace` along the
changed paths, so frozen dataclasses work; unchanged sub-config objects are shared).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import shutil
import sys
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar, Union, get_args, get_origin

try:  # Python >= 3.11
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 fallback
    try:
        import tomli as _toml  # type: ignore[no-redef]
    except ModuleNotFoundError:
        _toml = None  # type: ignore[assignment]

__all__ = [
    "ConfigError",
    "FieldInfo",
    "apply_overrides",
    "flatten_fields",
    "format_value",
    "from_dict",
    "load_toml_overrides",
    "parse_config",
    "to_argv",
    "to_dict",
]

T = TypeVar("T")

MISSING = dataclasses.MISSING
_NONE_STRINGS = frozenset({"none", "None", "null"})
_TRUE_STRINGS = frozenset({"true", "1", "yes", "y", "on", "t"})
_FALSE_STRINGS = frozenset({"false", "0", "no", "n", "off", "f"})
_SCALARS: tuple[type, ...] = (bool, int, float, str, Path)
_SCALAR_NAMES = {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR", Path: "PATH"}
_CONFIG_FLAG = "config"


class ConfigError(ValueError):
    """Unknown key, bad value or missing required field in a config override."""


class FieldInfo(NamedTuple):
    """One leaf field of a (nested) config: dotted ``name``, resolved ``type``, ``default``
    (``dataclasses.MISSING`` when required) and ``help`` text."""

    name: str
    type: Any
    default: Any
    help: str


class _BadValue(Exception):
    """A value that cannot be converted to a field type (internal)."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail


# --------------------------------------------------------------------------------------------
# Types: support check, display names, coercion, formatting
# --------------------------------------------------------------------------------------------


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _optional_inner(tp: Any) -> Any | None:
    """``X`` for ``X | None`` (or ``Optional[X]``), else ``None``."""
    if not _is_union(tp):
        return None
    args = get_args(tp)
    rest = [a for a in args if a is not type(None)]
    if len(rest) == 1 and len(args) == 2:
        return rest[0]
    return None


def _is_config_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_scalar_type(tp: Any) -> bool:
    if tp in _SCALARS:
        return True
    if get_origin(tp) is Literal:
        return all(type(a) in (bool, int, float, str) for a in get_args(tp))
    return False


def _is_bool_type(tp: Any) -> bool:
    return tp is bool or _optional_inner(tp) is bool


def _unsupported(tp: Any, name: str) -> TypeError:
    return TypeError(
        f"config field {name!r} has unsupported type {tp!r}; supported: int, float, str, bool, "
        "Path, Literal[...], X | None, tuple[X, ...], tuple[X, Y], list[X], dict[str, X] "
        "(X a scalar) and nested dataclasses"
    )


def _check_supported(tp: Any, name: str) -> None:
    """Raise ``TypeError`` unless ``tp`` is a supported leaf annotation."""
    inner = _optional_inner(tp)
    if inner is not None:
        tp = inner
    if _is_scalar_type(tp):
        return
    origin, args = get_origin(tp), get_args(tp)
    if origin is tuple and args:
        elems = args[:1] if len(args) == 2 and args[1] is Ellipsis else args
        if all(_is_scalar_type(a) for a in elems) and Ellipsis not in elems:
            return
    elif origin is list and len(args) == 1 and _is_scalar_type(args[0]):
        return
    elif origin is dict and len(args) == 2 and args[0] is str and _is_scalar_type(args[1]):
        return
    raise _unsupported(tp, name)


def _type_name(tp: Any) -> str:
    """Short display name of a supported annotation, e.g. ``INT``, ``STR,...``, ``{STR:INT}``."""
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner)}|none"
    if tp in _SCALAR_NAMES:
        return _SCALAR_NAMES[tp]
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "{" + ",".join(format_value(a) for a in args) + "}"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"{_type_name(args[0])},..."
        return ",".join(_type_name(a) for a in args)
    if origin is list:
        return f"{_type_name(args[0])},..."
    if origin is dict:
        return f"{{{_type_name(args[0])}:{_type_name(args[1])}}}"
    return getattr(tp, "__name__", repr(tp))


def _split_sequence(text: str) -> list[Any]:
    """``"a,b"`` -> ``["a", "b"]`` (items stripped); ``"[1, 2]"`` -> JSON list; ``""`` -> ``[]``.

    Text starting with ``[`` that is not a JSON list is split on commas like any other.
    """
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError:
            items = None  # not JSON after all (e.g. "[CLS],[SEP]"): split on commas
        if isinstance(items, list):
            return items
    if not stripped:
        return []
    return [part.strip() for part in text.split(",")]


def _split_mapping(text: str) -> dict[Any, Any]:
    """``'{"q": 4}'`` (JSON object) or ``"q=4,v=8"`` -> dict; ``""`` -> ``{}``."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise _BadValue(f"invalid JSON object: {exc}") from None
        if not isinstance(data, dict):
            raise _BadValue("expected a JSON object")
        return data
    if not stripped:
        return {}
    out: dict[str, str] = {}
    for part in text.split(","):
        key, eq, val = part.partition("=")
        if not eq or not key.strip():
            raise _BadValue("expected a JSON object or key=value pairs")
        out[key.strip()] = val.strip()
    return out


def _coerce(tp: Any, value: Any) -> Any:
    """Convert ``value`` (a string to parse, or an already-typed value) to annotation ``tp``.

    Raises ``_BadValue`` when it does not fit.
    """
    inner = _optional_inner(tp)
    if inner is not None:
        if value is None or (isinstance(value, str) and value.strip() in _NONE_STRINGS):
            return None
        return _coerce(inner, value)
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        for choice in args:
            if type(value) is type(choice) and value == choice:
                return choice
        if isinstance(value, str):
            for choice in args:
                if format_value(choice) == value.strip():
                    return choice
        raise _BadValue()
    if origin in (tuple, list):
        if isinstance(value, str):
            items = _split_sequence(value)
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise _BadValue()
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise _BadValue(f"expected {len(args)} items, got {len(items)}")
            elems = [_coerce(a, x) for a, x in zip(args, items)]
        else:
            elems = [_coerce(args[0], x) for x in items]
        return tuple(elems) if origin is tuple else elems
    if origin is dict:
        if isinstance(value, str):
            data = _split_mapping(value)
        elif isinstance(value, Mapping):
            data = dict(value)
        else:
            raise _BadValue()
        return {_coerce(args[0], k): _coerce(args[1], v) for k, v in data.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            low = value.strip().lower()
            if low in _TRUE_STRINGS:
                return True
            if low in _FALSE_STRINGS:
                return False
        raise _BadValue()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise _BadValue()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise _BadValue("out of range") from None
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _BadValue()
    if tp is str:
        if isinstance(value, str):
            return value
        raise _BadValue()
    if tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise _BadValue()
    raise _BadValue(f"unsupported type {tp!r}")  # pragma: no cover - rejected at schema time


def _describe_bad(tp: Any, value: Any, exc: _BadValue) -> str:
    msg = f"expected {_type_name(tp)}, got {value!r}"
    return f"{msg} ({exc.detail})" if exc.detail else msg


def _jsonable(value: Any) -> Any:
    """Tuples -> lists, Paths -> str, recursively (dataclasses -> dicts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def format_value(value: Any, tp: Any = None) -> str:
    """Format ``value`` the way the command line parses it back (inverse of the coercion).

    ``None`` -> ``none``; bools -> ``true``/``false``; floats via ``repr`` (exact round trip);
    sequences as ``a,b,c`` when that is unambiguous, else as a JSON list; dicts as JSON.
    Limitation: a ``str | None`` field holding the literal string ``"none"`` reads back as ``None``.
    """
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (str, Path)):
        return str(value)
    if isinstance(value, Mapping):
        return json.dumps(_jsonable(value))
    if isinstance(value, (list, tuple)):
        parts = [format_value(v) for v in value]
        joined = ",".join(parts)
        plain = all(
            isinstance(v, (bool, int, float, str, Path))
            and part
            and "," not in part
            and part == part.strip()
            for v, part in zip(value, parts)
        )
        if value and (not plain or joined.lstrip().startswith("[") or joined in _NONE_STRINGS):
            return json.dumps(_jsonable(value))
        return joined
    return str(value)


# --------------------------------------------------------------------------------------------
# Schema: the flattened view of a config class
# --------------------------------------------------------------------------------------------


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as exc:  # NameError for unresolvable forward references
        hints: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if isinstance(f.type, str):
                raise TypeError(
                    f"cannot resolve the annotations of {cls.__qualname__} ({exc}); define config "
                    "classes (and the types they use) at module level"
                ) from exc
            hints[f.name] = f.type
        return hints


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


@dataclasses.dataclass
class _Group:
    prefix: str  # "" for the top level, else "lora." etc.
    help: str
    leaves: list[FieldInfo]


@dataclasses.dataclass
class _Schema:
    cls: type
    groups: list[_Group]
    leaves: dict[str, FieldInfo]
    sections: dict[str, type]  # dotted prefix (no trailing dot) -> sub-config class

    @classmethod
    def build(cls, root: Any) -> _Schema:
        """Walk a config class (or instance: its values become the defaults)."""
        root_cls = root if isinstance(root, type) else type(root)
        if not _is_config_type(root_cls):
            raise TypeError(f"expected a dataclass type or instance, got {root!r}")
        schema = cls(root_cls, [], {}, {})
        schema._walk(root_cls, None if isinstance(root, type) else root, "", "", ())
        return schema

    def _walk(self, cls: type, obj: Any, prefix: str, help: str, stack: tuple[type, ...]) -> None:
        if cls in stack:
            raise TypeError(f"recursive config type {cls.__qualname__} at {prefix[:-1]!r}")
        group = _Group(prefix, help, [])
        self.groups.append(group)
        hints = _type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            tp = hints.get(f.name, f.type)
            name = prefix + f.name
            doc = str(f.metadata.get("help", ""))
            if obj is not None:
                default = getattr(obj, f.name)
            else:
                default = _field_default(f)
            if _is_config_type(tp):
                self.sections[name] = tp
                sub = default if dataclasses.is_dataclass(default) else None
                self._walk(tp, sub, name + ".", doc, (*stack, cls))
                continue
            _check_supported(tp, name)
            info = FieldInfo(name, tp, default, doc)
            group.leaves.append(info)
            self.leaves[name] = info

    def unknown_message(self, unknown: Sequence[str], *, flag: bool = False) -> str:
        """Message for unknown keys (or flags), close matches first."""
        dash = "--" if flag else ""
        valid = list(self.leaves)
        close: list[str] = []
        parts = []
        for key in unknown:
            norm = key.replace("-", "_")
            near = difflib.get_close_matches(norm, valid, n=3, cutoff=0.6)
            leaf = norm.rsplit(".", 1)[-1]
            near += [v for v in valid if v.rsplit(".", 1)[-1] == leaf and v not in near]
            close += [n for n in near if n not in close]
            hint = f" (did you mean {', '.join(dash + n for n in near)}?)" if near else ""
            parts.append(f"{dash}{key}{hint}")
        what = "argument" if flag else "config key"
        plural = "s" if len(unknown) > 1 else ""
        msg = f"unrecognized {what}{plural}: {'; '.join(parts)}"
        if not flag:
            ordered = close + [v for v in valid if v not in close]
            msg += f". Valid keys: {', '.join(ordered)}"
        return msg


def flatten_fields(cls: Any) -> list[FieldInfo]:
    """Every leaf field of a (nested) config class, depth first, with dotted names.

    Accepts a class (dataclass defaults; ``dataclasses.MISSING`` marks required fields) or an
    instance (its current values are reported as defaults).
    """
    return list(_Schema.build(cls).leaves.values())


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def _leaf_values(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Current leaf values of a config instance, as dotted keys."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(_leaf_values(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def _flatten_input(
    schema: _Schema, overrides: Mapping[str, Any], prefix: str = ""
) -> dict[str, Any]:
    """Dotted / nested override mapping -> flat ``{dotted key: raw value}`` (keys normalised)."""
    out: dict[str, Any] = {}
    for raw_key, value in overrides.items():
        if not isinstance(raw_key, str):
            raise ConfigError(f"config keys must be strings, got {raw_key!r}")
        key = prefix + raw_key.strip().replace("-", "_")
        if key in schema.sections:
            if isinstance(value, schema.sections[key]):
                out.update(_leaf_values(value, key + "."))
            elif isinstance(value, Mapping):
                out.update(_flatten_input(schema, value, key + "."))
            else:
                raise ConfigError(
                    f"{key!r} is a sub-config; set its fields (e.g. {key}.<field>) or give a "
                    f"table/mapping, got {value!r}"
                )
        else:
            out[key] = value
    return out


def _coerce_overrides(
    schema: _Schema, overrides: Mapping[str, Any], source: str = ""
) -> dict[str, Any]:
    """Validate keys and convert values; raises :class:`ConfigError`."""
    where = f"{source}: " if source else ""
    try:
        flat = _flatten_input(schema, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    unknown = [k for k in flat if k not in schema.leaves]
    if unknown:
        raise ConfigError(where + schema.unknown_message(unknown))
    out = {}
    for key, value in flat.items():
        tp = schema.leaves[key].type
        try:
            out[key] = _coerce(tp, value)
        except _BadValue as exc:
            raise ConfigError(f"{where}key {key!r}: {_describe_bad(tp, value, exc)}") from None
    return out


def _build(cls: type, obj: Any, flat: Mapping[str, Any], prefix: str = "") -> Any:
    """New instance of ``cls`` from ``obj`` (or the class defaults when ``obj`` is None) with
    coerced dotted ``flat`` values applied (keys relative to ``prefix``)."""
    hints = _type_hints(cls)
    kwargs: dict[str, Any] = {}
    missing: list[str] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints.get(f.name, f.type)
        if _is_config_type(tp):
            head = f.name + "."
            sub = {k[len(head):]: v for k, v in flat.items() if k.startswith(head)}
            current = getattr(obj, f.name) if obj is not None else _field_default(f)
            if current is MISSING:
                try:
                    kwargs[f.name] = _build(tp, None, sub, prefix + head)
                except _MissingFields as exc:
                    missing += exc.names
            elif sub:
                kwargs[f.name] = _build(type(current), current, sub, prefix + head)
        elif f.name in flat:
            kwargs[f.name] = flat[f.name]
        elif obj is None and f.default is MISSING and f.default_factory is MISSING:
            missing.append(prefix + f.name)
    if missing:
        raise _MissingFields(missing)
    if obj is not None:
        return dataclasses.replace(obj, **kwargs)
    return cls(**kwargs)


class _MissingFields(ConfigError):
    def __init__(self, names: list[str]) -> None:
        super().__init__(f"missing required config field(s): {', '.join(names)}")
        self.names = names


def apply_overrides(obj: T, overrides: Mapping[str, Any]) -> T:
    """Return a copy of config ``obj`` with ``overrides`` applied.

    Keys are dotted (``"lora.r"``; ``-`` or ``_``) or nested mappings for sub-configs
    (``{"lora": {"r": 8}}``, so ``to_dict`` output round-trips). Values may be typed or strings to
    parse as on the command line. Unknown keys or bad values raise :class:`ConfigError`
    (a ``ValueError``) listing the valid keys, close matches first.
    """
    schema = _Schema.build(type(obj))
    flat = _coerce_overrides(schema, overrides)
    return _build(type(obj), obj, flat)


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build ``cls`` from class defaults plus ``data`` (nested dict as from :func:`to_dict`, or
    dotted keys). Required fields missing from ``data`` raise :class:`ConfigError`."""
    schema = _Schema.build(cls)
    return _build(cls, None, _coerce_overrides(schema, data))


def to_dict(obj: Any) -> dict[str, Any]:
    """JSON-serialisable nested dict of a config (tuples -> lists, Paths -> str).

    Only ``init=True`` fields are included, so ``apply_overrides(default, to_dict(cfg))`` and
    ``from_dict(type(cfg), to_dict(cfg))`` reproduce ``cfg``.
    """
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        raise TypeError(f"to_dict expects a dataclass instance, got {obj!r}")
    return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}


def to_argv(obj: Any) -> list[str]:
    """Command-line flags (``--key=value``, one per leaf) that :func:`parse_config` turns back into
    ``obj``. Useful to launch a subprocess with the same config."""
    schema = _Schema.build(obj)
    return [f"--{k}={format_value(info.default, info.type)}" for k, info in schema.leaves.items()]


def load_toml_overrides(path: str | os.PathLike[str], cls: type | None = None) -> dict[str, Any]:
    """Read a TOML file into flat dotted overrides: ``[lora] r = 8`` -> ``{"lora.r": 8}``.

    Tables are flattened recursively; an empty table becomes ``{key: {}}`` (so an unknown empty
    table is still reported). Given the config ``cls``, a table at a dict-typed field
    (``[lora.rank_pattern]``) is kept whole as that field's value. Raises ``OSError`` or
    ``tomllib.TOMLDecodeError`` (a ``ValueError``).
    """
    if _toml is None:  # pragma: no cover
        raise RuntimeError("reading TOML needs Python >= 3.11 (tomllib) or the tomli package")
    with open(path, "rb") as fh:
        data = _toml.load(fh)
    leaves = set(_Schema.build(cls).leaves) if cls is not None else set()
    out: dict[str, Any] = {}

    def walk(table: Mapping[str, Any], prefix: str) -> None:
        for key, value in table.items():
            name = prefix + key
            if isinstance(value, dict) and value and name.replace("-", "_") not in leaves:
                walk(value, name + ".")
            else:
                out[name] = value

    walk(data, "")
    return out


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


class _CommandLine:
    """Hand-rolled argparse-like front end over a :class:`_Schema`."""

    def __init__(self, schema: _Schema, prog: str | None, description: str | None) -> None:
        self.schema = schema
        self.prog = prog or os.path.basename(sys.argv[0]) or "config"
        self.description = description
        if _CONFIG_FLAG in schema.leaves or _CONFIG_FLAG in schema.sections:
            raise TypeError(
                f"a top-level config field may not be named {_CONFIG_FLAG!r} (the --config flag)"
            )
        # normalised flag name -> (dotted key, negated?)
        self.lookup: dict[str, tuple[str, bool]] = {}
        for key, info in schema.leaves.items():
            self.lookup[key] = (key, False)
        for key, info in schema.leaves.items():
            if _is_bool_type(info.type):
                head, _, leaf = key.rpartition(".")
                for alias in (f"no_{key}", f"{head}.no_{leaf}" if head else f"no_{leaf}"):
                    self.lookup.setdefault(alias, (key, True))

    # -- output -------------------------------------------------------------------------------

    def usage(self) -> str:
        leaves = self.schema.leaves.items()
        required = [f"--{k} {_type_name(i.type)}" for k, i in leaves if i.default is MISSING]
        rest = " ".join([*required, "[--KEY=VALUE ...]"])
        return f"usage: {self.prog} [-h] [--config PATH] {rest}"

    def error(self, message: str) -> typing.NoReturn:
        sys.stderr.write(f"{self.usage()}\n{self.prog}: error: {message}\n")
        raise SystemExit(2)

    def help(self) -> str:
        width = max(shutil.get_terminal_size().columns - 2, 40)
        indent = min(30, max(width // 3, 16))
        lines = [self.usage(), ""]
        if self.description:
            lines += [textwrap.fill(self.description, width), ""]
        lines += [
            textwrap.fill(
                "Flags take --key=value or --key value; '-' and '_' are interchangeable in names. "
                "Sequences: a,b,c or a JSON list. Dicts: a JSON object or k=v,k2=v2. Optional "
                "values accept 'none'. Precedence: defaults < config files < --config files < "
                "other flags.",
                width,
            ),
            "",
            "options:",
        ]
        lines += self._entry("-h, --help", "show this help message and exit", width, indent)
        lines += self._entry(
            "--config PATH",
            "TOML file of config values, e.g. '[lora]' then 'r = 8' (repeatable; applied in order "
            "after the built-in config files and before the other flags)",
            width,
            indent,
        )
        for group in self.schema.groups:
            if not group.leaves:
                continue
            if group.prefix:
                title = group.prefix[:-1] + ":"
                lines += ["", f"{title} {group.help}" if group.help else title]
            for info in group.leaves:
                lines += self._entry(self._invocation(info), self._help_text(info), width, indent)
        return "\n".join(lines) + "\n"

    @staticmethod
    def _invocation(info: FieldInfo) -> str:
        if _is_bool_type(info.type):
            head, _, leaf = info.name.rpartition(".")
            neg = f"--{head}.no-{leaf}" if head else f"--no-{leaf}"
            value = "[=BOOL|none]" if info.type is not bool else "[=BOOL]"
            return f"--{info.name}{value}, {neg}"
        return f"--{info.name} {_type_name(info.type)}"

    @staticmethod
    def _help_text(info: FieldInfo) -> str:
        if info.default is MISSING:
            tail = "(required)"
        else:
            shown = format_value(info.default, info.type)
            tail = f"(default: {shown if shown else repr(shown)})"
        return f"{info.help} {tail}" if info.help else tail

    @staticmethod
    def _entry(invocation: str, text: str, width: int, indent: int) -> list[str]:
        head = "  " + invocation
        body = textwrap.wrap(text, max(width - indent, 20)) or [""]
        pad = " " * indent
        if len(head) + 2 <= indent:
            first = [head.ljust(indent) + body[0]]
            return first + [pad + line for line in body[1:]]
        return [head] + [pad + line for line in body]

    # -- parsing ------------------------------------------------------------------------------

    def parse(self, argv: Sequence[str]) -> tuple[dict[str, tuple[str, Any]], list[str]]:
        """Tokens -> ({dotted key: (flag as typed, raw value)}, [--config paths])."""
        argv = list(argv)
        end = argv.index("--") if "--" in argv else len(argv)
        if any(tok in ("-h", "--help") for tok in argv[:end]):
            sys.stdout.write(self.help())
            raise SystemExit(0)
        values: dict[str, tuple[str, Any]] = {}
        configs: list[str] = []
        i = 0
        while i < end:
            tok = argv[i]
            i += 1
            if not tok.startswith("--"):
                if tok.startswith("-") and len(tok) > 1:
                    self.error(self.schema.unknown_message([tok.lstrip("-")], flag=True))
                self.error(f"unrecognized arguments: {' '.join(argv[i - 1:])}")
            name, eq, raw = tok[2:].partition("=")
            flag = "--" + name
            norm = name.strip().replace("-", "_")
            if norm == _CONFIG_FLAG:
                if not eq:
                    if i >= end or argv[i].startswith("--"):
                        self.error(f"argument {flag}: expected one argument")
                    raw, i = argv[i], i + 1
                configs.append(raw)
                continue
            entry = self.lookup.get(norm)
            if entry is None:
                self.error(self.schema.unknown_message([name], flag=True))
            key, negated = entry
            tp = self.schema.leaves[key].type
            value: Any
            if negated:
                if eq:
                    self.error(f"argument {flag}: ignored explicit argument {raw!r}")
                value = False
            elif _is_bool_type(tp):
                nxt = argv[i].strip().lower() if i < end else None
                literals = _TRUE_STRINGS | _FALSE_STRINGS
                if tp is not bool:
                    literals |= {s.lower() for s in _NONE_STRINGS}
                if eq:
                    value = raw
                elif nxt is not None and nxt in literals:
                    value, i = argv[i], i + 1
                else:
                    value = True
            elif eq:
                value = raw
            elif i < end and not argv[i].startswith("--"):
                value, i = argv[i], i + 1
            else:
                self.error(f"argument {flag}: expected one argument")
            values.pop(key, None)  # keep "last wins" order
            values[key] = (flag, value)
        if end < len(argv) - 1:
            self.error(f"unrecognized arguments: {' '.join(argv[end + 1:])}")
        return values, configs


def parse_config(
    cls: type[T],
    argv: Sequence[str] | None,
    *,
    config_files: Sequence[str | os.PathLike[str]] = (),
    prog: str | None = None,
    description: str | None = None,
    layers: Sequence[tuple[str, Mapping[str, Any]]] = (),
) -> T:
    """Build a ``cls`` instance from defaults, TOML ``config_files``, ``--config`` files and flags.

    ``layers`` are ``(source name, dotted overrides)`` applied after the defaults and before the
    config files (e.g. per-task settings chosen by the caller).

    ``argv`` excludes the program name (``None``: ``sys.argv[1:]``). ``--help`` prints every flag
    grouped by sub-config and exits 0; any error prints usage and a message to stderr and exits 2
    (like argparse).
    """
    if isinstance(argv, str):
        raise TypeError("argv must be a sequence of strings, not a single string")
    schema = _Schema.build(cls)
    cli = _CommandLine(schema, prog, description)
    values, user_configs = cli.parse(sys.argv[1:] if argv is None else argv)
    merged: dict[str, Any] = {}
    for source, raw_layer in layers:
        try:
            merged.update(_coerce_overrides(schema, raw_layer, source=source))
        except ConfigError as exc:
            cli.error(str(exc))
    for path in [*config_files, *user_configs]:
        try:
            raw = load_toml_overrides(path, cls)
        except FileNotFoundError:
            cli.error(f"config file not found: {os.fspath(path)}")
        except (OSError, ValueError) as exc:
            cli.error(f"cannot read config file {os.fspath(path)}: {exc}")
        try:
            merged.update(_coerce_overrides(schema, raw, source=f"config file {os.fspath(path)}"))
        except ConfigError as exc:
            cli.error(str(exc))
    for key, (flag, raw) in values.items():
        tp = schema.leaves[key].type
        try:
            merged[key] = _coerce(tp, raw)
        except _BadValue as exc:
            cli.error(f"argument {flag}: {_describe_bad(tp, raw, exc)}")
    try:
        return _build(cls, None, merged)
    except _MissingFields as exc:
        cli.error("the following arguments are required: " + ", ".join("--" + n for n in exc.names))
    except (ValueError, TypeError) as exc:
        cli.error(f"invalid configuration: {exc}")
