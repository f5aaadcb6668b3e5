"""Hugging Face PEFT's target-module rules, both ways.

Reading: which modules a saved config adapts, evaluated on the PyTorch names of the jpeft model
exactly as PEFT's ``check_target_module_exists`` does (a list entry matches a module whose name
equals it or ends with ``"." + entry``, a string is ``re.fullmatch``-ed, the ``modules_to_save``
are excluded, ``layers_to_transform``/``layers_pattern`` filter list targets,
``rank_pattern``/``alpha_pattern`` keys ``k`` match ``(.*\\.)?(k)$``). Writing: the most compact
``target_modules`` (+ ``layers_to_transform``) that selects exactly the adapted modules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jpeft.checkpoint.peft_fields import ADAPTER_CONFIG, _refuse
from jpeft.checkpoint.peft_naming import _LAYER_NAME, _Modules


def _as_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return list(value)


def _peft_layer_ok(cfg: Mapping[str, Any], key: str) -> bool:
    """PEFT's ``layers_to_transform``/``layers_pattern`` filter (list targets only)."""
    indexes = cfg.get("layers_to_transform")
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    pattern = cfg.get("layers_pattern")
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in _as_list(pattern) or []:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == indexes if isinstance(indexes, int) else idx in indexes


def peft_target_matches(cfg: Mapping[str, Any], key: str) -> bool:
    """PEFT's ``check_target_module_exists`` for one PyTorch module name (a faithful copy)."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    for m in cfg.get("modules_to_save") or ():
        if re.match(rf"(^|.*\.){m}($|\..*)", key):
            return False
    targets = cfg.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    return _peft_layer_ok(cfg, key)


def _peft_pattern_value(patterns: Mapping[str, Any], key: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key`` + lookup (``rank_pattern``/``alpha_pattern``)."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return patterns[pattern]
    return patterns.get(key, default)


def _resolve_targets(cfg: Mapping[str, Any], mods: _Modules, what: str) -> list[str]:
    """The jpeft Dense paths PEFT adapts under ``cfg`` (refusing non-Dense matches)."""
    targets = cfg.get("target_modules")
    if targets is None:
        raise _refuse("target_modules", None, "the saved config must name its target modules")
    if targets == "all-linear":
        cfg = dict(cfg, target_modules=mods.all_linear())
    hits = [name for name in mods.by_name if peft_target_matches(cfg, name)]
    bad = [n for n in hits if mods.by_name[n] not in mods.dense]
    if bad:
        raise _refuse("target_modules", targets,
                      f"it selects {bad[:5]}, which {'is' if len(bad) == 1 else 'are'} not Dense (Linear) "
                      f"layers in this model; jpeft's {what} adapts Dense layers only")
    if not hits:
        raise ValueError(
            f"{ADAPTER_CONFIG}: target_modules={targets!r} matches no module of this model; is the base "
            f"the architecture the adapter was trained on? Dense modules: "
            f"{sorted(mods.name(p) for p in mods.dense)[:40]}")
    return sorted(mods.by_name[n] for n in hits)


def _exact_regex(paths: Iterable[str]) -> str:
    return "^(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"


def _name_to_path_regex(entry: str) -> str:
    """A PEFT list entry (a module-name suffix) as an escaped jpeft path fragment."""
    for prefix in ("bert.", "roberta."):
        entry = entry.removeprefix(prefix)
    entry = _LAYER_NAME.sub(r"\1\2_\3", entry)
    return "/".join(re.escape(part) for part in entry.split("."))


def _suffix_candidates(names: Sequence[str]) -> list[list[str]]:
    """Lists of module-name suffixes (last 1, 2, ... components), shortest first, then full names."""
    depth = max(len(n.split(".")) for n in names)
    out = []
    for k in range(1, depth):
        out.append(sorted({".".join(n.split(".")[-k:]) for n in names}))
    out.append(sorted(names))
    return out


def _layer_of(name: str) -> int | None:
    m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    return int(m.group("idx")) if m else None


def _minimal_suffixes(names: Sequence[str], universe: Sequence[str], base_cfg: Mapping[str, Any]) -> list[str]:
    """For each name, its shortest dotted suffix that selects nothing outside ``names``."""
    want = set(names)
    out: set[str] = set()
    for name in names:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            entry = ".".join(parts[-k:])
            cfg = dict(base_cfg, target_modules=[entry])
            if {u for u in universe if peft_target_matches(cfg, u)} <= want:
                out.add(entry)
                break
    return sorted(out)


def _peft_targets_for(names: Sequence[str], universe: Sequence[str],
                      modules_to_save: Sequence[str]) -> dict[str, Any]:
    """A compact PEFT ``target_modules`` (+ ``layers_to_transform``) selecting exactly ``names``."""
    want = set(names)
    layer_ids = [_layer_of(n) for n in names]
    all_layers = sorted({_layer_of(u) for u in universe if _layer_of(u) is not None})
    layer_options: list[list[int] | None] = [None]
    if all(i is not None for i in layer_ids) and sorted(set(layer_ids)) != all_layers:
        layer_options.insert(0, sorted(set(layer_ids)))
    options = []
    for layers in layer_options:
        base_cfg = {"layers_to_transform": layers, "modules_to_save": list(modules_to_save)}
        options.append((_minimal_suffixes(names, universe, base_cfg), layers))
        options.extend((suffixes, layers) for suffixes in _suffix_candidates(list(names)))
    options.sort(key=lambda opt: sum(len(e) for e in opt[0]))  # stable: the most compact first
    for suffixes, layers in options:
        opt = {"target_modules": suffixes, "layers_to_transform": layers}
        cfg = dict(opt, modules_to_save=list(modules_to_save))
        if {n for n in universe if peft_target_matches(cfg, n)} == want:
            return opt
    raise ValueError(f"cannot select exactly the modules {sorted(want)[:5]} with PEFT's target rules "
                     "(they collide with the task head, which PEFT trains whole)")
