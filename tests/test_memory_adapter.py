"""The optional memory-path adapter (MemoryConfig.adapter): identity at init, local path untouched."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import eijax
from eijax.testing import random_tokens, tiny_eijax_model

S, L = 3, 6
N = S + 3 * L


def _randomise(model, contains: str, seed: int, scale: float):
    rng = np.random.RandomState(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.PathContains(contains))):
        target = model
        for p in path:
            target = getattr(target, str(p))
        target.set_value(target[...] + scale * jnp.asarray(rng.randn(*var.shape)))


fwd = nnx.jit(lambda m, t: m.forward(t))


def test_identity_adapter_equals_no_adapter():
    with jax.enable_x64(True):
        tokens = jnp.asarray(random_tokens((2, N)))
        models = [tiny_eijax_model("llama", eijax.MemoryConfig(sink=S, window=L, rule="delta", adapter=a),
                                   dtype="float64") for a in (False, True)]
        for m in models:
            _randomise(m, "gate", 0, 0.5)
        np.testing.assert_allclose(fwd(models[0], tokens), fwd(models[1], tokens), rtol=1e-12, atol=1e-12)


def test_trained_adapter_changes_memory_path_only():
    with jax.enable_x64(True):
        mem = eijax.MemoryConfig(sink=S, window=L, adapter=True)
        model = tiny_eijax_model("qwen3", mem, dtype="float64")
        base = tiny_eijax_model("qwen3", eijax.MemoryConfig(sink=S, window=L, enabled=False), dtype="float64")
        _randomise(model, "gate", 0, 0.5)
        _randomise(model, "memory_adapter", 1, 0.3)
        tokens = jnp.asarray(random_tokens((1, N)))
        a, b = np.asarray(fwd(model, tokens)), np.asarray(fwd(base, tokens))
        np.testing.assert_array_equal(a[:, :S + L], b[:, :S + L])  # nothing written yet: exact base
        assert not np.allclose(a[:, S + L:], b[:, S + L:])

        # The memory holds σ(k A_k)ᵀ (v A_v) of the window: compare with a float64 reference.
        state = model.init_state(1)
        _, state = nnx.jit(lambda m, s, t: m.prefill(s, t))(model, state, tokens[:, :S + L])
        k, v = np.asarray(state.k[:, :, S:]), np.asarray(state.v[:, :, S:])
        ak, av = (np.asarray(model.blocks.memory_adapter.k[...]), np.asarray(model.blocks.memory_adapter.v[...]))
        km, vm = np.einsum("nbtkd,nkde->nbtke", k, ak), np.einsum("nbtkd,nkde->nbtke", v, av)
        sk = np.where(km > 0, km + 1.0, np.exp(km))
        written = nnx.jit(lambda m, s: m.compress(s))(model, state)
        np.testing.assert_allclose(written.memory.M, np.einsum("nbtkd,nbtke->nbkde", sk, vm), rtol=1e-10)
