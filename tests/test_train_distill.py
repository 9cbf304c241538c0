"""The dense distillation term of the S-SFT loss (optim.distill_weight): KL(full attention || model)
on every token after the first segment."""

from __future__ import annotations

import dataclasses

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eijax.testing import TINY_TRAIN_ARGS, randomise_memory_path
from eijax.train.config_schema import load_config

SINK, WINDOW = 8, 32


def _model_and_batch(n_tokens: int, seed: int = 0):
    from eijax.train.loop import build_model
    from eijax.train.step import prepare_batch

    args = dict(a.split("=", 1) for a in [*TINY_TRAIN_ARGS, f"memory.sink={SINK}", f"memory.window={WINDOW}"])
    cfg = load_config(None, [f"{k}={v}" for k, v in args.items()])
    model = build_model(cfg)
    randomise_memory_path(model, seed=seed, scale=0.5)
    rng = np.random.RandomState(seed)
    n = SINK + -(-(n_tokens - SINK) // WINDOW) * WINDOW
    tokens = rng.randint(0, 259, (2, n)).astype(np.int32)
    valid = np.zeros((2, n), bool)
    valid[:, :n_tokens] = True
    mask = np.zeros((2, n), np.float32)
    mask[:, n_tokens - 4:n_tokens] = 1
    batch = prepare_batch(dict(tokens=tokens, valid=valid, labels=np.roll(tokens, -1, 1), loss_mask=mask), SINK, WINDOW)
    return model, jax.tree.map(jnp.asarray, batch)


def _loss(model, batch, weight: float):
    from eijax.train.step import loss_fn

    graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    return loss_fn(trainable, frozen, graphdef, batch, chunk=16, distill_weight=weight)


def test_teacher_is_the_base_model_with_full_attention():
    from eijax.model import with_memory_config
    from eijax.train.step import full_attention_hidden

    model, batch = _model_and_batch(SINK + 3 * WINDOW)
    n = batch["tokens"].shape[1]
    # the same model with one window long enough for everything: plain causal attention at true positions
    big = with_memory_config(model, dataclasses.replace(model.memory_config, sink=4, window=n - 4))
    want = big.forward(batch["tokens"], batch["valid"])
    got = full_attention_hidden(model, batch["tokens"], batch["valid"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_no_distillation_inside_one_window():
    model, batch = _model_and_batch(SINK + WINDOW - 3)  # fits in sink + window: the model is the base model
    plain, _ = _loss(model, batch, 0.0)
    with_kl, aux = _loss(model, batch, 1.0)
    assert float(aux["distill_kl"]) == 0.0
    np.testing.assert_allclose(float(with_kl), float(plain), rtol=1e-6)


def test_distillation_reaches_the_memory_path_and_training_lowers_it():
    import optax

    from eijax.train.step import loss_fn

    model, batch = _model_and_batch(SINK + 3 * WINDOW + 5)
    graphdef, trainable, frozen = nnx.split(model, lambda path, x: isinstance(x, nnx.Param) and "gate" in map(str, path),
                                            ...)
    grad_fn = jax.jit(jax.value_and_grad(
        lambda t: loss_fn(t, frozen, graphdef, batch, chunk=16, distill_weight=1.0)[1]["distill_kl"]))
    kl0, grads = grad_fn(trainable)
    assert float(kl0) > 1e-3  # beyond the window the model is not full attention
    assert float(optax.global_norm(grads)) > 0
    tx = optax.adam(3e-2)
    opt = tx.init(trainable)
    for _ in range(25):
        kl, grads = grad_fn(trainable)
        updates, opt = tx.update(grads, opt)
        trainable = optax.apply_updates(trainable, updates)
    assert float(grad_fn(trainable)[0]) < 0.8 * float(kl0)


def test_kl_equals_the_direct_definition_with_and_without_recompute():
    """The step's KL (only tokens after the first window, chunked, logits kept or recomputed in the
    backward) equals KL(teacher || model) written out over every position with a mask; so do its
    gradients."""
    from eijax.model import with_memory_config
    from eijax.train.step import full_attention_hidden

    model, batch = _model_and_batch(SINK + 2 * WINDOW + 7)
    graphdef, gate, frozen = nnx.split(model, lambda path, x: isinstance(x, nnx.Param) and "gate" in map(str, path), ...)

    def direct(g):
        m = nnx.merge(graphdef, g, frozen)
        logp = jax.nn.log_softmax(m.logits(m.forward(batch["tokens"], batch["valid"])), axis=-1)
        logq = jax.nn.log_softmax(m.logits(full_attention_hidden(m, batch["tokens"], batch["valid"])), axis=-1)
        beyond = batch["valid"] & (jnp.arange(logp.shape[1]) >= SINK + WINDOW)[None, :]
        kl = jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1)
        return jnp.sum(kl * beyond) / jnp.sum(beyond)

    want, want_grad = jax.value_and_grad(direct)(gate)
    for remat in ("none", "segment"):
        m = with_memory_config(model, dataclasses.replace(model.memory_config, remat=remat))
        graph_r, gate_r, frozen_r = nnx.split(m, lambda path, x: isinstance(x, nnx.Param) and "gate" in map(str, path), ...)

        def step_kl(g):
            from eijax.train.step import loss_fn
            return loss_fn(g, frozen_r, graph_r, batch, chunk=16, distill_weight=1.0)[1]["distill_kl"]

        got, got_grad = jax.value_and_grad(step_kl)(gate_r)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
        np.testing.assert_allclose(jax.flatten_util.ravel_pytree(got_grad)[0], jax.flatten_util.ravel_pytree(want_grad)[0],
                                   rtol=1e-4, atol=1e-7)
