"""A quantized frozen base (``jpeft.quant``): int8 per output channel, NF4 blocks of 64, NF4
with double-quantized scales (nf4-dq) and GGUF's Q4_1 (blocks of 32, affine, float16 scales).

Checked: the quantize→dequantize error stays within each format's bound (int8: half the
channel's scale; nf4: half the largest gap between adjacent levels times the block's absmax;
nf4-dq: that with the dequantized absmax plus the absmax's own int8 error; q4_1: half a step plus
the float16 rounding of its step and minimum); q4_1 equals the gguf package's Q4_1 bit for bit and
is idempotent on its own values (a Q4_1 file keeps its codes); NF4 picks the nearest
of the 16 QLoRA levels; nf4-dq keeps nf4's codes, stores the absmax as int8 in blocks of 256
around their mean, and takes 4.127 bits per weight (measured from the arrays' bytes); a model
over a quantized base computes what the same model over the dequantized float base computes
(same kernels, so equal up to float32 rounding), with a fresh and with a trained delta;
gradients reach only the delta and the trained head; LoRA over nf4-dq trains alike on a
data × fsdp mesh and on one device; merging is refused; each method that trains or rewrites
base weights is either handled (its leaves stay float) or refused with a message naming the fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from experiments.common import cast_frozen_base, check_base_dtype
from jpeft import quant as Q
from jpeft.core import paths as P
from jpeft.core.transform import ApplyContext, apply
from jpeft.methods import build
from jpeft.models.bert import BertConfig, BertModel, init_params
from jpeft.train.trainer import Trainer, trainable_base_paths
from tests.helpers import perturb, q4_1_blocks, tiny_batch, train_tiny

ROOT = Path(__file__).resolve().parents[1]


def _bert(seed: int = 0):
    """A tiny BERT whose kernels all fit NF4's blocks of 64 inputs."""
    config = BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=40,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertModel(config)
    return model, init_params(model, jax.random.key(seed))


def _inputs(batch):
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


@pytest.mark.parametrize("fmt", Q.FORMATS)
@pytest.mark.parametrize("shape", [(128, 96), (3, 64, 10)])
def test_error_within_the_format_bound(fmt, shape):
    w = jax.random.normal(jax.random.key(1), shape) * jnp.linspace(0.01, 2.0, shape[-1])
    w = w.at[..., :64, 0].set(0.0)  # an all-zero channel / block dequantizes to exactly 0
    q = Q.quantize(w, fmt)
    back = q.dequantize()
    assert back.shape == w.shape and q.shape == w.shape and back.dtype == w.dtype
    err = jnp.abs(back - w)
    assert bool((err <= Q.error_bound(q) * (1 + 1e-6) + 1e-12).all())
    assert float(jnp.abs(back[..., :64, 0]).max()) == 0.0
    # the bound is not vacuous: the error is a sizable part of it somewhere
    assert float((err / jnp.maximum(Q.error_bound(q), 1e-30)).max()) > 0.5


def test_int8_bound_is_half_the_channel_scale_and_codes_are_symmetric():
    w = jax.random.normal(jax.random.key(2), (64, 8))
    q = Q.quantize(w, "int8")
    assert q.codes.dtype == jnp.int8 and q.scales.shape == (1, 8)
    np.testing.assert_allclose(q.scales[0], jnp.abs(w).max(0) / 127, rtol=1e-6)
    assert int(jnp.abs(q.codes.astype(jnp.int32)).max()) == 127
    np.testing.assert_allclose(Q.error_bound(q), jnp.broadcast_to(q.scales / 2, w.shape))


def test_nf4_uses_the_qlora_levels_nearest_code_and_packs_two_per_byte():
    levels = Q.NF4_LEVELS
    assert levels.shape == (16,) and levels[0] == -1.0 and levels[7] == 0.0 and levels[-1] == 1.0
    assert (np.diff(levels) > 0).all()
    w = jax.random.normal(jax.random.key(3), (128, 6))
    q = Q.quantize(w, "nf4")
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (128, 3) and q.scales.shape == (2, 6)
    np.testing.assert_allclose(q.scales, jnp.abs(w.reshape(2, 64, 6)).max(1), rtol=1e-6)
    normed = np.asarray(w.reshape(2, 64, 6) / q.scales[:, None, :]).reshape(128, 6)
    nearest = np.abs(normed[..., None] - levels).argmin(-1)
    unpacked = np.stack([np.asarray(q.codes) >> 4, np.asarray(q.codes) & 0xF], -1).reshape(128, 6)
    np.testing.assert_array_equal(unpacked, nearest)
    assert Q.NF4_MAX_GAP == pytest.approx(float(np.max(np.diff(levels))))
    # storage: 4 bits per weight plus one float32 absmax per 64 weights
    assert P.nbytes(q) * 8 / w.size == pytest.approx(4 + 32 / 64)


