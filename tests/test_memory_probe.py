"""The memory probe reads the keys the memory really holds, and its shares are the read's weights."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import eijax
from eijax.eval.memory_probe import layer_qk, needle_shares
from eijax.memory import sigma
from eijax.testing import random_tokens, tiny_eijax_model


@pytest.mark.parametrize("key_conv", [0, 4])
def test_probe_keys_are_what_the_memory_holds(key_conv):
    """z (the sum of σ(k) over every written token) rebuilt from the probe's keys equals the
    model's own memory after streaming the same context (adapter maps, write strengths and the key
    convolution across window folds included)."""
    from eijax.testing import randomise_memory_path

    mem = eijax.MemoryConfig(sink=3, window=8, adapter=True, write_gate=True, key_conv=key_conv)
    model = tiny_eijax_model("llama", mem, dtype="float32")
    randomise_memory_path(model)
    ctx = [int(t) for t in random_tokens((3 + 2 * 8 + 5,), seed=1)]
    query = [5, 6, 7]
    q, k, strength, written, *_ = layer_qk(model, ctx, query)
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


def test_binding_tells_whether_the_query_picks_the_asked_needle():
    """Four needles; needle 1's keys in KV head 0 align with query head 0; KV head 1 (read by query
    heads 2 and 3) holds random keys: binding is high for needle 1 asked, below 1 for another
    asked, ~1 where nothing steers."""
    from eijax.eval.memory_probe import binding

    rng = np.random.RandomState(1)
    nl, h, hkv, d, t = 2, 4, 2, 8, 80
    q = rng.randn(nl, h, d)
    k = rng.randn(nl, t, hkv, d) * 0.1
    masks = [np.zeros(t, bool) for _ in range(4)]
    for j, m in enumerate(masks):
        m[10 + 15 * j: 15 + 15 * j] = True
    k[:, masks[1], 0] = 3 * q[:, None, 0]
    asked_1, asked_3 = binding(q, k, masks, asked=1), binding(q, k, masks, asked=3)
    for name in ("binding_soft", "binding_mem"):
        assert asked_1[name][:, 0].min() > 1.2 and asked_3[name][:, 0].max() < 0.9
        np.testing.assert_allclose(asked_3[name][:, 2:], 1.0, atol=0.25)  # random keys: no steering
    assert asked_1["binding_soft"][:, 0].min() > asked_1["binding_mem"][:, 0].max()  # softmax binds harder


def test_random_features_estimate_softmax_read_weights():
    """FAVOR+ features are unbiased for exp(q·k/√d): with many of them the shares they give match
    softmax's; with few they are noisier but still favour the keys softmax favours."""
    from eijax.eval.memory_probe import favor_weights

    rng = np.random.RandomState(2)
    nl, h, d, t = 1, 2, 8, 40
    q = 0.5 * rng.randn(nl, h, d)      # modest norms: the estimator's variance grows as exp(|q + k|²/√d)
    kk = 0.5 * rng.randn(nl, t, h, d)
    logits = np.einsum("lhd,lthd->lht", q, kk) / np.sqrt(d)
    soft = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    share = lambda w: w / w.sum(-1, keepdims=True)
    for seed in (0, 1):  # a biased draw of directions (QR without R's signs) fails this at any m
        assert np.abs(share(favor_weights(q, kk, 8192, seed=seed)) - soft).max() < 0.1 * soft.max()
        assert np.corrcoef(share(favor_weights(q, kk, 64, seed=seed)).ravel(), soft.ravel())[0, 1] > 0.7
