"""The learned write strength (MemoryConfig.write_gate): β = 1 at init, each token's write scaled by
β = 2σ([k; v]·w + b) exactly as the float64 reference says, gradients that reach w and b, and a warm
start from a memory path trained without it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import eijax
from eijax.testing import (check_gradient_by_finite_differences, check_streamed_memory, fold_memory_reference,
                           padded_inputs, randomise_memory_path, tiny_eijax_model)
from eijax.trained import CheckpointMismatch, init_from_trained, save_memory_file

S, L, N_SEG = 3, 6, 4
fwd = nnx.jit(lambda m, t, v: m.forward(t, v))


def _model(rule: str, write_gate: bool, family: str = "llama", adapter: bool = False):
    mem = eijax.MemoryConfig(sink=S, window=L, rule=rule, adapter=adapter, write_gate=write_gate)
    return tiny_eijax_model(family, mem, dtype="float64")


def test_fresh_write_gate_is_the_plain_rule():
    with jax.enable_x64(True):
        tokens, valid = padded_inputs(S, L, N_SEG, 0)
        plain, gated = _model("delta", False), _model("delta", True)
        randomise_memory_path(plain)
        nnx.update(gated.blocks.gate, nnx.state(plain.blocks.gate))  # one random gate; the write gate fresh
        np.testing.assert_array_equal(np.asarray(fwd(plain, tokens, valid)), np.asarray(fwd(gated, tokens, valid)))


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_memory_equals_the_weighted_reference(rule):
    """Every segment's write (padding included) against NumPy float64 with β from the window's own k, v."""
    with jax.enable_x64(True):
        model = _model(rule, True, family="qwen3")
        randomise_memory_path(model, scale=0.3)
        wg = (np.asarray(model.blocks.write_gate.w[...]), np.asarray(model.blocks.write_gate.b[...]))
        windows, final = check_streamed_memory(model, *padded_inputs(S, L, N_SEG, 1), write_gate=wg)
        _, z_plain = fold_memory_reference(windows, rule, model.memory_config.eps)[-1]
        assert not np.allclose(final.memory.z, z_plain, rtol=1e-3)  # β really differs from 1


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_only_relative_write_strength_matters(rule):
    """β = c on every token scales M and z by c and leaves every read unchanged (up to eps): the read
    is normalised by σ(q)·z and the delta rule's retrieval by σ(k)·z. So the write gate's overall
    level (its bias) is a no-op; what can change recall is β on some tokens against the rest."""
    from eijax.memory import empty_memory, read, write

    with jax.enable_x64(True):
        rng = np.random.RandomState(3)
        k, v = (jnp.asarray(rng.randn(2, 3, L, 2, 8)) for _ in range(2))
        valid = jnp.ones((2, L), bool)
        q = jnp.asarray(rng.randn(2, 5, 4, 8))
        plain = scaled = empty_memory(2, 2, 8, dtype=jnp.float64)
        for s in range(3):
            plain = write(plain, k[:, s], v[:, s], valid, rule, 1e-6)
            scaled = write(scaled, k[:, s], v[:, s], valid, rule, 1e-6, strength=jnp.full((2, L, 2), 0.25))
        np.testing.assert_allclose(scaled.M, 0.25 * plain.M, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(read(scaled, q, 1e-6), read(plain, q, 1e-6), rtol=1e-6, atol=1e-6)
        uneven = empty_memory(2, 2, 8, dtype=jnp.float64)
        for s in range(3):  # a different β per token does change the read
            uneven = write(uneven, k[:, s], v[:, s], valid, rule, 1e-6,
                           strength=jnp.asarray(rng.uniform(0.1, 2.0, (2, L, 2))))
        assert not np.allclose(read(uneven, q, 1e-6), read(plain, q, 1e-6), rtol=1e-3)


def test_gradient_reaches_write_gate_and_matches_finite_differences():
    with jax.enable_x64(True):
        model = _model("delta", True, adapter=True)
        randomise_memory_path(model)
        check_gradient_by_finite_differences(model, "write_gate", S, n_checks=6)


def test_warm_start_adds_a_fresh_write_gate_and_refuses_to_drop_one(tmp_path):
    old = tiny_eijax_model("llama", eijax.MemoryConfig(sink=S, window=L, rule="delta", adapter=True))
    randomise_memory_path(old)
    save_memory_file(old, ["gate", "memory_adapter"], tmp_path / "old", "tiny")
    new = tiny_eijax_model("llama", eijax.MemoryConfig(sink=S, window=L, rule="delta", adapter=True, write_gate=True))
    assert init_from_trained(new, tmp_path / "old") == ["gate", "memory_adapter"]
    np.testing.assert_array_equal(new.blocks.gate.kernel[...], old.blocks.gate.kernel[...])
    np.testing.assert_array_equal(new.blocks.memory_adapter.k[...], old.blocks.memory_adapter.k[...])
    assert not np.any(new.blocks.write_gate.w[...]) and not np.any(new.blocks.write_gate.b[...])  # β = 1

    randomise_memory_path(new)
    save_memory_file(new, ["gate", "memory_adapter", "write_gate"], tmp_path / "new", "tiny")
    with pytest.raises(CheckpointMismatch, match="write_gate: True vs False"):
        init_from_trained(old, tmp_path / "new")
    with pytest.raises(ValueError, match="write_gate"):
        eijax.with_memory_config(new, eijax.MemoryConfig(sink=S, window=L, rule="delta", adapter=True))


def test_training_metrics_report_the_write_gate():
    from eijax.train.metrics import gate_stats

    fresh = gate_stats({"blocks": {"write_gate": {"w": np.zeros((2, 3, 8)), "b": np.zeros((2, 3))}}})
    assert fresh == {"write_strength_at_zero/all": 1.0, "write_gate_w_norm": 0.0}
    moved = gate_stats({"blocks": {"write_gate": {"w": np.ones((2, 3, 8)), "b": np.full((2, 3), -2.0)}}})
    assert moved["write_strength_at_zero/all"] < 0.3 and moved["write_gate_w_norm"] == pytest.approx(np.sqrt(48))
