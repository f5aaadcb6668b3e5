"""VeRA (jpeft.methods.vera): the written-out update with shared, prefix-consistent projections,
identity, merge/unmerge on every layer kind and stacks, training, PEFT both ways (jpeft's
adapters, and PEFT's own with PyTorch's projections redrawn bit for bit), and the MiniLM count
against PEFT's."""

from __future__ import annotations

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods.vera import VeraConfig, projections, torch_projections, vera
from tests import own_models as M
from tests.helpers import minilm_trainable_counts, perturb, tiny_bert, train_tiny

KEY = jax.random.key(0)
TOL = dict(rtol=1e-4, atol=1e-5)


def test_projections_are_shared_prefixes_with_kaiming_bounds():
    a_small, b_small = projections(3, 4, 16, 24)
    a_big, b_big = projections(3, 4, 64, 96)
    np.testing.assert_allclose(a_big[:16] * math.sqrt(64 / 16), a_small, rtol=1e-6)  # same rows
    np.testing.assert_array_equal(b_big[:, :24], b_small)  # B's bound √(6/r) is the same
    assert float(jnp.abs(a_big).max()) <= math.sqrt(6 / 64) and float(jnp.abs(b_big).max()) <= math.sqrt(6 / 4)
    assert not np.allclose(projections(4, 4, 16, 24)[0], a_small)  # the seed matters


def test_written_out_update_on_every_layer_kind_linen_nnx_and_stacks():
    linen, nnx_model, params, ids = M.transformer_twins()
    method = vera(VeraConfig(r=4, targets=r"(query|out|up|down)$", projection_seed=5))
    fresh = method.init(KEY, params, linen.info())
    assert fresh["layers"]["query"]["lambda_d"].shape == (M.LAYERS, 4)
    assert fresh["layers"]["query"]["lambda_b"].shape == (M.LAYERS, M.H, M.DH)
    base_out = linen.module.apply({"params": params}, ids)
    np.testing.assert_array_equal(jpeft.apply(linen, method, params, fresh, ids), base_out)
    delta = perturb(fresh, scale=0.5)
    out = jpeft.apply(linen, method, params, delta, ids)
    assert float(jnp.abs(out - base_out).max()) > 1e-3
    np.testing.assert_allclose(jpeft.apply(nnx_model, method, params, delta, ids), out, **TOL)
    merged = jpeft.merge(method, params, delta, linen.info())
    np.testing.assert_allclose(linen.module.apply({"params": merged}, ids), out, **TOL)
    for name in ("query", "out", "up", "down"):  # kernels (L, *in, *out): ΔW = (A·diag λd)(B·diag λb)
        kernel = np.asarray(params["layers"][name]["kernel"])
        d_in = int(np.prod(kernel.shape[1:])) // int(np.prod(delta["layers"][name]["lambda_b"].shape[1:]))
        d_out = kernel[0].size // d_in
        a, b = (np.asarray(x, np.float64) for x in projections(5, 4, d_in, d_out))
        for layer in range(M.LAYERS):
            lam_d = np.asarray(delta["layers"][name]["lambda_d"][layer])
            lam_b = np.asarray(delta["layers"][name]["lambda_b"][layer]).reshape(-1)
            want = (a @ np.diag(lam_d) @ b @ np.diag(lam_b)).reshape(kernel.shape[1:])
            np.testing.assert_allclose(merged["layers"][name]["kernel"][layer] - kernel[layer], want,
                                       rtol=1e-4, atol=1e-6, err_msg=f"{name}[{layer}]")
    back = jpeft.unmerge(method, merged, delta, linen.info())
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_layers_inside_a_stack_are_a_fixed_point_and_training_works():
    linen, _, params, ids = M.transformer_twins()
    method = vera(VeraConfig(r=4, targets=r"down$", layers=(1,)))
    delta = method.init(KEY, params, linen.info())
    delta = jax.tree.map(lambda v: v.at[1].add(0.3), delta)
    grads = jax.grad(lambda d: jnp.sum(jpeft.apply(linen, method, params, d, ids) ** 2))(delta)
    for g in jax.tree.leaves(grads):
        assert float(jnp.abs(g[0]).max()) == 0.0 and float(jnp.abs(g[2]).max()) == 0.0
        assert float(jnp.abs(g[1]).max()) > 0.0
    model, base = tiny_bert()
    train_tiny(model, vera(VeraConfig(r=8)), base, lr=5e-2)


def test_an_einsum_that_sums_kernel_axes_out_merges_to_what_it_computes():
    class SummedKernelAxis(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((8, 4, 3), "bd,dok->bo", name="e")(x)

    x = jnp.ones((2, 8))
    params = SummedKernelAxis().init(KEY, x)["params"]
    model = jpeft.from_linen(SummedKernelAxis(), params, x)
    method = vera(VeraConfig(r=2, targets="e$"))
    delta = perturb(method.init(KEY, params, model.info()), scale=0.5)
    merged = jpeft.merge(method, params, delta, model.info())
    np.testing.assert_allclose(SummedKernelAxis().apply({"params": merged}, x),
                               jpeft.apply(model, method, params, delta, x), **TOL)


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="vera.r must be an integer >= 1"):
        VeraConfig(r=0)
    with pytest.raises(ValueError, match="vera.projection_seed"):
        VeraConfig(projection_seed=-1)
    model, base = tiny_bert()
    delta = vera(VeraConfig(r=4)).init(KEY, base, model.info())
    ids = jnp.ones((1, 5), jnp.int32)
    with pytest.raises(ValueError, match="expected VeRA's"):
        jpeft.apply(model, vera(VeraConfig(r=8)), base, delta, ids, jnp.ones_like(ids))
    with pytest.raises(ValueError, match=r"vera.projection_shape must be empty .* got \(16,\)"):
        VeraConfig(projection_shape=(16,))
    with pytest.raises(ValueError, match="wider than projection_shape=\\(8, 8\\)"):
        jpeft.apply(model, vera(VeraConfig(r=4, projection_shape=(8, 8))), base, delta, ids, jnp.ones_like(ids))


