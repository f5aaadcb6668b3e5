"""Pieces every model family shares: activations by Hugging Face name, config field filtering."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU as PyTorch writes it, ``x · (1 + erf(x/√2)) / 2``. Equal to
    ``jax.nn.gelu(x, approximate=False)`` (which goes through ``erfc``) within float32 rounding,
    and on XLA:CPU 2.5x faster forward: ``erf`` is one rational approximation, ``erfc`` two
    branches and a select."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(1.0 / np.sqrt(2.0))).astype(x.dtype))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_erf,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation a Hugging Face config names (``hidden_act`` / ``activation_function``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def check_overrides(cls: type, overrides: dict[str, Any]) -> None:
    """Refuse config overrides ``cls`` has no field for, naming the fields it has."""
    import difflib

    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(names))
    if not unknown:
        return
    hint = ""
    if {"num_labels", "head"} & set(unknown):
        hint = " (num_labels and head apply to BERT-family encoders; this is a decoder with its LM head)"
    close = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
    close_text = "; ".join(f"{k!r}: did you mean {v[0]!r}?" for k, v in close.items() if v)
    raise TypeError(f"{cls.__name__} has no field {', '.join(map(repr, unknown))}{hint}"
                    f"{'; ' + close_text if close_text else ''}; its fields: {', '.join(names)}")


def config_from_hf(cls: type, hf: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """``cls(**fields of hf that cls has, **overrides)``.

    ``dtype`` in a Hugging Face config is the storage dtype of the weights (``None`` in
    ``PretrainedConfig.to_dict()``): not inherited; the caller chooses jpeft's ``dtype``.
    """
    check_overrides(cls, overrides)
    names = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
    kwargs = {k: v for k, v in hf.items() if k in names}
    kwargs.update(overrides)
    return cls(**kwargs)


# config fields that are jpeft's compute settings, not part of a Hugging Face config.json
JPEFT_ONLY_FIELDS = frozenset({"dtype", "matmul_dtype", "remat"})


def config_to_hf(config: Any, architecture: str, renamed: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``transformers`` ``config.json`` for a decoder config whose fields carry Hugging Face's
    names (the inverse of :func:`config_from_hf`): every field but jpeft's compute settings,
    ``architectures``, float32 weights, and ``renamed`` (fields spelt otherwise there) on top."""
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
           if f.name not in JPEFT_ONLY_FIELDS}
    out.update(architectures=[architecture], dtype="float32", **(renamed or {}))
    return out


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x (…, K) · w (K, N) -> (…, N)`` as one 2-D GEMM ``(M, K)·(K, N)`` with ``M = ∏…``.

    Numerically the same product as ``x @ w``; what changes is the backward pass XLA:CPU
    compiles. Differentiating ``x @ w`` with a 3-D ``x (B, T, K)`` gives the weight gradient as
    a contraction of ``x`` and the cotangent ``g (B, T, N)`` over their two leading dimensions,
    and XLA:CPU first writes a transposed copy ``gᵀ (N, B·T)`` (a strided pass over the largest
    tensor of the layer, fused with whatever produced ``g``), then multiplies. On 2-D operands
    the transposed GEMM ``xᵀ·g`` runs on ``x`` and ``g`` as they are. On MiniLM's feed-forward
    block (batch 32 × 128, LoRA or full gradients) forward + backward ran 11-29% faster in
    an interleaved micro-benchmark on a 2-core Xeon."""
    out = x.reshape(-1, x.shape[-1]) @ w
    return out.reshape(*x.shape[:-1], w.shape[-1])


# ----------------------------------------------------------------------------------------------
# Mixed-precision matmuls: operands in a low-precision dtype, accumulation and result in float32.

MATMUL_DTYPES = (None, "bfloat16")


def check_matmul_dtype(matmul_dtype: str | None) -> None:
    if matmul_dtype not in MATMUL_DTYPES:
        raise ValueError(f"matmul_dtype={matmul_dtype!r}; choose one of {MATMUL_DTYPES} (None: "
                         "multiply in the operands' own dtype)")


def _einsum_operands(spec: str) -> tuple[str, str, str]:
    if "..." in spec:
        raise ValueError(f"mixed_einsum takes explicit indices, got {spec!r}")
    inputs, _, out = spec.replace(" ", "").partition("->")
    a, _, b = inputs.partition(",")
    if not out or not b or "," in b:
        raise ValueError(f"mixed_einsum takes 'A,B->C' with two operands and an output, got {spec!r}")
    for name, term, others in (("first", a, b + out), ("second", b, a + out), ("output", out, a + b)):
        missing = set(term) - set(others)
        if missing:
            raise ValueError(f"mixed_einsum {spec!r}: the {name} term's indices {sorted(missing)} appear "
                             "nowhere else; only matmul-like contractions are supported")
    return a, b, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def mixed_einsum(spec: str, a: jax.Array, b: jax.Array, operand_dtype: Any) -> jax.Array:
    """``einsum(spec, a, b)`` with both operands cast to ``operand_dtype`` (e.g. bfloat16) and the
    products accumulated and returned in float32, in the forward and in the backward pass.

    The backward pass casts the float32 cotangent ``g`` to ``operand_dtype`` too, so all three
    contractions (``C = A·B``, ``dA = g·Bᵀ``, ``dB = Aᵀ·g``) use the low-precision units (AMX
    on x86, tensor cores on GPU), as PyTorch's autocast does. The saved residuals are the
    low-precision operands. ``spec`` must be matmul-like (every index in at least two terms)."""
    return _canonical_einsum(spec, a.astype(operand_dtype), b.astype(operand_dtype))


def _canonical_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum(spec, a, b)`` in float32 as one (batched) GEMM ``(G,M,K)·(G,K,N)``: the operands are
    transposed and reshaped to that form first. XLA:CPU runs low-precision dots with float32
    results only in this form (other dimension layouts fall back to a path without bf16)."""
    ta, tb, tc = _einsum_operands(spec)
    size = {**dict(zip(ta, a.shape)), **dict(zip(tb, b.shape))}
    batch = [c for c in tc if c in ta and c in tb]
    rows = [c for c in tc if c in ta and c not in tb]
    cols = [c for c in tc if c in tb and c not in ta]
    inner = [c for c in ta if c in tb and c not in tc]
    prod = lambda cs: int(np.prod([size[c] for c in cs], dtype=np.int64))
    lead = (prod(batch),) if batch else ()
    a3 = jnp.transpose(a, [ta.index(c) for c in batch + rows + inner]).reshape(
        *lead, prod(rows), prod(inner))
    b3 = jnp.transpose(b, [tb.index(c) for c in batch + inner + cols]).reshape(
        *lead, prod(inner), prod(cols))
    dims = (((a3.ndim - 1,), (b3.ndim - 2,)), ((0,), (0,)) if batch else ((), ()))
    out = jax.lax.dot_general(a3, b3, dims, preferred_element_type=jnp.float32)
    out = out.reshape([size[c] for c in batch + rows + cols])
    return jnp.transpose(out, [(batch + rows + cols).index(c) for c in tc])


