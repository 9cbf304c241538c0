"""FLOP accounting for the model-FLOPs utilisation (MFU) estimate: an analytic count of model
FLOPs per trained token, and this device's measured matmul peak to divide by (no per-chip table:
the same measurement works on CPU, GPU and TPU)."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp


@functools.lru_cache(maxsize=4)
def matmul_peak_flops(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """Best FLOP/s over a few jitted [n, n] @ [n, n] products on the default device."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _layer_weights(c) -> int:
    """Matmul weights of one decoder layer: q, k, v, o and the gated MLP."""
    return c.d_model * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.d_model \
        + 3 * c.d_model * c.d_ff


def model_flops_per_token(config, memory_config, trainable_all: bool = False) -> float:
    """Model FLOPs per trained token: matmuls forward (2N) + backward to activations (2N), plus the
    backward to weights (2N) only when the base trains; attention over sink + window included."""
    c = config
    per_layer = _layer_weights(c)
    matmul = c.n_layers * per_layer + c.vocab_size * c.d_model
    ctx = memory_config.sink + memory_config.window / 2
    # scores + weighted values over the cache, and the memory read, forward only
    attention = c.n_layers * 4 * c.n_heads * c.head_dim * (ctx + c.head_dim)
    passes = 3 if trainable_all else 2  # forward, backward to activations, backward to weights
    return passes * (2 * matmul + attention)


def step_flops(config, memory_config, slots: int, answer_tokens: int, distill_tokens: int = 0) -> float:
    """FLOPs one S-SFT step needs when the base is frozen: forward and backward-to-activations
    matmuls (and attention) of every layer over the slots computed, plus the lm head over the answer
    tokens only (the loss needs no other logits). Remat recompute is not counted: it is not needed.
    With distillation (`distill_tokens` tokens beyond the first window get the KL): the teacher's
    forward over the slots (full causal attention) and both lm heads over those tokens (the
    student's forward and backward to activations)."""
    c = config
    per_layer = _layer_weights(c)
    ctx = memory_config.sink + memory_config.window / 2
    attention = c.n_layers * 4 * c.n_heads * c.head_dim * (ctx + c.head_dim)
    layers = 2 * c.n_layers * per_layer + attention
    flops = 2 * (layers * slots + 2 * c.vocab_size * c.d_model * answer_tokens)
    if distill_tokens:
        teacher_attention = c.n_layers * 4 * c.n_heads * c.head_dim * (slots / 2)
        flops += (2 * c.n_layers * per_layer + teacher_attention) * slots \
            + 3 * 2 * c.vocab_size * c.d_model * distill_tokens
    return flops