def test_nf4_dq_quantizes_the_absmax_to_int8_in_blocks_of_256_around_their_mean():
    w = jax.random.normal(jax.random.key(6), (1024, 256)) * jnp.linspace(0.01, 2.0, 256)
    nf4, dq = Q.quantize(w, "nf4"), Q.quantize(w, "nf4-dq")
    np.testing.assert_array_equal(dq.codes, nf4.codes)  # the 4-bit codes come from the float absmax
    s = dq.scales
    assert isinstance(s, Q.QuantizedScales) and dq.shape == w.shape
    assert s.codes.dtype == jnp.int8 and s.codes.shape == (16, 256)
    assert s.scales.dtype == s.mean.dtype == jnp.float32
    assert s.scales.shape == (16,) and s.mean.shape == (1, 1)
    # reference in NumPy: centred absmax in (out, in) order, blocks of 256, absmax / 127 each
    absmax = np.asarray(nf4.scales)
    np.testing.assert_allclose(s.mean[0, 0], absmax.mean(), rtol=1e-6)
    blocks = (absmax - absmax.mean()).T.reshape(16, 256)
    step = np.abs(blocks).max(1) / 127
    np.testing.assert_allclose(s.scales, step, rtol=1e-6)
    codes = np.round(blocks / step[:, None]).reshape(256, 16).T
    assert np.abs(np.asarray(s.codes, np.float64) - codes).max() <= 1  # ties may round either way
    assert int(np.abs(np.asarray(s.codes, np.int32)).max()) == 127
    # |a_b - â_b| ≤ t_j / 2, and the bound is reached closely somewhere
    err = np.abs(np.asarray(Q.block_scales(dq)) - absmax).T.reshape(16, 256)
    assert (err <= step[:, None] / 2 * (1 + 1e-5) + 1e-7).all() and (err / (step[:, None] / 2)).max() > 0.9
    # the absmax's own error counts: nf4's bound with â_b in place of a_b is exceeded, dq's is not
    werr = jnp.abs(dq.dequantize() - w)
    assert float((werr / jnp.repeat(Q.block_scales(dq) * (Q.NF4_MAX_GAP / 2), 64, axis=0)).max()) > 1.5
    assert bool((werr <= Q.error_bound(dq) * (1 + 1e-6)).all())
    # storage, from the arrays' bytes: 4 + 8/64 + 32/(64·256) bits per weight (QLoRA §3) and μ
    assert P.nbytes(dq) * 8 / w.size == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / w.size)
    assert P.nbytes(dq) * 8 / w.size == pytest.approx(4.127, abs=5e-4)
    assert P.nbytes(nf4) * 8 / w.size == 4.5


