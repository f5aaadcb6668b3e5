"""Models jpeft did not write, in the idioms of Flax's own examples: a small MLP with
``DenseGeneral``/``Einsum``, a conv net, and one transformer written twice, in Linen (``nn.scan``
over layers) and in NNX (``nnx.vmap``-made layers run by ``nnx.scan``), with shared weights and
jpeft taps inside the scan bodies (the layer number is the scanned ``jnp.arange``); the Linen
one also unrolled (a Python loop, static layer numbers) as a reference. Also layers of classes
jpeft does not know (a dense with its own call, a raw ``w`` fed to ``jnp.einsum``)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

D, H, DH, F, V, LAYERS = 16, 2, 8, 32, 50, 3


class LinenMLP(nn.Module):
    """The model of the issue: Dense, DenseGeneral, Einsum."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, name="fc1")(x))
        x = nn.DenseGeneral((2, 8), name="proj")(x)
        return nn.Einsum((2, 8, 4), "bhd,hdo->bo", name="ein")(x)


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.proj = nnx.LinearGeneral(16, (2, 8), rngs=rngs)
        self.ein = nnx.Einsum("bhd,hdo->bo", (2, 8, 4), (4,), rngs=rngs)

    def __call__(self, x):
        return self.ein(self.proj(nnx.relu(self.fc1(x))))


class LinenConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), padding="SAME", name="conv1")(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), padding="VALID", name="conv2")(x))
        x = nn.Conv(4, (1, 1), name="pointwise")(x)
        return x.mean(axis=(1, 2))


class NnxConvNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 6, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(6, 8, (3, 3), strides=(2, 2), padding="VALID", rngs=rngs)
        self.pointwise = nnx.Conv(8, 4, (1, 1), rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        return self.pointwise(x).mean(axis=(1, 2))


def attention(q, k, v):
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(DH)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


class LinenBlock(nn.Module):
    """One layer; ``i`` is its number (traced inside ``nn.scan``, an int when unrolled)."""

    @nn.compact
    def __call__(self, x, i):
        from jpeft import Tap

        h = nn.LayerNorm(name="ln1")(x)
        q = nn.DenseGeneral((H, DH), name="query")(h)
        k = nn.DenseGeneral((H, DH), name="key")(h)
        v = nn.DenseGeneral((H, DH), name="value")(h)
        k, v, kv_mask = Tap("attn.kv", layer=i)(k, v, jnp.ones(x.shape[:2], jnp.int32))
        o = nn.DenseGeneral(D, axis=(-2, -1), name="out")(masked_attention(q, k, v, kv_mask))
        x = x + Tap("attn.out", layer=i)(o)
        h = nn.LayerNorm(name="ln2")(x)
        h = nn.Einsum((D, F), "btd,df->btf", name="up")(h)
        x = x + Tap("ffn.out", layer=i)(nn.Dense(D, name="down")(nn.gelu(h)))
        return x, x


def _embed_tapped(x):
    from jpeft import Tap

    mask = jnp.ones(x.shape[:2], jnp.int32)
    return Tap("embed.inputs")(x, mask, jnp.zeros_like(mask))[0]


class LinenTransformer(nn.Module):
    """``per_layer``: also return every layer's output ``(LAYERS, B, T, D)``."""

    per_layer: bool = False
    unrolled: bool = False

    @nn.compact
    def __call__(self, ids):
        x = _embed_tapped(nn.Embed(V, D, name="embed")(ids))
        if self.unrolled:  # params layers_0, layers_1, ... (see unstack)
            hs = []
            for i in range(LAYERS):
                x, h = LinenBlock(name=f"layers_{i}")(x, i)
                hs.append(h)
            hs = jnp.stack(hs)
        else:
            blocks = nn.scan(LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                             length=LAYERS)
            x, hs = blocks(name="layers")(x, jnp.arange(LAYERS))
        out = nn.Dense(2, name="head")(nn.LayerNorm(name="ln_f")(x)[:, 0])
        return (out, hs) if self.per_layer else out


def unstack(params):
    """The scanned transformer's parameters for ``LinenTransformer(unrolled=True)``."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(LAYERS):
        out[f"layers_{i}"] = jax.tree_util.tree_map(lambda a: a[i], params["layers"])
    return out


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.query = nnx.LinearGeneral(D, (H, DH), rngs=rngs)
        self.key = nnx.LinearGeneral(D, (H, DH), rngs=rngs)
        self.value = nnx.LinearGeneral(D, (H, DH), rngs=rngs)
        self.out = nnx.LinearGeneral((H, DH), D, axis=(-2, -1), rngs=rngs)
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.up = nnx.Einsum("btd,df->btf", (D, F), (F,), rngs=rngs)
        self.down = nnx.Linear(F, D, rngs=rngs)

    def __call__(self, x, i):
        from jpeft import NnxTap

        h = self.ln1(x)
        k, v, kv_mask = NnxTap("attn.kv", layer=i)(self.key(h), self.value(h),
                                                    jnp.ones(x.shape[:2], jnp.int32))
        o = self.out(masked_attention(self.query(h), k, v, kv_mask))
        x = x + NnxTap("attn.out", layer=i)(o)
        return x + NnxTap("ffn.out", layer=i)(self.down(nnx.gelu(self.up(self.ln2(x)))))


class NnxTransformer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, per_layer: bool = False):
        self.per_layer = per_layer
        self.embed = nnx.Embed(V, D, rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NnxBlock(rngs)

        self.layers = make(rngs)
        self.ln_f = nnx.LayerNorm(D, rngs=rngs)
        self.head = nnx.Linear(D, 2, rngs=rngs)

    def __call__(self, ids):
        from jpeft import NnxTap

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
        def run(x, block, i):
            x = block(x, i)
            return x, x

        x = self.embed(ids)
        mask = jnp.ones(x.shape[:2], jnp.int32)
        x = NnxTap("embed.inputs")(x, mask, jnp.zeros_like(mask))[0]
        x, hs = run(x, self.layers, jnp.arange(LAYERS))
        out = self.head(self.ln_f(x)[:, 0])
        return (out, hs) if self.per_layer else out


def linen_transformer(seed: int = 0):
    model = LinenTransformer()
    ids = jax.random.randint(jax.random.key(seed + 1), (2, 5), 0, V)
    return model, model.init(jax.random.key(seed), ids)["params"], ids


def transformer_twins():
    """``(linen, nnx_model, params, ids)``: the scanned transformer described in Linen and in NNX
    (the task head ``head/``), both run with the Linen parameters."""
    import jpeft

    module, params, ids = linen_transformer()
    linen = jpeft.from_linen(module, params, ids, head_patterns=("^head/",))
    nnx_model, _ = jpeft.from_nnx(NnxTransformer(nnx.Rngs(0)), head_patterns=("^head/",))
    return linen, nnx_model, params, ids


# -- a small encoder with jpeft's taps (one call per attachment point), in Linen and in NNX ------

def masked_attention(q, k, v, kv_mask):
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(DH)
    scores = jnp.where(kv_mask[:, None, None, :] > 0, scores, -1e9)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


class LinenTappedBlock(nn.Module):
    index: int

    @nn.compact
    def __call__(self, x, mask):
        from jpeft import Tap

        b, t, _ = x.shape
        heads = lambda y: y.reshape(b, -1, H, DH)
        q = heads(nn.Dense(D, name="query")(x))
        k, v, kv_mask = Tap("attn.kv", layer=self.index)(heads(nn.Dense(D, name="key")(x)),
                                                         heads(nn.Dense(D, name="value")(x)), mask)
        o = nn.Dense(D, name="out")(masked_attention(q, k, v, kv_mask).reshape(b, t, D))
        x = nn.LayerNorm(name="ln1")(x + Tap("attn.out", layer=self.index)(o))
        h = Tap("ffn.hidden", layer=self.index)(nn.gelu(nn.Dense(F, name="up")(x)))
        o = Tap("ffn.out", layer=self.index)(nn.Dense(D, name="down")(h))
        return nn.LayerNorm(name="ln2")(x + o)


class LinenTapped(nn.Module):
    @nn.compact
    def __call__(self, ids, mask):
        from jpeft import Tap

        x = nn.Embed(V, D, name="embed")(ids)
        x, mask, _ = Tap("embed.inputs")(x, mask, jnp.zeros_like(mask))
        x = x + nn.Embed(16, D, name="pos")(jnp.arange(x.shape[1]))
        for i in range(2):
            x = LinenTappedBlock(i, name=f"layers_{i}")(x, mask)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return nn.Dense(2, name="head")(pooled)


class NnxTappedBlock(nnx.Module):
    def __init__(self, index: int, rngs: nnx.Rngs):
        from jpeft import NnxTap

        self.query, self.key, self.value, self.out = (nnx.Linear(D, D, rngs=rngs) for _ in range(4))
        self.up, self.down = nnx.Linear(D, F, rngs=rngs), nnx.Linear(F, D, rngs=rngs)
        self.ln1, self.ln2 = nnx.LayerNorm(D, rngs=rngs), nnx.LayerNorm(D, rngs=rngs)
        self.kv_tap, self.attn_tap = NnxTap("attn.kv", index), NnxTap("attn.out", index)
        self.hidden_tap, self.ffn_tap = NnxTap("ffn.hidden", index), NnxTap("ffn.out", index)

    def __call__(self, x, mask):
        b, t, _ = x.shape
        heads = lambda y: y.reshape(b, -1, H, DH)
        k, v, kv_mask = self.kv_tap(heads(self.key(x)), heads(self.value(x)), mask)
        o = self.out(masked_attention(heads(self.query(x)), k, v, kv_mask).reshape(b, t, D))
        x = self.ln1(x + self.attn_tap(o))
        h = self.hidden_tap(nnx.gelu(self.up(x)))
        return self.ln2(x + self.ffn_tap(self.down(h)))


class NnxTapped(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        from jpeft import NnxTap

        self.embed, self.pos = nnx.Embed(V, D, rngs=rngs), nnx.Embed(16, D, rngs=rngs)
        self.embed_tap = NnxTap("embed.inputs")
        self.layers_0, self.layers_1 = NnxTappedBlock(0, rngs), NnxTappedBlock(1, rngs)
        self.head = nnx.Linear(D, 2, rngs=rngs)

    def __call__(self, ids, mask):
        x, mask, _ = self.embed_tap(self.embed(ids), mask, jnp.zeros_like(mask))
        x = x + self.pos(jnp.arange(x.shape[1]))
        x = self.layers_1(self.layers_0(x, mask), mask)
        return self.head((x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True))


# -- layers of classes jpeft does not ship (registered with jpeft.register_layer) -----------------

class LinenOwnDense(nn.Module):
    """A dense layer with its own call: ``x @ kernel + bias``."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.normal(0.1), (self.features,))
        return jnp.dot(x, kernel) + bias


class LinenRawEinsum(nn.Module):
    """Like Google tunix's ``Einsum``: a raw parameter ``w`` and ``jnp.einsum``."""

    einsum_str: str
    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        return jnp.einsum(self.einsum_str, x, self.param("w", nn.initializers.normal(0.3), self.shape))


class LinenCustom(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(LinenOwnDense(16, name="fc")(x))
        h = LinenRawEinsum("bd,dnk->bnk", (16, 2, 4), name="proj")(h)
        return LinenRawEinsum("bnk,nko->bo", (2, 4, 3), name="out")(h)


class NnxOwnDense(nnx.Module):
    def __init__(self, d_in: int, d_out: int, rngs: nnx.Rngs):
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (d_in, d_out)))
        self.bias = nnx.Param(0.1 * jax.random.normal(rngs.params(), (d_out,)))

    def __call__(self, x):
        return jnp.dot(x, self.kernel.get_value()) + self.bias.get_value()


class NnxRawEinsum(nnx.Module):
    def __init__(self, einsum_str: str, shape: tuple[int, ...], rngs: nnx.Rngs):
        self.einsum_str = einsum_str
        self.w = nnx.Param(0.3 * jax.random.normal(rngs.params(), shape))

    def __call__(self, x):
        return jnp.einsum(self.einsum_str, x, self.w.get_value())


class NnxCustom(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc = NnxOwnDense(8, 16, rngs)
        self.proj = NnxRawEinsum("bd,dnk->bnk", (16, 2, 4), rngs)
        self.out = NnxRawEinsum("bnk,nko->bo", (2, 4, 3), rngs)

    def __call__(self, x):
        return self.out(self.proj(nnx.relu(self.fc(x))))


def register_custom_layers() -> None:
    """The registrations the custom models need (idempotent)."""
    import jpeft

    for own, raw in ((LinenOwnDense, LinenRawEinsum), (NnxOwnDense, NnxRawEinsum)):
        jpeft.register_layer(own, kind="dense", kernel="kernel", bias="bias")
        jpeft.register_layer(raw, kind="einsum", kernel="w", equation="einsum_str")
