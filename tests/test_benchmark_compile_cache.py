"""benchmarks.compile_cache: a worker process compiles MiniLM's LoRA step into the cache directory
it is given, and the command refuses models it does not know."""

from __future__ import annotations

import pytest

from benchmarks import compile_cache


@pytest.mark.real
def test_a_worker_writes_its_compiled_step_into_the_cache_it_is_given(minilm_dir, tmp_path):
    result = compile_cache._run("minilm", str(tmp_path))
    assert result["cache_dir"] == str(tmp_path)
    assert any(tmp_path.iterdir()), "the compiled train step was not written to the cache"
    assert result["first_call_s"] >= result["compile_s"] > 0.0
    assert result["step_s"] > 0.0


def test_a_worker_without_a_cache_reports_none(monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere")
    seen = {}
    monkeypatch.setattr(compile_cache, "run_worker", lambda cmd, what, env: seen.update(env) or {})
    compile_cache._run("minilm", None)
    assert "JAX_COMPILATION_CACHE_DIR" not in seen  # the "none" side ignores the user's own cache


@pytest.mark.parametrize("models", ["gpt2", "", "minilm,bert"])
def test_unknown_models_are_refused_by_name(models, capsys):
    with pytest.raises(SystemExit):
        compile_cache.main([f"--models={models}"])
    assert "--models takes minilm, smollm2, smollm2-no-dropout" in capsys.readouterr().err


def test_the_table_gives_the_compilation_per_model_and_cache():
    rows = [{"model": "minilm", "cache": "warm", "first_call_s": 4.2, "compile_s": 2.1, "step_s": 2.05}]
    assert compile_cache._table(rows).splitlines()[2] == "| minilm | warm | 4.2 | 2.1 | 2.05 |"
