"""jpeft on a model it did not write: the Llama 3 architecture of Google's tunix (an NNX library,
installed from PyPI as ``google-tunix``), with a tiny random config.

tunix's code is used as it ships. Its MLP projections are ``nnx.Linear`` layers, which jpeft's
weight-space methods adapt as they are; its attention projections (``q_proj``, ``k_proj``,
``v_proj``, ``o_proj``) and ``lm_head`` are tunix's own ``Einsum`` module (a raw ``w`` parameter
used with ``jnp.einsum``), which one line makes adaptable::

    jpeft.register_layer(llama.Einsum, kind="einsum", kernel="w", equation="einsum_str")

Adapters need
attachment points: the test adds jpeft taps to a model instance by wrapping its sub-modules
(model surgery, as Hugging Face PEFT does), without editing tunix's source.

Printed numbers (``pytest -s``): parameter count, max |Δ| of the identity, merge and checkpoint
checks, and the losses of each short training run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
from jpeft.checkpoint import CheckpointManager, fingerprint
from jpeft.core import paths as P
from jpeft.train.optim import OptimConfig
from jpeft.train.trainer import Trainer, causal_lm_loss

llama = pytest.importorskip(
    "tunix.models.llama3.model",
    reason="the third-party model test needs google-tunix (installed by scripts/dev.sh)")

pytestmark = [pytest.mark.real, pytest.mark.slow]

jpeft.register_layer(llama.Einsum, kind="einsum", kernel="w", equation="einsum_str")

KEY = jax.random.key(0)
B, T, V = 2, 8, 128
CONFIG = dict(num_layers=2, vocab_size=V, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8,
              num_kv_heads=2, rope_theta=10_000, norm_eps=1e-5)
MLP = r"mlp/(gate_proj|up_proj|down_proj)$"
ATTN = r"attn/(q_proj|k_proj|v_proj|o_proj)$"
STEPS = 6
# the model's positional inputs, in order, as batch keys (the trainer passes them positionally)
MODEL_INPUTS = ("input_ids", "positions", "cache", "attention_mask")


def _inputs():
    ids = jnp.asarray(np.random.default_rng(1).integers(0, V, (B, T)), jnp.int32)
    positions = jnp.asarray(np.broadcast_to(np.arange(T), (B, T)), jnp.int32)
    causal = jnp.asarray(np.broadcast_to(np.tril(np.ones((T, T), bool)), (B, T, T)))
    return ids, positions, None, causal


def _batch():
    ids, positions, cache, mask = _inputs()
    return {"input_ids": ids, "positions": positions, "cache": cache, "attention_mask": mask,
            "loss_mask": jnp.ones((B, T), jnp.int32)}


def _random_weights(seed, shapes):
    """Random weights for the parameter shapes ``shapes`` (norm scales one, projections
    N(0, 1/fan_in), embeddings N(0, 1)); tunix itself initialises the MLP kernels to zero.
    NumPy draws them: nothing to compile."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in sorted(P.flatten(shapes).items()):
        if len(leaf.shape) < 2:
            out[path] = jnp.ones(leaf.shape, leaf.dtype)
        else:
            fan_in = leaf.shape[0] * (leaf.shape[1] if path.endswith("o_proj/w") else 1)
            std = 1.0 if "embedding" in path else fan_in ** -0.5
            out[path] = jnp.asarray(std * rng.standard_normal(leaf.shape), leaf.dtype)
    return P.unflatten(out)


def _build(*example_inputs, surgery=lambda m: m):
    """tunix's Llama3 with the tiny config, built abstractly (nothing is initialised: the
    weights come from :func:`_random_weights`), described by jpeft."""
    module = nnx.eval_shape(lambda: surgery(llama.Llama3(llama.ModelConfig(**CONFIG), rngs=nnx.Rngs(0))))
    model, shapes = jpeft.from_nnx(module, *example_inputs)
    return model, shapes


def lm_loss(out, batch):
    logits, _cache = out  # tunix's Llama3 returns (logits, cache)
    return causal_lm_loss(logits, batch)


def _max_diff(a, b) -> float:
    return float(jnp.abs(jnp.asarray(a) - jnp.asarray(b)).max())


@pytest.fixture(scope="module")
def llama3():
    model, shapes = _build()
    return model, _random_weights(7, shapes)


_JITTED: dict = {}  # compiled forwards by (model, method), reused across a test's calls


