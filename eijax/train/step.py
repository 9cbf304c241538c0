"""The jitted S-SFT train step.

Loss: next-token cross-entropy on answer tokens (`loss_mask`), averaged over them. Logits are
computed chunk by chunk under `jax.checkpoint` so the [B, N, V] logits tensor never exists at once
(the vocabulary is the biggest activation for small models). The step is lowered and compiled
before the loop, and its memory use printed.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def chunked_cross_entropy(model, hidden: jax.Array, labels: jax.Array, loss_mask: jax.Array,
                          chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sums over masked positions: (cross-entropy, mask count, correct argmax count)."""
    b, n, d = hidden.shape
    pad = (-n) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
        loss_mask = jnp.pad(loss_mask, ((0, 0), (0, pad)))
    k = (n + pad) // chunk
    xs = (hidden.reshape(b, k, chunk, d).swapaxes(0, 1), labels.reshape(b, k, chunk).swapaxes(0, 1),
          loss_mask.reshape(b, k, chunk).swapaxes(0, 1).astype(jnp.float32))

    @jax.checkpoint
    def body(carry, x):
        h, y, m = x
        logits = model.logits(h)  # float32 [B, chunk, V]
        logz = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
        ce, cnt, acc = carry
        return (ce + jnp.sum((logz - target) * m), cnt + jnp.sum(m), acc + jnp.sum(correct * m)), None

    zero = jnp.zeros((), jnp.float32)
    (ce, cnt, acc), _ = jax.lax.scan(body, (zero, zero, zero), xs)
    return ce, cnt, acc


def loss_fn(trainable: dict, frozen: nnx.State, graphdef: nnx.GraphDef, batch: dict[str, jax.Array],
            chunk: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    model = nnx.merge(graphdef, trainable, frozen)
    hidden = model.forward(batch["tokens"], batch["valid"])
    ce, cnt, acc = chunked_cross_entropy(model, hidden, batch["labels"], batch["loss_mask"], chunk)
    denom = jnp.maximum(cnt, 1.0)
    return ce / denom, {"answer_tokens": cnt, "token_accuracy": acc / denom}


def train_step(trainable: dict, opt_state: Any, frozen: nnx.State, batch: dict[str, jax.Array], *,
               graphdef: nnx.GraphDef, tx: optax.GradientTransformation, chunk: int):
    """One micro-step: grads of the trainable params only; the optimizer (maybe MultiSteps) applies them."""
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, graphdef, batch, chunk)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}
    return trainable, opt_state, metrics


def jit_train_step(graphdef, tx, chunk: int, shardings: dict[str, Any]) -> Callable:
    """jax.jit with explicit shardings; trainable params and optimizer state are donated."""
    fn = functools.partial(train_step, graphdef=graphdef, tx=tx, chunk=chunk)
    return jax.jit(fn,
                   in_shardings=(shardings["trainable"], shardings["opt_state"], shardings["frozen"], shardings["batch"]),
                   out_shardings=(shardings["trainable"], shardings["opt_state"], shardings["replicated"]),
                   donate_argnums=(0, 1))


def compile_step(step: Callable, trainable, opt_state, frozen, batch_shapes: dict[str, jax.ShapeDtypeStruct],
                 log: Callable[[str], None] = print):
    """Lower + compile for one batch shape, print its memory; returns the compiled executable."""
    lowered = step.lower(trainable, opt_state, frozen, batch_shapes)
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    if mem is not None:
        gib = 1 / 2**30
        log(f"compiled train step for tokens{tuple(batch_shapes['tokens'].shape)}: "
            f"arguments {mem.argument_size_in_bytes * gib:.3f} GiB, outputs {mem.output_size_in_bytes * gib:.3f} GiB, "
            f"temporaries {mem.temp_size_in_bytes * gib:.3f} GiB, code {mem.generated_code_size_in_bytes * gib:.4f} GiB "
            "(per device)")
    return compiled
