"""Flax models that load Hugging Face checkpoints and expose the taps of :mod:`jpeft.models.taps`.

:func:`auto_from_pretrained` picks the family from the folder's ``config.json`` (``model_type``),
or reads a ``.gguf`` file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

FAMILIES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "camembert": "bert",
            "llama": "llama", "gpt2": "gpt2"}


def auto_from_pretrained(name_or_path: str | os.PathLike[str], **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """``(model, params)`` for a BERT-family, Llama or GPT-2 folder / Hub id, or a GGUF file."""
    import importlib

    from jpeft.models import hub

    if str(name_or_path).endswith(".gguf"):
        from jpeft.models.gguf import from_gguf

        return from_gguf(Path(name_or_path), **kwargs)
    model_dir = hub.resolve_model_dir(name_or_path)
    model_type = hub.read_config(model_dir).get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{model_dir}: model_type {model_type!r} is not supported; "
                         f"supported: {', '.join(sorted(FAMILIES))}")
    module = importlib.import_module(f"jpeft.models.{FAMILIES[model_type]}")
    return module.from_pretrained(model_dir, **kwargs)