def _logits(model, params, *inputs):
    """The base model's logits (jitted: eager NNX code compiles every op on its own)."""
    key = (id(model), None)
    if key not in _JITTED:
        _JITTED[key] = (model, jax.jit(lambda p, *x: model.module(p)(*x)[0]))
    return _JITTED[key][1](params, *inputs)


def _adapted(model, method, params, delta, *inputs):
    """The adapted model's logits."""
    key = (id(model), id(method))
    if key not in _JITTED:
        _JITTED[key] = ((model, method), jax.jit(lambda p, d, *x: jpeft.apply(model, method, p, d, *x)[0]))
    return _JITTED[key][1](params, delta, *inputs)


def _init(model, method, params):
    return jax.jit(lambda k, p: method.init(k, p, model.info()))(KEY, params)


def _train(model, method, params, steps=STEPS, lr=1e-2):
    trainer = Trainer(model, method, params, loss=lm_loss,
                      optim=OptimConfig(lr=lr, warmup_ratio=0.0, schedule="constant"),
                      total_steps=steps, model_inputs=MODEL_INPUTS)
    state = trainer.init_state(KEY)
    losses = []
    for _ in range(steps):
        state, metrics = trainer.train_step(state, trainer.frozen, _batch())
        losses.append(float(metrics["loss"]))
    return trainer, state, losses


def _save_and_restore(tmp_path, trainer, state, params):
    manager = CheckpointManager(tmp_path)
    manager.save(STEPS, state, {"base_fingerprint": fingerprint(params)})
    restored, _ = manager.restore(trainer.init_state(jax.random.key(9)), fingerprint=fingerprint(params))
    manager.close()
    saved = P.flatten(jax.device_get(manager.read_state()["trainable"]["delta"]))
    assert saved.keys() == P.flatten(state.trainable["delta"]).keys()  # no frozen weight is saved
    return restored


def test_the_model_is_tunix_llama3_and_what_jpeft_can_adapt(llama3):
    model, params = llama3
    n = P.count_params(params)
    print(f"\ntunix Llama3 (tiny random config {CONFIG}): {n:,d} parameters")
    assert n == 2 * (32 * 4 * 8 * 2 + 32 * 2 * 8 * 2 + 3 * 32 * 64 + 2 * 32) + V * 32 * 2 + 32
    layers = model.info().layers
    want = {f"layers/{i}/mlp/{p}_proj": "dense" for i in range(2) for p in ("gate", "up", "down")}
    want.update({f"layers/{i}/attn/{p}_proj": "einsum" for i in range(2) for p in "qkvo"})
    want.update({"lm_head": "einsum", "embedder": "unsupported"})
    assert {p: s.kind for p, s in layers.items()} == want
    q = layers["layers/0/attn/q_proj"]  # 'BTD,DNH->BTNH': input group D, output group (N, H)
    assert (q.kernel, q.einsum, q.in_shape, q.out_shape) == ("w", "BTD,DNH->BTNH", (32,), (4, 8))
    # tunix's Embedder (a raw embedding table) is a class jpeft does not know: a pattern selecting
    # it is refused, naming the class and the line that would register it
    with pytest.raises(jpeft.core.layers.UnsupportedLayerError,
                       match=r"(?s)Embedder.*jpeft.register_layer\(tunix.models.llama3.model.Embedder"):
        jpeft.lora(jpeft.LoraConfig(targets=r"embedder$")).init(KEY, params, model.info())


