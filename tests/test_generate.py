"""Cached generation equals uncached step-by-step decoding, for the base model and for methods
that act through weights (LoRA), activations (IA3, adapters), prefixes and prompts; beam search
with as many beams as the vocabulary finds the exact best continuation; the causal LM loss."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jpeft.core.transform import apply
from jpeft.generate import generate
from jpeft.methods import (
    AdapterConfig,
    IA3Config,
    LoraConfig,
    PrefixConfig,
    PromptConfig,
    PTuningConfig,
    build,
)
from jpeft.models import gpt2, llama
from jpeft.train.trainer import Trainer, causal_lm_loss
from tests.helpers import perturb

VOCAB = 48
CONFIGS = {
    "lora": LoraConfig(r=2, alpha=4, targets=r"(q_proj|v_proj|c_attn)$"),
    "prefix": PrefixConfig(num_virtual_tokens=3, projection=False),
    "prompt": PromptConfig(num_virtual_tokens=2, init="random"),
    "ptuning": PTuningConfig(num_virtual_tokens=2, encoder_hidden=8),
    "houlsby": AdapterConfig(size=4, init_scale=0.3),
}


@functools.lru_cache(maxsize=None)
def tiny(family: str):
    if family == "llama":
        model = llama.LlamaForCausalLM(llama.LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=True))
        return model, llama.init_params(model, jax.random.key(0))
    model = gpt2.GPT2LMHeadModel(gpt2.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=2,
                                                 n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return model, gpt2.init_params(model, jax.random.key(0))


def left_padded(b=3, t=6, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (b, t))
    lengths = np.maximum(t - 2 * np.arange(b), 2)
    mask = (np.arange(t)[None] >= (t - lengths)[:, None]).astype(np.int32)
    return jnp.asarray(ids * mask, jnp.int32), jnp.asarray(mask)


def uncached_greedy(model, t, params, delta, ids, mask, n, eos=None, pad=0):
    """Reference: re-run the whole sequence without a cache for every new token (jitted: one
    compilation per length instead of one per operation and length)."""
    forward = jax.jit(lambda p, d, i, m: apply(model, t, p, d, i, m))
    out, done = [], np.zeros(ids.shape[0], bool)
    for _ in range(n):
        logits = forward(params, delta, ids, mask)
        tok = np.asarray(jnp.argmax(logits[:, -1], -1))
        tok = np.where(done, pad, tok)
        out.append(tok)
        if eos is not None:
            done |= tok == eos
        ids = jnp.concatenate([ids, jnp.asarray(tok, jnp.int32)[:, None]], 1)
        mask = jnp.concatenate([mask, jnp.ones((mask.shape[0], 1), mask.dtype)], 1)
    return np.stack(out, 1)


IA3_TARGETS = {"llama": IA3Config(targets=r"(k_proj|v_proj|down_proj)$", feedforward=r"down_proj$"),
               "gpt2": IA3Config(targets=r"(c_attn|mlp/c_proj)$", feedforward=r"mlp/c_proj$")}


def _method(spec, model, params, seed=1):
    t = build(spec, {**CONFIGS, "ia3": IA3_TARGETS[model.info().family]})
    delta = t.init(jax.random.key(seed), params, model.info())
    return t, perturb(delta, seed=seed, scale=0.5)


# the cache itself on both families, then each method once (its hook sees cached decoding the same
# way on either family)
@pytest.mark.parametrize("family,spec", [
    ("llama", "base"), ("gpt2", "base"), ("llama", "prefix"), ("llama", "lora+prefix"),
    ("llama", "ptuning"), ("llama", "ia3"), ("gpt2", "prompt"), ("gpt2", "houlsby"), ("gpt2", "lora")])
def test_cached_greedy_equals_uncached(family, spec):
    model, params = tiny(family)
    t, delta = _method("lora" if spec == "base" else spec, model, params)
    if spec == "base":
        delta = t.init(jax.random.key(0), params, model.info())  # fresh LoRA: the base model
    ids, mask = left_padded()
    got = generate(model, t, params, delta, ids, mask, max_new_tokens=6)
    want = uncached_greedy(model, t, params, delta, ids, mask, 6)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_eos_stops_rows_and_pads_after():
    model, params = tiny("llama")
    t, delta = _method("lora", model, params)
    ids, mask = left_padded()
    free = np.asarray(generate(model, t, params, delta, ids, mask, max_new_tokens=6))
    eos = int(free[0, 1])  # row 0 emits it at step 1
    got = np.asarray(generate(model, t, params, delta, ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=1))
    want = uncached_greedy(model, t, params, delta, ids, mask, 6, eos=eos, pad=1)
    np.testing.assert_array_equal(got, want)
    assert (got[0, 2:] == 1).all()


def _sequence_logprob(model, t, params, delta, ids, mask, cont):
    full = jnp.concatenate([ids, cont], 1)
    fmask = jnp.concatenate([mask, jnp.ones_like(cont)], 1)
    logp = jax.nn.log_softmax(apply(model, t, params, delta, full, fmask), -1)
    n = cont.shape[1]
    steps = logp[:, -n - 1:-1]
    return jnp.take_along_axis(steps, cont[:, :, None], -1)[..., 0].sum(-1)


@pytest.mark.parametrize("spec", ["lora", "prefix"])
def test_beam_with_vocab_beams_is_exhaustive(spec):
    """With N = |V| beams and two steps, beam search keeps every one-token prefix, so it returns
    the best two-token continuation over all |V|² of them."""
    model, params = tiny("llama")
    t, delta = _method(spec, model, params)
    ids, mask = left_padded(b=2)
    got = generate(model, t, params, delta, ids, mask, max_new_tokens=2, num_beams=VOCAB)
    for row in range(2):
        a = jnp.repeat(jnp.arange(VOCAB), VOCAB)
        b = jnp.tile(jnp.arange(VOCAB), VOCAB)
        cont = jnp.stack([a, b], 1).astype(jnp.int32)
        rows_ids = jnp.repeat(ids[row:row + 1], VOCAB * VOCAB, 0)
        rows_mask = jnp.repeat(mask[row:row + 1], VOCAB * VOCAB, 0)
        scores = _sequence_logprob(model, t, params, delta, rows_ids, rows_mask, cont)
        best = int(jnp.argmax(scores))
        np.testing.assert_array_equal(np.asarray(got[row]), np.asarray(cont[best]))


def test_one_beam_is_greedy_and_beams_score_at_least_as_well():
    model, params = tiny("gpt2")
    t, delta = _method("lora", model, params)
    ids, mask = left_padded()
    greedy = generate(model, t, params, delta, ids, mask, max_new_tokens=4)
    np.testing.assert_array_equal(generate(model, t, params, delta, ids, mask, max_new_tokens=4, num_beams=1), greedy)
    beams = generate(model, t, params, delta, ids, mask, max_new_tokens=4, num_beams=4, length_penalty=0.0)
    g = _sequence_logprob(model, t, params, delta, ids, mask, greedy)
    bm = _sequence_logprob(model, t, params, delta, ids, mask, beams)
    assert bool(jnp.all(bm >= g - 1e-5))


def test_bad_inputs_are_refused():
    model, params = tiny("llama")
    t, delta = _method("lora", model, params)
    ids, mask = left_padded()
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, t, params, delta, ids, jnp.flip(mask, 1), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, t, params, delta, ids, mask, max_new_tokens=0)
    from tests.helpers import tiny_bert

    bert, bparams = tiny_bert()
    with pytest.raises(TypeError, match="KV cache"):
        generate(bert, t, bparams, delta, ids, mask, max_new_tokens=2)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_inputs_and_token_ids_that_do_not_fit_are_refused(family):
    """Empty prompts used to fail with an IndexError, float ids were truncated, ids and an EOS
    outside the vocabulary gave NaN logits or never stopped, a NaN length penalty was taken."""
    model, params = tiny(family)
    t, delta = _method("lora", model, params)
    ids, mask = left_padded()
    gen = functools.partial(generate, model, t, params, delta)
    with pytest.raises(ValueError, match="prompts are empty"):
        gen(ids[:, :0], mask[:, :0], max_new_tokens=2)
    with pytest.raises(TypeError, match="integer token ids"):
        gen(ids.astype(jnp.float32), mask, max_new_tokens=2)
    with pytest.raises(ValueError, match=f"outside the model's vocabulary of {VOCAB}"):
        gen(ids + VOCAB, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match=f"eos_token_id={VOCAB} is not in the model's vocabulary"):
        gen(ids, mask, max_new_tokens=2, eos_token_id=VOCAB)
    with pytest.raises(ValueError, match="pad_token_id must be a token id"):
        gen(ids, mask, max_new_tokens=2, pad_token_id=-1)
    with pytest.raises(ValueError, match="length_penalty"):
        gen(ids, mask, max_new_tokens=2, num_beams=2, length_penalty=float("nan"))


def test_gpt2_positions_past_n_positions_are_refused():
    """GPT-2's learned positions (n_positions=64 here) used to be indexed out of range: NaN
    logits in a forward pass, garbage tokens in generation."""
    model, params = tiny("gpt2")
    t, delta = _method("lora", model, params)
    ids, mask = left_padded(t=6)
    with pytest.raises(ValueError, match="KV cache has 66 slots"):
        generate(model, t, params, delta, ids, mask, max_new_tokens=60)
    long = jnp.ones((1, 65), jnp.int32)
    with pytest.raises(ValueError, match="n_positions=64.*65 tokens"):
        model.apply({"params": params}, long, jnp.ones_like(long))


def test_causal_lm_loss_counts_only_masked_targets():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 7, VOCAB)), jnp.float32)  # 2 prepended positions
    ids = jnp.asarray(rng.integers(0, VOCAB, (2, 5)), jnp.int32)
    loss_mask = jnp.asarray([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], jnp.int32)
    got = causal_lm_loss(logits, {"input_ids": ids, "loss_mask": loss_mask})
    aligned = logits[:, 2:]
    terms = [float(optax.softmax_cross_entropy_with_integer_labels(aligned[b, t - 1], ids[b, t]))
             for b in range(2) for t in range(1, 5) if loss_mask[b, t]]
    np.testing.assert_allclose(float(got), np.mean(terms), rtol=1e-6)


def test_trainer_lowers_the_lm_loss_of_a_repeated_batch():
    model, params = tiny("llama")
    ids, mask = left_padded(b=4, t=8)
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask, "weights": jnp.ones((4,))}
    from jpeft.train.optim import OptimConfig

    for spec in ("lora", "prompt", "prefix"):
        trainer = Trainer(model, build(spec, CONFIGS), params, loss=causal_lm_loss,
                          optim=OptimConfig(lr=5e-2, warmup_ratio=0.0, schedule="constant"), total_steps=20,
                          model_inputs=("input_ids", "attention_mask"))
        state = trainer.init_state(jax.random.key(0))
        losses = []
        for _ in range(10):
            state, metrics = trainer.train_step(state, trainer.frozen, batch)
            losses.append(float(metrics["loss"]))
        assert losses[-1] < losses[0] - 0.01, (spec, losses)  # near-uniform tiny LM: small but real
