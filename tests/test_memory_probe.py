"""The memory probe reads the keys the memory really holds, and its shares are the read's weights."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import eijax
from eijax.eval.memory_probe import layer_qk, needle_shares
from eijax.memory import sigma
from eijax.testing import random_tokens, tiny_eijax_model


def test_probe_keys_are_what_the_memory_holds():
    """z (the sum of σ(k) over every written token) rebuilt from the probe's keys equals the
    model's own memory after streaming the same context (adapter maps and write strengths included)."""
    from eijax.testing import randomise_memory_path

    mem = eijax.MemoryConfig(sink=3, window=8, adapter=True, write_gate=True)
    model = tiny_eijax_model("llama", mem, dtype="float32")
    randomise_memory_path(model)
    ctx = [int(t) for t in random_tokens((3 + 2 * 8 + 5,), seed=1)]
    query = [5, 6, 7]
    q, k, strength, written = layer_qk(model, ctx, query)
    assert q.shape == (model.config.n_layers, model.config.n_heads, model.config.head_dim)
    assert k.shape[1] == written.sum() == len(ctx) - 3
    state = model.init_state(1)
    _, state = model.prefill(state, jnp.asarray([ctx[:3]]))
    for at in range(3, len(ctx), 8):
        seg = jnp.asarray([ctx[at:at + 8]])
        _, state = model.step_segment(state, seg, jnp.ones(seg.shape, bool))
    assert strength.shape == k.shape[:-1] and not np.allclose(strength, 1.0)
    z_probe = (np.asarray(sigma(jnp.asarray(k))) * strength[..., None]).sum(axis=1)  # [NL, Hkv, d]
    np.testing.assert_allclose(z_probe, np.asarray(state.memory.z[:, 0]), rtol=1e-5, atol=1e-5)


def test_needle_shares_measure_selectivity():
    rng = np.random.RandomState(0)
    nl, h, hkv, d, t = 2, 4, 2, 8, 50
    q = rng.randn(nl, h, d)
    k = rng.randn(nl, t, hkv, d) * 0.1
    needle = np.zeros(t, bool)
    needle[10:15] = True
    k[:, needle] = 3 * np.repeat(q[:, None, ::2], 5, axis=1)  # needle keys align with heads 0 and 2
    out = needle_shares(q, k, needle, temperatures=[8.0])
    assert out["selectivity_soft"][:, [0, 2]].min() > 5        # softmax finds the needle
    # the memory read (elu+1) is far flatter; a feature scale (temperature) sharpens it
    assert out["selectivity_mem"][:, [0, 2]].max() < out["selectivity_soft"][:, [0, 2]].min()
    assert (out["selectivity_mem_b8"][:, [0, 2]] > out["selectivity_mem"][:, [0, 2]]).all()
    np.testing.assert_allclose(out["share_mem"] * needle.size / needle.sum(), out["selectivity_mem"])
    # a write strength that favours the needle's tokens raises the memory read's share on them
    strength = np.where(needle[None, :, None], 1.9, 0.1) * np.ones((nl, t, hkv))
    assert (needle_shares(q, k, needle, strength=strength)["share_mem"] > out["share_mem"]).all()