# -- Hugging Face PEFT ----------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::UserWarning")
def test_jpeft_adapters_load_in_peft_and_back(tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("torch")
    from jpeft.checkpoint.hf_peft import load_peft_adapter, save_peft_adapter
    from tests.checkpoint.test_hf_peft import (
        _trained_head, batch, compare, fresh_hf, hf_base, hf_logits, jpeft_pair, our_logits)

    hf, state = hf_base()
    model, base = jpeft_pair(hf, state)
    method = vera(VeraConfig(r=4, targets=r"(query|intermediate/dense|output/dense)$", projection_seed=7,
                               d_initial=0.2))  # d_in 16 and 24: the λ_d rescaling matters
    delta = perturb(method.init(KEY, base, model.info()), scale=3.0)
    params, data = _trained_head(base), batch()
    ours = our_logits(model, method, params, delta, data)
    folder = save_peft_adapter(tmp_path / "ours", method, delta, params, base_model_name_or_path="tiny",
                               model=model)
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["projection_prng_key"] == 7 and saved["save_projection"] is True
    pm = peft.PeftModel.from_pretrained(fresh_hf("bert", 2, state), str(folder)).eval()
    compare("vera/export", ours, hf_logits(pm, data),
            our_logits(model, method, params, jax.tree_util.tree_map(jnp.zeros_like, delta), data))
    back, again, params2 = load_peft_adapter(folder, model, base)
    assert (back.config.r, back.config.projection_seed, back.config.d_initial) == (4, 7, 0.2)
    assert back.config.projection_shape == ()  # jpeft's draw recognised: no PEFT projections
    np.testing.assert_allclose(our_logits(model, back, params2, again, data), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed, shape", [(0, (4, 16)), (5, (3, 40)), (2**31 - 1, (8, 7))])
def test_peft_projections_are_pytorch_s_draw_bit_for_bit(seed, shape):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft.tuners.vera.model import _kaiming_init

    r, max_in = shape
    max_out = max_in + 3
    generator = torch.Generator(device="cpu").manual_seed(seed)
    want_a = _kaiming_init((r, max_in), generator=generator).numpy()
    want_b = _kaiming_init((max_out, r), generator=generator).numpy()
    a, b = torch_projections(seed, r, max_in, max_out)
    np.testing.assert_array_equal(a, want_a)
    np.testing.assert_array_equal(b, want_b)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_s_own_adapters_load_with_peft_s_logits_and_go_back(tmp_path, save_projection):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file, save_file

    from jpeft.checkpoint.hf_peft import load_peft_adapter, save_peft_adapter
    from tests.checkpoint.test_hf_peft import (
        batch, compare, fresh_hf, hf_base, hf_logits, make_adapter, our_logits, randomize_trainable)

    pm, model, base, folder = make_adapter(tmp_path, peft.VeraConfig(
        task_type="SEQ_CLS", r=4, projection_prng_key=11, save_projection=save_projection,
        target_modules=["query", "intermediate.dense", "output.dense"]))  # d_in 16 and 24, d_out 16 and 24
    randomize_trainable(pm, seed=2, scale=3.0)  # VeRA's vectors need a large step to matter
    pm.save_pretrained(str(folder))
    data = batch()
    transform, delta, params = load_peft_adapter(folder, model, base)
    assert transform.config.projection_shape == (24, 24) and transform.config.projection_seed == 11
    theirs = hf_logits(pm, data)
    ours = our_logits(model, transform, params, delta, data)
    compare(f"vera/peft-drawn/{save_projection}", ours, theirs,
            our_logits(model, transform, params, jax.tree_util.tree_map(jnp.zeros_like, delta), data))
    merged = jpeft.merge(transform, params, delta, model.info())
    np.testing.assert_allclose(np.asarray(model.apply({"params": merged}, *(jnp.asarray(x) for x in data))),
                               theirs, atol=1e-4)
    out = save_peft_adapter(tmp_path / "back", transform, delta, params, base_model_name_or_path="tiny",
                            model=model)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    np.testing.assert_array_equal(tensors["base_model.vera_A"], pm.base_model.vera_A["default"].numpy())
    _, state = hf_base()
    again = peft.PeftModel.from_pretrained(fresh_hf("bert", 2, state), str(out)).eval()
    np.testing.assert_allclose(hf_logits(again, data), theirs, atol=1e-5)
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] + np.float32(1e-3)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="neither PEFT's nor jpeft's draw for projection_prng_key=11"):
        load_peft_adapter(out, model, base)
    assert torch is not None


@pytest.mark.real
def test_minilm_count_equals_peft_s(minilm_dir):
    """r=256 on query and value: 12 × (256 + 384) vectors and the 2-class head (770)."""
    peft = pytest.importorskip("peft")
    assert minilm_trainable_counts(minilm_dir, vera(VeraConfig()), peft.VeraConfig(
        task_type="SEQ_CLS", r=256, target_modules=["query", "value"])) == (8_450, 8_450)
