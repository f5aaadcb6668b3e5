"""OFT (jpeft.methods.oft): PEFT's Cayley rotations term for term, identity, W' = R W on every
layer kind, merge/unmerge, stacks with ``layers=``, COFT's projection, PEFT both ways, refusals."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods.oft import OftConfig, blocks, constrain, oft, rotations
from jpeft.train.optim import OptimConfig
from jpeft.train.trainer import Trainer
from tests import own_models as M
from tests.helpers import minilm_trainable_counts, perturb, tiny_batch, tiny_bert

KEY = jax.random.key(0)
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("neumann,terms", [(True, 1), (True, 2), (True, 3), (True, 4), (True, 5), (True, 7),
                                           (False, 5)])
def test_rotations_are_peft_s(neumann, terms):
    torch = pytest.importorskip("torch")
    layer_mod = pytest.importorskip("peft.tuners.oft.layer")
    b, k = 4, 3
    q = np.asarray(jax.random.normal(KEY, (k, b * (b - 1) // 2)) * 0.3, np.float32)
    theirs = layer_mod.OFTRotationModule(k, q.shape[1], b, k * b)._cayley_batch(
        torch.tensor(q), b, neumann, terms).numpy()
    ours = np.asarray(rotations(OftConfig(block_size=b, use_cayley_neumann=neumann,
                                          num_cayley_neumann_terms=terms), jnp.asarray(q), b))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    if not neumann:  # the exact Cayley transform is orthogonal
        np.testing.assert_allclose(ours @ np.swapaxes(ours, -1, -2), np.broadcast_to(np.eye(b), ours.shape),
                                   atol=1e-5)


def test_block_sizes_follow_peft_s_adjustment():
    assert blocks(OftConfig(block_size=32), 768) == (24, 32)
    assert blocks(OftConfig(block_size=5), 16) == (4, 4)   # 4 and 8 divide 16: the nearer, 4
    assert blocks(OftConfig(block_size=6), 16) == (4, 4)   # a tie (4, 8): the lower
    assert blocks(OftConfig(block_size=0, r=3), 16) == (2, 8)   # r: 2 and 4 tie, the lower
    assert blocks(OftConfig(block_size=64), 16) == (1, 16)
    with pytest.raises(ValueError, match="exactly one of block_size and r"):
        OftConfig(block_size=8, r=2)


@pytest.mark.parametrize("cfg", [dict(block_size=4),
                                 dict(block_size=0, r=2, block_share=True, use_cayley_neumann=False)])
def test_rotated_kernels_on_every_layer_kind_linen_nnx_merge_unmerge(cfg):
    linen, nnx_model, params, ids = M.transformer_twins()
    method = oft(OftConfig(targets=r"(query|out|up|down)$", **cfg))
    fresh = method.init(KEY, params, linen.info())
    base_out = linen.module.apply({"params": params}, ids)
    np.testing.assert_allclose(jpeft.apply(linen, method, params, fresh, ids), base_out, **TOL)
    delta = perturb(fresh, scale=0.3)
    out = jpeft.apply(linen, method, params, delta, ids)
    assert float(jnp.abs(out - base_out).max()) > 1e-3
    np.testing.assert_allclose(jpeft.apply(nnx_model, method, params, delta, ids), out, **TOL)
    merged = jpeft.merge(method, params, delta, linen.info())
    np.testing.assert_allclose(linen.module.apply({"params": merged}, ids), out, **TOL)
    config = method.config
    for name in ("query", "out", "down"):  # kernels (L, *in, *out): W' = diag(R_k) W, layer by layer
        kernel = np.asarray(params["layers"][name]["kernel"], np.float64)
        d_in = int(np.prod(kernel.shape[1:])) // int(np.prod(np.shape(merged["layers"][name]["kernel"])[-1:]))
        if name == "query":
            d_in = kernel.shape[1]
        n, b = blocks(config, d_in)
        for layer in range(M.LAYERS):
            r = np.asarray(rotations(config, delta["layers"][name]["oft_q"][layer], b), np.float64)
            r = np.broadcast_to(r, (n, b, b))
            full = np.zeros((d_in, d_in))
            for k in range(n):
                full[k * b:(k + 1) * b, k * b:(k + 1) * b] = r[k]
            w = kernel[layer].reshape(d_in, -1)
            np.testing.assert_allclose(np.asarray(merged["layers"][name]["kernel"][layer]).reshape(d_in, -1),
                                       full @ w, rtol=1e-4, atol=1e-5, err_msg=f"{name}[{layer}]")
    back = jpeft.unmerge(method, merged, delta, linen.info())
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_layers_inside_a_stack_are_left_alone():
    linen, _, params, ids = M.transformer_twins()
    method = oft(OftConfig(block_size=4, targets=r"down$", layers=(1,)))
    delta = perturb(method.init(KEY, params, linen.info()), scale=0.3)
    grads = jax.grad(lambda d: jnp.sum(jpeft.apply(linen, method, params, d, ids) ** 2))(delta)
    g = grads["layers"]["down"]["oft_q"]
    assert float(jnp.abs(g[0]).max()) == 0.0 and float(jnp.abs(g[2]).max()) == 0.0
    assert float(jnp.abs(g[1]).max()) > 0.0
    merged = jpeft.merge(method, params, delta, linen.info())["layers"]["down"]["kernel"]
    np.testing.assert_array_equal(merged[0], params["layers"]["down"]["kernel"][0])


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kwargs", [dict(oft_block_size=4), dict(oft_block_size=0, r=2, block_share=True),
                                    dict(oft_block_size=8, use_cayley_neumann=False),
                                    dict(oft_block_size=4, coft=True, eps=8.0)])
def test_peft_adapters_both_ways(tmp_path, kwargs):
    peft = pytest.importorskip("peft")
    pytest.importorskip("torch")
    from jpeft.checkpoint.hf_peft import load_peft_adapter, save_peft_adapter
    from tests.checkpoint.test_hf_peft import (
        _trained_head, base_logits, batch, compare, fresh_hf, hf_base, hf_logits, jpeft_pair, make_adapter,
        our_logits, randomize_trainable)

    pm, model, base, folder = make_adapter(tmp_path, peft.OFTConfig(
        task_type="SEQ_CLS", target_modules=["query", "value", "intermediate.dense"], **kwargs))
    if kwargs.get("coft"):  # blocks beyond COFT's radius: PEFT projects them when it runs
        randomize_trainable(pm, seed=2, scale=3.0)
        pm.save_pretrained(str(folder))
    data = batch()
    transform, delta, params = load_peft_adapter(folder, model, base)
    assert transform.name == "oft"
    compare("oft/import", our_logits(model, transform, params, delta, data), hf_logits(pm, data),
            base_logits(model, base, data))
    hf, state = hf_base()
    model, base = jpeft_pair(hf, state)
    method = oft(OftConfig(block_size=4, targets=r"(key|output/dense)$", coft=kwargs.get("coft", False),
                           eps=kwargs.get("eps", 6e-5)))
    delta = perturb(method.init(KEY, base, model.info()), scale=2.0 if kwargs.get("coft") else 0.5)
    params = _trained_head(base)
    out = save_peft_adapter(tmp_path / "ours", method, delta, params, base_model_name_or_path="tiny",
                            model=model)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "OFT"
    loaded = peft.PeftModel.from_pretrained(fresh_hf("bert", 2, state), str(out)).eval()
    compare("oft/export", our_logits(model, method, params, delta, data), hf_logits(loaded, data),
            our_logits(model, method, params, jax.tree_util.tree_map(jnp.zeros_like, delta), data))


def test_coft_projection_is_peft_s_and_training_stays_inside_the_ball():
    torch = pytest.importorskip("torch")
    layer_mod = pytest.importorskip("peft.tuners.oft.layer")
    b, k, eps = 4, 3, 0.05
    config = OftConfig(block_size=b, coft=True, eps=eps)
    q = np.asarray(jax.random.normal(KEY, (k, b * (b - 1) // 2)), np.float32) * np.float32([[0.001], [0.1], [1.0]])
    module = layer_mod.OFTRotationModule(k, q.shape[1], b, k * b, coft=True, eps=eps)
    theirs = module._project_batch(torch.tensor(q), eps=eps).numpy()
    ours = np.asarray(constrain(config, jnp.asarray(q)))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-8)
    assert np.array_equal(ours[0], q[0]) and not np.allclose(ours[2], q[2])  # inside kept, outside scaled
    model, base = tiny_bert()
    trainer = Trainer(model, oft(config), base, total_steps=3, optim=OptimConfig(lr=0.5, warmup_ratio=0.0))
    state = trainer.init_state(KEY)
    for step in range(1, 4):
        state, _ = trainer.train_step(state, trainer.frozen, tiny_batch())
        state = trainer.between_steps(state, step)
    norms = [np.sqrt(2) * np.linalg.norm(np.asarray(q), axis=-1) / (eps / np.sqrt(q.shape[-2]))
             for q in jax.tree_util.tree_leaves(state.trainable["delta"])]
    assert max(float(n.max()) for n in norms) <= 1 + 1e-5  # every block inside its ball ...
    assert min(float(n.max()) for n in norms) > 1 - 1e-5   # ... and every module at its edge


def test_coft_steps_follow_peft_s_order_project_then_use():
    """PEFT projects its stored weight before each use and the optimizer updates the projected
    weight; jpeft projects after each update and passes the forward's projection straight
    through. Written out with SGD, both give the same weights used at every step."""
    model, base = tiny_bert()
    data = tiny_batch()
    coft = oft(OftConfig(block_size=4, coft=True, eps=0.5))
    plain = oft(OftConfig(block_size=4))
    project = lambda d: jax.tree_util.tree_map(lambda q: constrain(coft.config, q), d)
    start = project(perturb(coft.init(KEY, base, model.info()), scale=1.0))  # stored deltas are projected

    def loss(method, delta):
        out = jpeft.apply(model, method, base, delta, data["input_ids"], data["attention_mask"],
                          data["token_type_ids"])
        return 1e4 * jnp.sum(out ** 2)  # tiny logits: a large scale makes the steps matter

    step = lambda d, g: jax.tree_util.tree_map(lambda q, dq: q - 0.5 * dq, d, g)
    theirs, ours = start, start
    for _ in range(3):
        theirs = project(theirs)  # PEFT: weight.copy_(project(weight)) in the forward, then the step
        theirs = step(theirs, jax.grad(lambda d: loss(plain, d))(theirs))
        ours = project(step(ours, jax.grad(lambda d: loss(coft, d))(ours)))  # jpeft: step, between_steps
    for a, b in zip(jax.tree_util.tree_leaves(project(theirs)), jax.tree_util.tree_leaves(ours)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # q + (proj(q) − q) rounds
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(ours),
                                                            jax.tree_util.tree_leaves(start)))
    assert moved > 1e-3, moved


def test_refusals_name_the_problem(tmp_path):
    model, base = tiny_bert()
    other = oft(OftConfig(block_size=4)).init(KEY, base, model.info())
    ids = jnp.ones((1, 5), jnp.int32)
    with pytest.raises(ValueError, match="expected OFT's oft_q"):
        jpeft.apply(model, oft(OftConfig(block_size=8)), base, other, ids, jnp.ones_like(ids))
    with pytest.raises(ValueError, match="oft.num_cayley_neumann_terms"):
        OftConfig(num_cayley_neumann_terms=0)
    with pytest.raises(ValueError, match="oft.eps must be a number > 0"):
        OftConfig(coft=True, eps=0.0)


@pytest.mark.real
def test_minilm_count_equals_peft_s(minilm_dir):
    """Blocks of 32 on query and value (384 = 12 · 32): 12 · 32·31/2 entries per module."""
    peft = pytest.importorskip("peft")
    assert minilm_trainable_counts(minilm_dir, oft(OftConfig()), peft.OFTConfig(
        task_type="SEQ_CLS", oft_block_size=32, target_modules=["query", "value"])) == (72_194, 72_194)