def test_nf4_dq_blocks_of_256_may_end_partial():
    w = jax.random.normal(jax.random.key(7), (2, 192, 150))  # 2 kernels of 3 × 150 = 450 scales
    q = Q.quantize(w, "nf4-dq")
    assert q.scales.codes.shape == (2, 3, 150) and q.scales.scales.shape == (2, 2)
    assert q.scales.mean.shape == (2, 1, 1)
    assert bool((jnp.abs(q.dequantize() - w) <= Q.error_bound(q) * (1 + 1e-6) + 1e-12).all())
    np.testing.assert_allclose(jax.jit(Q.dequantize)(q), q.dequantize(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", Q.PACKED_FORMATS)
def test_4_bit_formats_refuse_a_kernel_that_does_not_fit_the_blocks(fmt):
    block = Q.block_size(fmt)
    with pytest.raises(ValueError, match=f"{fmt} needs .* multiple of {block}"):
        Q.quantize(jnp.ones((block + 16, 8)), fmt)
    with pytest.raises(ValueError, match="output axis is even"):
        Q.quantize(jnp.ones((block, 7)), fmt)
    with pytest.raises(ValueError, match="choose one of int8, nf4, nf4-dq, q4_1"):
        Q.quantize(jnp.ones((64, 8)), "int4")


def _gguf_q4_1(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``gguf`` package's own Q4_1 of a kernel ``(K, N)`` (GGUF rows are outputs): its
    dequantized kernel, and per block (in our ``(K/32, N)`` layout) the codes, ``d`` and ``m``
    read from the bytes of ``block_q4_1 {f16 d; f16 m; u8 qs[16]}``."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize, quantize

    kind = gguf.GGMLQuantizationType.Q4_1
    rows = np.ascontiguousarray(w.T, np.float32)  # (N, K)
    raw = quantize(rows, kind)
    return (dequantize(raw, kind).T, *q4_1_blocks(raw))


def test_q4_1_is_ggml_s_q4_1_bit_for_bit():
    w = np.array(jax.random.normal(jax.random.key(8), (128, 10)) * jnp.linspace(0.01, 3.0, 10))
    w[:32, 0] = 0.5  # a constant block: step 0, every code 0
    q = Q.quantize(jnp.asarray(w), "q4_1")
    want, codes, d, m = _gguf_q4_1(w)
    assert isinstance(q.scales, Q.AffineScales) and q.scales.step.dtype == jnp.float16
    assert q.codes.shape == (128, 5) and q.scales.step.shape == q.scales.offset.shape == (4, 10)
    np.testing.assert_array_equal(np.asarray(Q._unpack(q.codes)), codes)
    np.testing.assert_array_equal(np.asarray(q.scales.step), d)
    np.testing.assert_array_equal(np.asarray(q.scales.offset), m)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), want)
    assert float(q.scales.step[0, 0]) == 0.0 and bool((q.dequantize()[:32, 0] == 0.5).all())
    # storage: 4 bits per weight plus a float16 step and minimum per 32 weights
    assert P.nbytes(q) * 8 / w.size == 5.0


def test_q4_1_gives_back_its_own_codes_from_its_dequantized_weights():
    """Quantizing a Q4_1 kernel's float values again is the identity: a GGUF Q4_1 model loaded
    as floats becomes the file's own Q4_1 base, with no second rounding."""
    w = jax.random.normal(jax.random.key(9), (2, 128, 12)) * 0.05
    q = Q.quantize(w, "q4_1")
    again = Q.quantize(q.dequantize(), "q4_1")
    for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # nf4 over those values rounds a second time (the loss q4_1 avoids)
    assert float(jnp.abs(Q.quantize(q.dequantize(), "nf4").dequantize() - q.dequantize()).max()) > 1e-3


@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_quantized_base_computes_as_its_dequantized_float_base(fmt):
    model, params = _bert()
    method = build("lora")
    keep = trainable_base_paths(method, params, model.info())
    qbase = jpeft.quantize_base(params, fmt, keep=keep, transform=method, info=model.info())
    quantized = Q.quantized_paths(qbase)
    # every encoder/pooler kernel is quantized; embeddings, norms, biases, the head are not
    kernels = [p for p in P.paths(params) if p.endswith("/kernel") and p not in keep]
    assert len(kernels) == 13 and any(p.startswith("head/") for p in keep)
    assert sorted(quantized) == sorted(kernels)
    assert all(not Q.is_quantized(v) for p, v in P.flatten(qbase).items() if not p.endswith("kernel"))
    floats = jpeft.dequantize_base(qbase)
    batch = tiny_batch(seed=4)
    delta = method.init(jax.random.key(0), params, model.info())
    for d in (delta, perturb(delta, seed=5, scale=0.3)):
        got = jax.jit(lambda b, d: apply(model, method, b, d, *_inputs(batch)))(qbase, d)
        want = apply(model, method, floats, d, *_inputs(batch))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and the quantized model is not the float one: the comparison above could fail
    plain = apply(model, method, params, delta, *_inputs(batch))
    assert float(jnp.abs(plain - apply(model, method, floats, delta, *_inputs(batch))).max()) > 0


@pytest.mark.parametrize("fmt", Q.NF4_FORMATS)
def test_gradients_reach_only_the_delta_and_the_head(fmt):
    model, params = _bert()
    method = build("lora")
    keep = trainable_base_paths(method, params, model.info())
    qbase = jpeft.quantize_base(params, fmt, keep=keep, transform=method, info=model.info())
    trainer = Trainer(model, method, qbase, total_steps=4)
    assert set(trainer.base_trainable_paths) == set(keep)
    assert all(Q.is_quantized(trainer.frozen[p]) for p in Q.quantized_paths(qbase))
    state = trainer.init_state(jax.random.key(0))
    batch = tiny_batch(batch=4, seed=2)
    grads = jax.grad(lambda t: trainer._loss(t, trainer.frozen, batch, jax.random.key(1))[0])(state.trainable)
    assert set(P.flatten(grads["base"])) == set(keep)  # the head only: no base kernel
    lora_b = [v for p, v in P.flatten(grads["delta"]).items() if p.endswith("lora_B")]
    assert lora_b and all(float(jnp.abs(g).max()) > 0 for g in lora_b)
    frozen_before = jax.tree_util.tree_map(np.asarray, trainer.frozen)
    state, _ = trainer.train_step(state, trainer.frozen, batch)
    jax.tree_util.tree_map(np.testing.assert_array_equal, frozen_before,
                           jax.tree_util.tree_map(np.asarray, trainer.frozen))


MESH_SCRIPT = textwrap.dedent("""
    import json
    import jax
    from jpeft import quant as Q
    from jpeft.methods import build
    from jpeft.train.trainer import trainable_base_paths
    from tests.helpers import mesh_train_losses, tiny_bert
    model, params = tiny_bert(hidden=64, heads=4, layers=1)
    method = build("lora")
    keep = trainable_base_paths(method, params, model.info())
    qbase = Q.quantize_base(params, "nf4-dq", keep=keep, transform=method, info=model.info())
    out = {}
    for spec in ("data=2,fsdp=4", "data=1,fsdp=1"):
        trainer, _, losses = mesh_train_losses(model, method, qbase, spec, steps=2)
        q = trainer.frozen["encoder/layer_0/attention/self/query/kernel"]
        split = [x.sharding.shard_shape(x.shape) != x.shape for x in jax.tree_util.tree_leaves(q)]
        out[spec] = {"losses": losses, "format": q.format, "split": split}
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_lora_over_an_nf4_dq_base_trains_alike_on_an_fsdp_mesh():
    """8 forced CPU devices in a subprocess: the quantized leaves (codes, int8 scale codes) are
    split over fsdp like any leaf; the losses match the one-device run."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))[len("RESULT"):])
    mesh, one = out["data=2,fsdp=4"], out["data=1,fsdp=1"]
    assert mesh["format"] == "nf4-dq"
    # leaves: 4-bit codes, int8 scale codes (both split), block steps and mean (small: replicated)
    assert mesh["split"] == [True, True, False, False] and not any(one["split"])
    np.testing.assert_allclose(mesh["losses"], one["losses"], atol=2e-5, rtol=0)
    assert mesh["losses"][1] != mesh["losses"][0]


@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_lora_trains_on_a_quantized_base(fmt):
    model, params = _bert()
    method = build("lora")
    qbase = jpeft.quantize_base(params, fmt, keep=trainable_base_paths(method, params, model.info()),
                                transform=method, info=model.info())
    train_tiny(model, method, qbase, steps=8)


@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_merge_into_a_quantized_base_is_refused(fmt):
    model, params = _bert()
    method = build("lora")
    qbase = jpeft.quantize_base(params, fmt, transform=method, info=model.info())
    delta = perturb(method.init(jax.random.key(0), params, model.info()))
    with pytest.raises(jpeft.QuantizedBaseError, match="Merge into the float base"):
        jpeft.merge(method, qbase, delta, model.info())
    merged = jpeft.merge(method, jpeft.dequantize_base(qbase), delta, model.info())  # the fix works
    assert not Q.has_quantized(merged)


def test_bitfit_trains_float_biases_over_quantized_kernels():
    model, params = _bert()
    method = build("bitfit")
    keep = trainable_base_paths(method, params, model.info())
    qbase = cast_frozen_base(params, keep, "nf4", method, model.info())
    assert len(Q.quantized_paths(qbase)) == 13  # 2 layers × 6 kernels + the pooler
    train_tiny(model, method, qbase, steps=8)


def test_freeze_keeps_its_trained_layers_float_and_quantizes_the_rest():
    model, params = _bert()
    method = build("freeze", {"freeze": jpeft.FreezeConfig(top=1)})
    qbase = cast_frozen_base(params, trainable_base_paths(method, params, model.info()), "int8",
                             method, model.info())
    quantized = Q.quantized_paths(qbase)
    assert quantized and all("layer_0/" in p for p in quantized)  # layer 1 and the pooler: float
    train_tiny(model, method, qbase, steps=8, lr=1e-3)


@pytest.mark.parametrize("name,fmt", [("full", "nf4"), ("diff_pruning", "nf4"), ("full", "nf4-dq")])
def test_methods_that_train_every_weight_are_refused(name, fmt):
    model, params = _bert()
    method = build(name)
    keep = trainable_base_paths(method, params, model.info())
    with pytest.raises(ValueError, match=rf"'{name}' trains or rewrites all 14 .*--base-dtype=float32"):
        cast_frozen_base(params, keep, fmt, method, model.info())


def test_a_rewrite_missed_by_quantize_base_fails_clearly():
    model, params = _bert()
    method = build("diff_pruning")
    qbase = jpeft.quantize_base(params, "int8")  # no transform given: its rewrite is not known
    delta = method.init(jax.random.key(0), params, model.info())
    with pytest.raises(jpeft.QuantizedBaseError, match="rewrites or reads base weights needs a float base"):
        apply(model, method, qbase, delta, *_inputs(tiny_batch()), ctx=ApplyContext())


def test_llama_quantized_matches_dequantized_with_bf16_matmuls():
    from jpeft.models import llama

    model = llama.LlamaForCausalLM(llama.LlamaConfig(
        vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, matmul_dtype="bfloat16"))
    params = llama.init_params(model, jax.random.key(0))
    method = jpeft.lora(jpeft.LoraConfig(targets="(q_proj|v_proj)$"))
    qbase = jpeft.quantize_base(params, "nf4", transform=method, info=model.info())
    assert "lm_head/kernel" in P.flatten(qbase) and not Q.is_quantized(P.flatten(qbase)["lm_head/kernel"])
    assert len(Q.quantized_paths(qbase)) == 14
    delta = perturb(method.init(jax.random.key(0), params, model.info()), scale=0.3)
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 32
    got = apply(model, method, qbase, delta, ids)
    want = apply(model, method, jpeft.dequantize_base(qbase), delta, ids)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_base_dtype_flag_names_the_formats():
    check_base_dtype("nf4")
    check_base_dtype("nf4-dq")
    check_base_dtype("q4_1")
    with pytest.raises(ValueError, match="float32, bfloat16, int8, nf4, nf4-dq, q4_1$"):
        check_base_dtype("int4")


def test_fingerprint_of_a_quantized_base_is_stable():
    from jpeft.checkpoint.orbax_ckpt import fingerprint

    model, params = _bert()
    a, b, dq = (jpeft.quantize_base(params, fmt) for fmt in ("nf4", "nf4", "nf4-dq"))
    assert fingerprint(a) == fingerprint(b) != fingerprint(params)
    assert fingerprint(dq) not in (fingerprint(a), fingerprint(params))


def test_counts_and_dora_see_the_weight_a_quantized_kernel_stands_for():
    """A quantized kernel counts as its dequantized shape, and DoRA (whose init and hook read the
    kernel) trains on a quantized base: a fresh DoRA delta leaves the quantized model as it is."""
    model, params = _bert()
    method = jpeft.lora(jpeft.LoraConfig(r=2, use_dora=True))
    keep = trainable_base_paths(method, params, model.info())
    qbase = jpeft.quantize_base(params, "nf4", keep=keep, transform=method, info=model.info())
    assert P.count_params(qbase) == P.count_params(params)
    delta = method.init(jax.random.key(1), qbase, model.info())
    batch = _inputs(tiny_batch(seed=4))
    plain = model.apply({"params": jpeft.dequantize_base(qbase)}, *batch)
    np.testing.assert_allclose(apply(model, method, qbase, delta, *batch), plain, rtol=1e-5, atol=1e-5)
    moved = perturb(delta, seed=2, scale=0.3)
    assert float(jnp.abs(apply(model, method, qbase, moved, *batch) - plain).max()) > 1e-4
