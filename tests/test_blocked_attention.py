"""`blocked_attention` (large caches, block by block with a running softmax) against the one-shot
`local_attention` it replaces there (end to end through the `full` method: tests/test_generate.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eijax.layers as layers
from eijax.config import RopeConfig
from eijax.rope import apply_rope, rope_table


def _inputs(b=2, t=5, h=6, hkv=2, d=8, c=32, fill=13, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, t, h, d), (b, c, hkv, d), (b, c, hkv, d)))
    valid = np.zeros((b, c), bool)
    valid[:, : fill + t] = True
    valid[1, 3] = False  # a hole: the mask, not the limit, must hide it
    q_pos = fill + np.arange(t)
    mask = jnp.asarray(valid[:, None, :] & (np.arange(c)[None, None, :] <= q_pos[None, :, None]))
    cos, sin = (jnp.asarray(a) for a in rope_table(RopeConfig(), d, c))
    return q, k, v, mask, jnp.int32(fill + t), cos, sin


@pytest.mark.parametrize("fill", [0, 13, 27])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_blocked_equals_one_shot_and_skips_blocks_past_the_limit(fill, softcap):
    q, k, v, mask, limit, cos, sin = _inputs(fill=fill)
    ref = layers.local_attention(q, apply_rope(k, cos, sin), v, mask, None, softcap)
    out = layers.blocked_attention(q, k, v, mask, limit, cos, sin, None, softcap, block=8)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)
    # blocks at or past the limit are never read: garbage there changes nothing
    first_unused = -(-int(limit) // 8) * 8
    if first_unused < k.shape[1]:
        junk = k.at[:, first_unused:].set(1e4)
        again = layers.blocked_attention(q, junk, v.at[:, first_unused:].set(jnp.nan), mask, limit, cos, sin,
                                         None, softcap, block=8)
        np.testing.assert_array_equal(np.asarray(again), np.asarray(out))


def test_blocked_gradients_equal_one_shot():
    q, k, v, mask, limit, cos, sin = _inputs()
    one_shot = lambda q, k, v: jnp.sum(jnp.sin(layers.local_attention(q, apply_rope(k, cos, sin), v, mask)))
    blocked = lambda q, k, v: jnp.sum(jnp.sin(layers.blocked_attention(q, k, v, mask, limit, cos, sin, block=8)))
    for g, r in zip(jax.grad(blocked, argnums=(0, 1, 2))(q, k, v), jax.grad(one_shot, argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)