def _contract_last(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum(spec, a, b)``: as one ``dot_general`` on the operands as they are when both
    contract over their trailing dimensions with the batch dimensions leading (``g·Wᵀ`` in the
    backward pass of ``x·W``: XLA:CPU keeps such a low-precision dot), else as
    :func:`_canonical_einsum`."""
    ta, tb, tc = _einsum_operands(spec)
    batch = [c for c in tc if c in ta and c in tb]
    inner = [c for c in ta if c in tb and c not in tc]
    nb, nk = len(batch), len(inner)
    if (list(ta[:nb]) == batch and list(tb[:nb]) == batch and nk
            and list(ta[len(ta) - nk:]) == inner and list(tb[len(tb) - nk:]) == inner):
        dims = ((tuple(range(a.ndim - nk, a.ndim)), tuple(range(b.ndim - nk, b.ndim))),
                (tuple(range(nb)), tuple(range(nb))))
        out = jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
        natural = batch + [c for c in ta if c not in tb] + [c for c in tb if c not in ta]
        return jnp.transpose(out, [natural.index(c) for c in tc])
    return _canonical_einsum(spec, a, b)


def _mixed_einsum_fwd(spec, a, b, operand_dtype):
    a_low, b_low = a.astype(operand_dtype), b.astype(operand_dtype)
    out = _canonical_einsum(spec, a_low, b_low)
    return out, (a_low, b_low, jnp.zeros((), a.dtype), jnp.zeros((), b.dtype))


def _mixed_einsum_bwd(spec, operand_dtype, residuals, g):
    a_low, b_low, a_like, b_like = residuals
    ta, tb, tc = _einsum_operands(spec)
    g_low = g.astype(operand_dtype)
    da = _contract_last(f"{tc},{tb}->{ta}", g_low, b_low)
    db = _contract_last(f"{ta},{tc}->{tb}", a_low, g_low)
    return da.astype(a_like.dtype), db.astype(b_like.dtype)


mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def matmul_einsum(spec: str, a: jax.Array, b: jax.Array, matmul_dtype: str | None) -> jax.Array:
    """``einsum(spec, a, b)``; with ``matmul_dtype`` set, :func:`mixed_einsum` in that dtype and
    the result cast back to the operands' dtype (the model's compute dtype)."""
    if matmul_dtype is None:
        return jnp.einsum(spec, a, b)
    return mixed_einsum(spec, a, b, jnp.dtype(matmul_dtype)).astype(jnp.result_type(a, b))


@functools.lru_cache(maxsize=None)
def dense_dot_general(matmul_dtype: str | None) -> Callable[..., jax.Array]:
    """A ``dot_general`` for ``nn.Dense(dot_general=...)``: ``x (…,K) · W (K,N)`` as one 2-D GEMM
    (:func:`linear`), in float32, or in ``matmul_dtype`` by :func:`mixed_einsum` when set.
    Cached, so that equal configs give equal (hashable) module attributes."""
    check_matmul_dtype(matmul_dtype)

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
        if tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,) or lhs_batch or rhs_batch \
                or rhs.ndim != 2:
            raise ValueError(f"dense_dot_general supports Dense's x(...,K)·W(K,N) only, got {dimension_numbers}")
        if matmul_dtype is None:
            return linear(lhs, rhs)
        out = matmul_einsum("mk,kn->mn", lhs.reshape(-1, lhs.shape[-1]), rhs, matmul_dtype)
        return out.reshape(*lhs.shape[:-1], rhs.shape[-1])

    return dot_general
