"""Nested config dataclasses as TOML layers and a command line (`tyro`).

One key names a leaf field everywhere: on the command line (``--lora.r=8``), in TOML files
(``[lora]`` then ``r = 8``, or ``"lora.r" = 8``) and in :func:`to_dict` output. A nested dataclass
adds its field name as a prefix (``lora.``), unless the field is annotated :data:`Flat`, whose
fields keep their own names (``optim: Flat[OptimConfig]`` gives ``--lr``, not ``--optim.lr``).

:func:`parse` layers, lowest first: the dataclass defaults < ``layers`` (e.g. TOML files chosen by
the caller) < ``--config=FILE`` files (repeatable, in order) < the other flags. `tyro` builds the
command line from the dataclasses as they are: every field is a flag, ``--help`` lists each with
its default and its ``field(metadata={"help": ...})`` text, sequences take several values
(``--buckets 32 64``), dicts key-value pairs (``--group-lr head 10``), booleans ``--flag``,
``--no-flag`` (and, kept here, ``--flag=false``), optional values ``none``. A mistake is one line,
``prog: error: ...``, naming the flag or key with the closest valid ones, and exit code 2.

Nothing is mutated: configs are rebuilt with :func:`dataclasses.replace` along changed paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import json
import os
import re
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, NamedTuple, TypeVar, Union, get_args, get_origin

import tyro

T = TypeVar("T")
Flat = tyro.conf.OmitArgPrefixes  # a sub-config whose fields keep their own (unprefixed) names
_NONE = ("none", "None", "null")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")

__all__ = ["ConfigError", "Flat", "Leaf", "apply", "fail", "from_dict", "leaves", "parse",
           "read_toml", "to_dict"]


class ConfigError(ValueError):
    """An unknown key or a value of the wrong type in a config layer."""


class Leaf(NamedTuple):
    """A leaf field: its ``path`` of attribute names from the root and its (resolved) ``type``."""

    path: tuple[str, ...]
    type: Any


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def leaves(cls: type) -> dict[str, Leaf]:
    """Every leaf of config class ``cls`` by its key (``"lora.r"``, ``"lr"`` for a :data:`Flat`
    group), depth first in declaration order."""
    out: dict[str, Leaf] = {}

    def walk(cls: type, prefix: str, path: tuple[str, ...]) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            tp, flat = hints[f.name], False
            if get_origin(tp) is Annotated:
                tp, flat = tp.__origin__, Flat in tp.__metadata__
            if dataclasses.is_dataclass(tp):
                walk(tp, prefix if flat else f"{prefix}{f.name}.", (*path, f.name))
            else:
                out[prefix + f.name] = Leaf((*path, f.name), tp)

    walk(cls, "", ())
    return out


# -- values -----------------------------------------------------------------------------------

def _coerce(tp: Any, value: Any) -> Any:
    """``value`` (as TOML or JSON give it) as annotation ``tp``; ``TypeError`` when it does not fit.
    Integers become floats, lists tuples, and ``"none"`` is ``None`` for an optional field."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType) and type(None) in args:
        if value is None or value in _NONE:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value)
    if origin is typing.Literal and value in args:
        return value
    if origin is tuple and isinstance(value, (list, tuple)):
        elems = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(elems) == len(value):
            return tuple(_coerce(a, v) for a, v in zip(elems, value))
    if origin is list and isinstance(value, (list, tuple)):
        return [_coerce(args[0], v) for v in value]
    if origin is dict and isinstance(value, Mapping):
        return {_coerce(args[0], k): _coerce(args[1], v) for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is Path and isinstance(value, (str, os.PathLike)):
        return Path(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    raise TypeError(f"expected {name}, got {value!r}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _flatten(data: Mapping[str, Any], keys: Mapping[str, Leaf], prefix: str = "") -> dict[str, Any]:
    """Nested tables / dotted keys -> ``{key: value}`` (``-`` read as ``_``); a table at a
    dict-typed leaf stays whole."""
    out: dict[str, Any] = {}
    for raw, value in data.items():
        key = prefix + str(raw).strip().replace("-", "_")
        if isinstance(value, Mapping) and key not in keys:
            out.update(_flatten(value, keys, key + ".") if value else {key: value})
        else:
            out[key] = value
    return out


def _suggest(key: str, known: Sequence[str]) -> str:
    """`` (did you mean a, b?)`` for the known keys closest to ``key`` (same last part first)."""
    leaf = key.rsplit(".", 1)[-1]
    near = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    near += [k for k in difflib.get_close_matches(key, known, n=3, cutoff=0.6) if k not in near]
    return f" (did you mean {', '.join(near[:4])}?)" if near else ""


def _rebuild(obj: Any, changes: Mapping[tuple[str, ...], Any]) -> Any:
    """``obj`` with the values at ``changes``' paths replaced (one ``replace`` per changed node)."""
    direct = {path[0]: v for path, v in changes.items() if len(path) == 1}
    nested: dict[str, dict[tuple[str, ...], Any]] = {}
    for path, value in changes.items():
        if len(path) > 1:
            nested.setdefault(path[0], {})[path[1:]] = value
    direct.update({name: _rebuild(getattr(obj, name), sub) for name, sub in nested.items()})
    return dataclasses.replace(obj, **direct) if direct else obj


def apply(cfg: T, data: Mapping[str, Any], source: str = "") -> T:
    """``cfg`` with the values of ``data`` (nested tables or dotted keys, as :func:`leaves` names
    them) set. An unknown key or a value of the wrong type raises :class:`ConfigError` naming
    ``source``, the key and the closest valid keys; a value the config refuses, its ``ValueError``."""
    keys = leaves(type(cfg))
    where = f"{source}: " if source else ""
    changes = {}
    for key, value in _flatten(data, keys).items():
        if key not in keys:
            raise ConfigError(f"{where}unknown key {key!r}{_suggest(key, list(keys))}")
        try:
            changes[keys[key].path] = _coerce(keys[key].type, value)
        except TypeError as err:
            raise ConfigError(f"{where}key {key!r}: {err}") from None
    return _rebuild(cfg, changes)


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """``cls()`` with ``data`` applied (:func:`apply`): the inverse of :func:`to_dict`."""
    return apply(cls(), data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready nested dict of a config by its keys (``{"lr": ..., "lora": {"r": ...}}``; tuples
    as lists, paths as strings): what a TOML layer or ``--config`` file of it would hold."""
    out: dict[str, Any] = {}
    for key, leaf in leaves(type(cfg)).items():
        value = cfg
        for name in leaf.path:
            value = getattr(value, name)
        *groups, name = key.split(".")
        node = out
        for group in groups:
            node = node.setdefault(group, {})
        node[name] = _jsonable(value)
    return out


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a :class:`ConfigError` naming it."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {os.fspath(path)}") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read config file {os.fspath(path)}: {err}") from None


# -- command line -----------------------------------------------------------------------------

_REGISTRY = tyro.constructors.ConstructorRegistry()


@_REGISTRY.primitive_rule
def _none_rule(info: tyro.constructors.PrimitiveTypeInfo) -> Any:
    """``none``, ``None`` or ``null`` for ``None`` (tyro's own rule takes ``None`` only)."""
    if info.type is not type(None):
        return None
    return tyro.constructors.PrimitiveConstructorSpec(
        nargs=1, metavar="{none}", choices=_NONE, instance_from_str=lambda args: None,
        is_instance=lambda x: x is None, str_from_instance=lambda x: ["none"])


def _dict_spec(tp: Any) -> tyro.constructors.PrimitiveConstructorSpec:
    """``dict[K, V]`` from ``k v k2 v2`` (tyro's form), ``k=v,k2=v2`` or a JSON object."""
    key_type, value_type = get_args(tp)

    def read(args: list[str]) -> dict[Any, Any]:
        if len(args) == 1 and args[0].lstrip().startswith("{"):
            pairs = list(json.loads(args[0]).items())
        elif args and all("=" in a for a in args):
            pairs = [p.split("=", 1) for a in args for p in a.split(",") if p.strip()]
        elif len(args) % 2 == 0:
            pairs = list(zip(args[::2], args[1::2]))
        else:
            raise ValueError("give KEY VALUE pairs, KEY=VALUE,... or a JSON object")
        return {key_type(str(k).strip()): value_type(v) for k, v in pairs}

    return tyro.constructors.PrimitiveConstructorSpec(
        nargs="*", metavar="KEY VALUE ...", instance_from_str=read,
        is_instance=lambda x: isinstance(x, dict),
        str_from_instance=lambda d: [str(x) for kv in d.items() for x in kv])


_delegating = False


@_REGISTRY.struct_rule
def _dicts_as_values(info: tyro.constructors.StructTypeInfo) -> Any:
    """A dataclass's dict fields as one flag (tyro would make one flag per key of a non-empty
    default, ``--gates``, which two dicts of a :data:`Flat` group can share)."""
    global _delegating
    if _delegating or not dataclasses.is_dataclass(info.type):
        return None
    _delegating = True
    try:
        spec = tyro.constructors.ConstructorRegistry.get_struct_spec(info)
    finally:
        _delegating = False
    if not isinstance(spec, tyro.constructors.StructConstructorSpec):
        return spec
    fields = tuple(dataclasses.replace(f, type=Annotated[f.type, _dict_spec(f.type)])
                   if get_origin(f.type) is dict else f for f in spec.fields)
    return dataclasses.replace(spec, fields=fields)


def _pop_config_files(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(--config paths, the other arguments)``."""
    files, rest, it = [], [], iter(argv)
    for arg in it:
        if arg == "--config":
            files.append(next(it, ""))
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return files, rest


def _bool_values(argv: Sequence[str], bools: set[str]) -> list[str]:
    """``--flag=false`` -> ``--no-flag``, ``--a.flag=true`` -> ``--a.flag`` for the boolean keys."""
    out = []
    for arg in argv:
        name, eq, value = arg[2:].partition("=")
        if arg.startswith("--") and eq and name.replace("-", "_") in bools:
            head, _, leaf = name.rpartition(".")
            if value.lower() not in _TRUE + _FALSE:
                raise ConfigError(f"{arg}: give true or false (or --{name}, --{head}{'.' if head else ''}"
                                  f"no-{leaf})")
            arg = f"--{name}" if value.lower() in _TRUE else f"--{head}{'.' if head else ''}no-{leaf}"
        out.append(arg)
    return out


def _one_line(text: str) -> str:
    """tyro's boxed error message as one line: the box title dropped, its parts joined by '; '."""
    parts: list[list[str]] = [[]]
    for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines():
        stripped = line.strip(" │╭╮╰╯─")
        if not stripped or stripped.startswith("For full helptext"):
            parts.append([])
        else:
            parts[-1].append(" ".join(stripped.split()))
    parts = [p for p in parts if p]
    if parts:
        parts[0] = parts[0][1:]  # the title ("Value error"), which the message repeats
    return "; ".join(" ".join(p) for p in parts if p)


def fail(prog: str, message: str) -> typing.NoReturn:
    """Print ``prog: error: message`` to stderr and exit with code 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse(cls: type[T], argv: Sequence[str] | None, *, prog: str, description: str = "",
          layers: Callable[[Sequence[str]], Sequence[tuple[str, Mapping[str, Any]]]] | None = None,
          ) -> T:
    """``cls`` from its defaults, then ``layers(argv)`` (``(source, data)`` pairs, in order), then
    each ``--config=FILE`` (TOML), then the other flags of ``argv`` (``None``: ``sys.argv[1:]``).

    ``--help`` prints every flag with its default (after the layers) and help, and exits 0; a
    mistake prints ``prog: error: <one line>`` and exits 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    files, rest = _pop_config_files(argv)
    helping = any(a in ("-h", "--help") for a in rest)
    try:
        default = cls()
        sources = list(layers(argv)) if layers is not None else []
        sources += [(f"config file {path}", read_toml(path)) for path in files]
        for source, data in sources:
            default = apply(default, data, source)
    except ValueError as err:
        if not helping:
            fail(prog, " ".join(str(err).split()))
        default = cls()
    bools = {k for k, leaf in leaves(cls).items() if leaf.type is bool}
    try:
        rest = _bool_values(rest, bools)
    except ConfigError as err:
        fail(prog, str(err))
    note = ("Settings are layered: defaults < the experiment's TOML files < --config FILE "
            "(TOML, repeatable) < flags.")
    kwargs = dict(prog=prog, description=f"{description}\n\n{note}".strip(), default=default,
                  registry=_REGISTRY, args=rest)
    if helping:
        return tyro.cli(cls, **kwargs)
    captured = io.StringIO()
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100000"  # one message line per line, not wrapped to the terminal
    try:
        with contextlib.redirect_stderr(captured):
            cfg = tyro.cli(cls, **kwargs)
    except SystemExit as exit_:
        if exit_.code:
            fail(prog, _one_line(captured.getvalue()))
        raise
    finally:
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns
    sys.stderr.write(captured.getvalue())  # warnings, if any
    return cfg
