"""The jitted S-SFT train step.

Loss: next-token cross-entropy on answer tokens, averaged over them, plus (optim.distill_weight > 0)
a dense term: KL(full attention || model) on every token after the first segment, averaged over
those tokens. The teacher is the same frozen base attending to the whole sequence (memory off,
one window): so the memory path learns to stand in for the attention to what left the window on
every token, not only on a handful of answer tokens (RESEARCH.md: with the answer loss alone the
memory's learning signal is weak and sparse). The host turns a laid-out batch
into the step's inputs (`prepare_batch`): trailing all-padding slots of the last segment are cut
(to a multiple of `TAIL_MULTIPLE`), and the answer positions are listed (`loss_index`, padded to a
power of two), so the lm head runs on the answer tokens only, not on every slot (the vocabulary
projection was a fifth of the forward FLOPs). Logits are computed chunk by chunk under
`jax.checkpoint` so a [B, K, V] logits tensor never exists at once. The step is lowered and compiled
before the loop, and its memory use printed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from eijax.model import with_memory_config

TAIL_MULTIPLE = 64   # the last segment is cut to a multiple of this many slots
MIN_ANSWER_SLOTS = 16


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(int(n) - 1, 0).bit_length())


def batch_extent(batch: dict[str, np.ndarray]) -> tuple[int, int]:
    """(slots used by any row, the longest row's answer-token count): what `prepare_batch` sizes by.
    Multi-process runs take the maximum over processes so that every process builds the same shapes."""
    used = int(np.flatnonzero(np.asarray(batch["valid"]).any(axis=0)).max(initial=0)) + 1
    return used, int((np.asarray(batch["loss_mask"]) > 0).sum(axis=1).max(initial=0))


def prepare_batch(batch: dict[str, np.ndarray], sink: int, window: int,
                  extent: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Host-side: a laid-out batch (tokens, valid, labels, loss_mask) -> the train step's inputs.

    tokens, valid: cut after the last slot any row uses, rounded up to `TAIL_MULTIPLE` within its
    segment (padding is never attended to, so outputs are unchanged; see EdgeInfiniteLM.forward).
    Shapes: at most max_segments x window / TAIL_MULTIPLE distinct ones, each compiled once.
    loss_index [B, K]: slot of each answer token (K a power of two >= the longest row's count),
    loss_labels [B, K]: its target, loss_weight [B, K]: 1 for a real entry, 0 for padding.
    """
    tokens, valid = np.asarray(batch["tokens"]), np.asarray(batch["valid"])
    mask = np.asarray(batch["loss_mask"]) > 0
    b, n = tokens.shape
    used, longest = extent or batch_extent(batch)
    segments = max(1, -(-(used - sink) // window))
    last_start = sink + (segments - 1) * window
    tail = min(window, -(-max(used - last_start, 1) // TAIL_MULTIPLE) * TAIL_MULTIPLE)  # never past the segment
    keep = min(n, last_start + tail)
    k = _pow2_at_least(longest, MIN_ANSWER_SLOTS)
    index = np.zeros((b, k), np.int32)
    weight = np.zeros((b, k), np.float32)
    for r in range(b):
        pos = np.flatnonzero(mask[r])
        index[r, :len(pos)] = pos
        weight[r, :len(pos)] = 1.0
    labels = np.take_along_axis(np.asarray(batch["labels"]), index, axis=1).astype(np.int32)
    return dict(tokens=tokens[:, :keep], valid=valid[:, :keep], loss_index=index, loss_labels=labels,
                loss_weight=weight)


def chunked_cross_entropy(model, hidden: jax.Array, labels: jax.Array, loss_mask: jax.Array,
                          chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sums over masked positions: (cross-entropy, mask count, correct argmax count)."""
    xs = _chunks(chunk, hidden, labels, loss_mask.astype(jnp.float32))

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


def _chunks(chunk: int, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """[B, N, ...] arrays -> [N/chunk, B, chunk, ...], zero-padded to a multiple of chunk."""
    n = arrays[0].shape[1]
    pad = (-n) % chunk
    out = []
    for a in arrays:
        if pad:
            a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        out.append(a.reshape(a.shape[0], -1, chunk, *a.shape[2:]).swapaxes(0, 1))
    return tuple(out)


def chunked_kl(model, hidden: jax.Array, teacher_hidden: jax.Array, mask: jax.Array,
               chunk: int, recompute: bool = True) -> tuple[jax.Array, jax.Array]:
    """Sums over masked positions: (KL(teacher || model) of the next-token distributions, mask count).
    Chunked; with `recompute` (memory is scarce: remat on) under jax.checkpoint like the
    cross-entropy, so no [B, N, V] tensor is kept and the backward recomputes both chunks' logits;
    without it the backward keeps two [B, N, V] residuals and does one vocabulary matmul per chunk
    instead of three (a fifth of the default CPU step)."""
    xs = _chunks(chunk, hidden, teacher_hidden, mask.astype(jnp.float32))

    def body(carry, x):
        h, t, m = x
        logp = jax.nn.log_softmax(model.logits(h), axis=-1)
        logq = jax.nn.log_softmax(model.logits(t), axis=-1)
        kl = jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1)
        total, cnt = carry
        return (total + jnp.sum(kl * m), cnt + jnp.sum(m)), None

    zero = jnp.zeros((), jnp.float32)
    (total, cnt), _ = jax.lax.scan(jax.checkpoint(body) if recompute else body, (zero, zero), xs)
    return total, cnt


def full_attention_hidden(model, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """The frozen base model's hidden states with every token in one window (memory off): the
    distillation teacher. No gradient flows through it."""
    full = dataclasses.replace(model.memory_config, enabled=False, sink=0, window=tokens.shape[1], remat="none")
    return jax.lax.stop_gradient(with_memory_config(model, full).forward(tokens, valid))


def loss_fn(trainable: dict, frozen: nnx.State, graphdef: nnx.GraphDef, batch: dict[str, jax.Array],
            chunk: int, frozen_local: bool = False, distill_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean answer-token cross-entropy of a `prepare_batch` batch, plus distill_weight x the mean
    KL to full attention over tokens after the first segment (see the module docstring).
    `frozen_local`: only memory-path parameters train (see EdgeInfiniteLM.forward), so the backward
    of the sink and segment 0 is skipped."""
    model = nnx.merge(graphdef, trainable, frozen)
    hidden = model.forward(batch["tokens"], batch["valid"], frozen_local=frozen_local)
    answer_hidden = jnp.take_along_axis(hidden, batch["loss_index"][..., None], axis=1)  # [B, K, D]
    ce, cnt, acc = chunked_cross_entropy(model, answer_hidden, batch["loss_labels"], batch["loss_weight"],
                                         min(chunk, answer_hidden.shape[1]))
    denom = jnp.maximum(cnt, 1.0)
    loss = ce / denom
    aux = {"answer_tokens": cnt, "token_accuracy": acc / denom}
    if distill_weight:
        mem = model.memory_config
        start = mem.sink + mem.window  # the KL covers the tokens after the first window
        kl = n_kl = jnp.zeros((), jnp.float32)
        if hidden.shape[1] > start:
            teacher = full_attention_hidden(model, batch["tokens"], batch["valid"])
            kl, n_kl = chunked_kl(model, hidden[:, start:], teacher[:, start:], batch["valid"][:, start:], chunk,
                                  recompute=mem.resolved_remat() != "none")
        aux["distill_kl"] = kl / jnp.maximum(n_kl, 1.0)
        loss = loss + distill_weight * aux["distill_kl"]
    return loss, aux


def train_step(trainable: dict, opt_state: Any, frozen: nnx.State, batch: dict[str, jax.Array], *,
               graphdef: nnx.GraphDef, tx: optax.GradientTransformation, chunk: int, frozen_local: bool = False,
               distill_weight: float = 0.0):
    """One micro-step: grads of the trainable params only; the optimizer (maybe MultiSteps) applies them."""
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, graphdef, batch, chunk,
                                                                   frozen_local, distill_weight)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}
    return trainable, opt_state, metrics


def jit_train_step(graphdef, tx, chunk: int, shardings: dict[str, Any], frozen_local: bool = False,
                   distill_weight: float = 0.0) -> Callable:
    """jax.jit with explicit shardings; trainable params and optimizer state are donated."""
    fn = functools.partial(train_step, graphdef=graphdef, tx=tx, chunk=chunk, frozen_local=frozen_local,
                           distill_weight=distill_weight)
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
