"""Tiny models and batches shared by the unit tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.models.bert import BertConfig, BertModel, init_params


def tiny_bert(num_labels: int = 2, model_type: str = "bert", seed: int = 0, layers: int = 2,
              hidden: int = 16, heads: int = 2, dropout: float = 0.0):
    """A randomly initialised tiny BERT/RoBERTa ``(model, params)``."""
    config = BertConfig(
        vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=24, max_position_embeddings=40, type_vocab_size=2 if model_type == "bert" else 1,
        pad_token_id=0 if model_type == "bert" else 1, model_type=model_type, num_labels=num_labels,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    model = BertModel(config)
    return model, init_params(model, jax.random.key(seed))


def tiny_batch(batch: int = 3, length: int = 7, seed: int = 0, vocab: int = 64, num_labels: int = 2):
    """Random ids with padding at the end of every row but the first."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, (batch, length))
    lengths = np.maximum(length - np.arange(batch), 2)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    labels = rng.integers(0, max(num_labels, 2), batch) if num_labels > 1 else rng.normal(size=batch)
    return {
        "input_ids": jnp.asarray(ids * mask, jnp.int32),
        "attention_mask": jnp.asarray(mask),
        "token_type_ids": jnp.zeros((batch, length), jnp.int32),
        "labels": jnp.asarray(labels),
        "weights": jnp.ones((batch,), jnp.float32),
    }


def perturb(tree, seed: int = 1, scale: float = 0.1):
    """Every leaf plus Gaussian noise (a non-trivial delta; B != 0 for LoRA)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, noisy)


def train_tiny(model, transform, params, steps: int = 8, lr: float = 2e-2):
    """``steps`` constant-lr steps on one fixed tiny batch: ``(state, losses)``; asserts that the
    losses are finite and fall by more than 0.05."""
    from jpeft.train.optim import OptimConfig
    from jpeft.train.trainer import Trainer

    trainer = Trainer(model, transform, params, total_steps=steps,
                      optim=OptimConfig(lr=lr, warmup_ratio=0.0, schedule="constant"))
    state = trainer.init_state(jax.random.key(0))
    batch = tiny_batch(batch=8, seed=2)
    losses = []
    for _ in range(steps):
        state, metrics = trainer.train_step(state, trainer.frozen, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 0.05, losses
    return state, losses


def mesh_train_losses(model, method, params, mesh_spec: str, steps: int):
    """``(trainer, state, losses)`` after ``steps`` train steps on tiny batches of 8 under
    ``mesh_spec`` (``"data=1,fsdp=1"``: one device)."""
    from jpeft.train.sharding import make_mesh
    from jpeft.train.trainer import Trainer

    devices = jax.devices()[:1] if mesh_spec == "data=1,fsdp=1" else None
    trainer = Trainer(model, method, params, total_steps=4, mesh=make_mesh(mesh_spec, devices),
                      min_shard_size=16)
    state = trainer.init_state(jax.random.key(0))
    losses = []
    for i in range(steps):
        batch = trainer.shard_batch(dict(tiny_batch(batch=8, seed=i)))
        state, metrics = trainer.train_step(state, trainer.frozen, batch)
        losses.append(float(metrics["loss"]))
    return trainer, state, losses


def q4_1_blocks(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF Q4_1 bytes ``(N rows, K/32 · 20)`` (``block_q4_1 {f16 d; f16 m; u8 qs[16]}`` per 32
    inputs, input ``j`` in the low nibble of ``qs[j]``, ``j + 16`` in the high one) as jpeft's
    kernel layout: codes ``(K, N)``, ``d`` and ``m`` ``(K/32, N)``."""
    blocks = np.asarray(raw).reshape(raw.shape[0], -1, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].T
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].T
    qs = blocks[..., 4:]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(raw.shape[0], -1).T
    return codes, d, m


def minilm_trainable_counts(minilm_dir, method, peft_config) -> tuple[int, int]:
    """``(jpeft's, PEFT's)`` trainable parameter counts of ``method`` / ``peft_config`` (a PEFT
    config for ``SEQ_CLS``) on all-MiniLM-L6-v2 with a 2-class head."""
    import torch
    from transformers import BertForSequenceClassification

    from jpeft.models.bert import from_pretrained
    from jpeft.train.trainer import Trainer

    model, params = from_pretrained(minilm_dir, num_labels=2)
    trainer = Trainer(model, method, params)
    ours = trainer.counts(trainer.init_state(jax.random.key(0))).trainable
    import peft

    torch.manual_seed(0)
    hf = peft.get_peft_model(BertForSequenceClassification.from_pretrained(str(minilm_dir), num_labels=2),
                             peft_config)
    return ours, sum(p.numel() for p in hf.parameters() if p.requires_grad)
