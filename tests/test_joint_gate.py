"""The joint gate (MemoryConfig.gate = "joint"): the memory stands in for the folded tokens' share of
one softmax, weight σ(c + log σ(q)·z - logsumexp of the window's scores). The layer-major training
forward and streaming agree; the weight is that formula; c gets gradients; the PyTorch twin refuses it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import eijax
from eijax.cli import InputError
from eijax.layers import MemoryGate, blocked_attention, local_attention
from eijax.rope import apply_rope, rope_table
from eijax.testing import padded_inputs, randomise_memory_path, segment_loop, tiny_eijax_model

S, L, N_SEG = 3, 6, 4
MEM = eijax.MemoryConfig(sink=S, window=L, rule="linear", gate="joint", adapter=True)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_training_forward_matches_streaming(family):
    with jax.enable_x64(True):
        model = tiny_eijax_model(family, MEM, dtype="float64")
        randomise_memory_path(model, scale=0.5)
        tokens, valid = padded_inputs(S, L, N_SEG, 0)
        hidden, *_ = segment_loop(model, tokens, valid)
        got = np.asarray(nnx.jit(lambda m, t, v: m.forward(t, v))(model, tokens, valid))
        np.testing.assert_allclose(hidden, got, rtol=1e-10, atol=1e-10)


def test_gate_is_the_memory_share_of_one_softmax():
    """σ(c + log_mass) with log_mass = log(mass) - lse: for c = 0 the memory weighs what a softmax over
    the window's keys plus one extra key of that mass would give it."""
    cfg = tiny_eijax_model("llama", MEM).config
    gate = MemoryGate(cfg, MEM, lead=(), lead_axes=(), param_dtype=jnp.float32)
    gate.bias.value = jnp.zeros_like(gate.bias.value)
    rng = np.random.default_rng(0)
    h, d = cfg.n_heads, cfg.head_dim
    mass, lse = rng.uniform(0.5, 5.0, (1, 2, h)), rng.normal(size=(1, 2, h))
    a = jnp.zeros((1, 2, h, d))
    got = np.asarray(gate(a, a, jnp.asarray(np.log(mass) - lse)))[..., 0]
    np.testing.assert_allclose(got, mass / (mass + np.exp(lse)), rtol=1e-5)


def test_local_and_blocked_attention_return_the_scores_logsumexp():
    rng = np.random.default_rng(1)
    b, t, c, h, hkv, d = 1, 3, 8, 4, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((b, t, h, d), (b, c, hkv, d), (b, c, hkv, d)))
    mask = jnp.asarray(np.arange(c)[None, None, :] <= np.array([4, 6, 7])[None, :, None])
    out, lse = local_attention(q, k, v, mask, with_lse=True)
    scores = np.einsum("bthd,bchd->bthc", np.asarray(q), np.repeat(np.asarray(k), h // hkv, axis=2)) / np.sqrt(d)
    scores = np.where(np.asarray(mask)[:, :, None, :], scores, -np.inf)
    np.testing.assert_allclose(np.asarray(lse), np.log(np.exp(scores).sum(-1)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(local_attention(q, k, v, mask)), rtol=1e-6)
    cos, sin = (jnp.asarray(x) for x in rope_table(eijax.RopeConfig(), d, c))
    q_rot = apply_rope(q, cos[5:8], sin[5:8])
    ref_out, ref_lse = local_attention(q_rot, apply_rope(k, cos, sin), v, mask, with_lse=True)
    got_out, got_lse = blocked_attention(q_rot, k, v, mask, jnp.asarray(8), cos, sin, block=4, with_lse=True)
    np.testing.assert_allclose(np.asarray(got_lse), np.asarray(ref_lse), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(ref_out), rtol=1e-5, atol=1e-6)


def test_the_constant_gets_gradients_and_the_twin_refuses():
    model = tiny_eijax_model("llama", MEM)
    randomise_memory_path(model, scale=0.3)
    tokens, valid = padded_inputs(S, L, N_SEG, 2)
    graph, gate, rest = nnx.split(model, nnx.PathContains("gate"), ...)

    def loss(gate):
        return jnp.sum(nnx.merge(graph, gate, rest).forward(tokens, valid)[:, S + L:] ** 2)

    grad = np.asarray(jax.jit(jax.grad(loss))(gate)["blocks"]["gate"]["bias"][...])
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
    with pytest.raises(ValueError, match="gate"):
        eijax.MemoryConfig(gate="nope")
    pytest.importorskip("torch")
    from convert.torch_model import EdgeInfiniteTorch

    with pytest.raises(InputError, match="joint"):
        EdgeInfiniteTorch(model.config, model.memory_config)