@pytest.mark.parametrize("name", ["lora", "ia3"])
def test_train_merge_and_checkpoint(llama3, tmp_path, name):
    model, params = llama3
    method = {
        "lora": jpeft.lora(jpeft.LoraConfig(r=4, alpha=8.0, targets=f"{ATTN}|{MLP}")),
        "ia3": jpeft.ia3(jpeft.IA3Config(targets=r"attn/(k_proj|v_proj|o_proj)$|mlp/down_proj$",
                                         feedforward=r"(o_proj|down_proj)$")),
    }[name]
    inputs = _inputs()
    base = _logits(model, params, *inputs)
    fresh = _init(model, method, params)
    identity = _max_diff(_adapted(model, method, params, fresh, *inputs), base)
    print(f"\n{name}: fresh delta, max |adapted - base| = {identity:.3g}")
    np.testing.assert_allclose(_adapted(model, method, params, fresh, *inputs), base,
                               rtol=1e-5, atol=1e-5)

    trainer, state, losses = _train(model, method, params, lr=1e-2 if name == "lora" else 5e-2)
    delta_paths = {p.rsplit("/", 1)[0] for p in P.flatten(state.trainable["delta"])}
    assert {p for p in delta_paths if "/attn/" in p} == {
        f"layers/{i}/attn/{p}_proj" for i in range(2) for p in ("qkvo" if name == "lora" else "kvo")}
    print(f"{name}: {P.count_params(state.trainable['delta']):,d} trained parameters, "
          f"losses {[round(x, 4) for x in losses]}")
    assert losses[-1] < losses[0]

    delta = state.trainable["delta"]
    adapted = _adapted(model, method, params, delta, *inputs)
    assert _max_diff(adapted, base) > 1e-3  # training changed the function
    merged = jax.jit(lambda p, d: jpeft.merge(method, p, d, model.info()))(params, delta)
    merge_diff = _max_diff(_logits(model, merged, *inputs), adapted)
    print(f"{name}: max |merged - unmerged adapted| = {merge_diff:.3g} "
          f"(logits up to {float(jnp.abs(adapted).max()):.3g})")
    np.testing.assert_allclose(_logits(model, merged, *inputs), adapted, rtol=1e-4, atol=1e-4)

    restored = _save_and_restore(tmp_path, trainer, state, params)
    again = _adapted(model, method, params, restored.trainable["delta"], *inputs)
    ckpt_diff = _max_diff(again, adapted)
    print(f"{name}: Orbax save/restore, max |restored - trained| = {ckpt_diff:.3g}")
    np.testing.assert_array_equal(np.asarray(again), np.asarray(adapted))


# -- an adapter, through taps added to the model instance -------------------------------------------

class Tapped(nnx.Module):
    """Calls the wrapped sub-module, then a jpeft tap on its output (``index``: which element of
    a tuple output). The wrapped module keeps its parameters, under ``inner``."""

    def __init__(self, inner, kind: str, layer: int, index: int | None = None):
        self.inner = inner
        self.tap = jpeft.NnxTap(kind, layer=layer)
        self.index = index

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if self.index is None:
            return self.tap(out)
        out = list(out)
        out[self.index] = self.tap(out[self.index])
        return tuple(out)


def add_taps(module):
    """Houlsby's attachment points on tunix's Llama3: the attention output (``attn`` returns
    ``(cache, output)``) and the MLP output, both before the residual add."""
    for i, layer in enumerate(module.layers):
        layer.attn = Tapped(layer.attn, "attn.out", i, index=1)
        layer.mlp = Tapped(layer.mlp, "ffn.out", i)
    return module


def test_houlsby_adapter_through_taps_added_to_the_instance(llama3, tmp_path):
    _, plain_params = llama3
    inputs = _inputs()
    model, shapes = _build(*inputs, surgery=add_taps)
    assert model.info().taps == {"attn.out": 2, "ffn.out": 2} and model.info().hidden_size == 32
    # the same random weights as the plain model (their paths gain an `inner/`)
    params = P.unflatten({p: P.flatten(plain_params)[p.replace("/inner/", "/")] for p in P.flatten(shapes)})
    base = _logits(model, params, *inputs)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(_logits(llama3[0], plain_params, *inputs)))

    method = jpeft.houlsby(jpeft.AdapterConfig(size=8, activation="swish"))
    fresh = _init(model, method, params)
    identity = _max_diff(_adapted(model, method, params, fresh, *inputs), base)
    print(f"\nhoulsby: fresh delta, max |adapted - base| = {identity:.3g}")
    assert identity < 1e-5

    trainer, state, losses = _train(model, method, params)
    print(f"houlsby: {P.count_params(state.trainable['delta']):,d} trained parameters, "
          f"losses {[round(x, 4) for x in losses]}")
    assert losses[-1] < losses[0]
    adapted = _adapted(model, method, params, state.trainable["delta"], *inputs)
    assert _max_diff(adapted, base) > 1e-3
    assert method.merge is None  # adapters act on activations: nothing to merge

    restored = _save_and_restore(tmp_path, trainer, state, params)
    again = _adapted(model, method, params, restored.trainable["delta"], *inputs)
    print(f"houlsby: Orbax save/restore, max |restored - trained| = {_max_diff(again, adapted):.3g}")
    np.testing.assert_array_equal(np.asarray(again), np.asarray(adapted))
