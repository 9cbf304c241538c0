"""The memory's learned retention (MemoryConfig.decay): M and z scaled by γ = σ(logit) per KV head
before each window is written, exactly as the float64 reference says (the scanned forward and the
segment-by-segment stream alike), nothing forgotten by a window of padding, gradients that reach
the logits, and a warm start from a memory path trained without it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eijax
from eijax.memory import empty_memory, read, write
from eijax.testing import (check_gradient_by_finite_differences, check_streamed_memory, fold_memory_reference,
                           padded_inputs, randomise_memory_path, tiny_eijax_model)
from eijax.trained import CheckpointMismatch, init_from_trained, save_memory_file

S, L, N_SEG = 3, 6, 4


def _model(rule: str, decay: float, family: str = "llama", **kw):
    return tiny_eijax_model(family, eijax.MemoryConfig(sink=S, window=L, rule=rule, decay=decay, **kw), dtype="float64")


def test_config_rejects_a_retention_outside_0_1():
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="decay"):
            eijax.MemoryConfig(decay=bad)
    assert _model("delta", 1.0).blocks.memory_decay is None  # off: no parameter at all
    for bad in ({"decay_keep_heads": -1, "decay": 0.5}, {"decay_keep_heads": 1}):  # kept heads need a decay
        with pytest.raises(ValueError, match="decay_keep_heads"):
            eijax.MemoryConfig(**bad)
    with pytest.raises(ValueError, match="leave a KV head"):  # the tiny llama has 2 KV heads
        _model("delta", 0.5, decay_keep_heads=2)


def test_fresh_decay_starts_every_head_at_its_config_value():
    model = _model("delta", 0.7)
    np.testing.assert_allclose(np.asarray(model.blocks.memory_decay.retain()), 0.7, rtol=1e-6)


@pytest.mark.parametrize("rule,keep", [("linear", 0), ("delta", 0), ("delta", 1)])
def test_memory_equals_the_decayed_reference(rule, keep):
    """Every segment's write (padding included) against NumPy float64, with a random γ per layer and
    head; keep = 1: KV head 0 has no parameter and γ exactly 1 (a split memory)."""
    with jax.enable_x64(True):
        model = _model(rule, 0.6, family="qwen3", write_gate=True, decay_keep_heads=keep)
        randomise_memory_path(model, scale=0.5)
        retain = np.asarray(model.blocks.memory_decay.retain())
        assert model.blocks.memory_decay.logit[...].shape[-1] == retain.shape[-1] - keep
        assert (retain[:, :keep] == 1.0).all() and (retain[:, keep:] < 0.99).all()
        assert retain[:, keep:].std() > 0.02  # the heads really differ
        wg = (np.asarray(model.blocks.write_gate.w[...]), np.asarray(model.blocks.write_gate.b[...]))
        windows, final = check_streamed_memory(model, *padded_inputs(S, L, N_SEG, 1), write_gate=wg, retain=retain)
        _, z_kept = fold_memory_reference(windows, rule, model.memory_config.eps, write_gate=wg)[-1]
        assert not np.allclose(final.memory.z, z_kept, rtol=1e-3)  # the decay really changed the memory


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_decay_weighs_recent_windows_and_padding_forgets_nothing(rule):
    with jax.enable_x64(True):
        rng = np.random.RandomState(3)
        k, v = (jnp.asarray(rng.randn(2, 3, L, 2, 8)) for _ in range(2))
        valid = jnp.ones((2, L), bool)
        retain = jnp.asarray([0.5, 1.0])
        mem = empty_memory(2, 2, 8, dtype=jnp.float64)
        for s in range(3):
            mem = write(mem, k[:, s], v[:, s], valid, "linear", 1e-6, retain=retain)
        # linear rule: the window written n folds before the last weighs γ^n
        sig = lambda x: np.where(x > 0, x + 1.0, np.exp(x))
        sk = sig(np.asarray(k))
        want = sum(0.5 ** (2 - s) * sk[:, s].sum(axis=1)[:, 0] for s in range(3))
        np.testing.assert_allclose(np.asarray(mem.z[:, 0]), want, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(mem.z[:, 1]), sk.sum(axis=(1, 2))[:, 1], rtol=1e-12)
        # a row whose window is all padding keeps its memory exactly; the other row decays and writes
        pad = jnp.asarray([[False] * L, [True] * L])
        after = write(mem, k[:, 0], v[:, 0], pad, rule, 1e-6, retain=retain)
        np.testing.assert_array_equal(np.asarray(after.M[0]), np.asarray(mem.M[0]))
        np.testing.assert_array_equal(np.asarray(after.z[0]), np.asarray(mem.z[0]))
        assert not np.allclose(np.asarray(after.z[1]), np.asarray(mem.z[1]))
        q = jnp.asarray(rng.randn(2, 5, 4, 8))
        undecayed = empty_memory(2, 2, 8, dtype=jnp.float64)
        for s in range(3):
            undecayed = write(undecayed, k[:, s], v[:, s], valid, "linear", 1e-6)
        reads = np.asarray(read(mem, q, 1e-6)), np.asarray(read(undecayed, q, 1e-6))
        assert not np.allclose(reads[0][:, :, :2], reads[1][:, :, :2], rtol=1e-3)  # KV head 0 (γ 0.5) reads otherwise
        np.testing.assert_allclose(reads[0][:, :, 2:], reads[1][:, :, 2:], rtol=1e-10)  # KV head 1 (γ 1) as before


def test_gradient_reaches_the_retention_and_matches_finite_differences():
    with jax.enable_x64(True):
        model = _model("delta", 0.8, adapter=True)
        randomise_memory_path(model)
        check_gradient_by_finite_differences(model, "memory_decay", S)


def test_warm_start_adds_a_fresh_decay_and_refuses_to_drop_one(tmp_path):
    old = tiny_eijax_model("llama", eijax.MemoryConfig(sink=S, window=L, rule="delta", adapter=True))
    randomise_memory_path(old)
    save_memory_file(old, ["gate", "memory_adapter"], tmp_path / "old", "tiny")
    new = tiny_eijax_model("llama", eijax.MemoryConfig(sink=S, window=L, rule="delta", adapter=True, decay=0.5))
    assert init_from_trained(new, tmp_path / "old") == ["gate", "memory_adapter"]
    np.testing.assert_array_equal(new.blocks.gate.kernel[...], old.blocks.gate.kernel[...])
    np.testing.assert_allclose(np.asarray(new.blocks.memory_decay.retain()), 0.5, rtol=1e-6)

    randomise_memory_path(new)
    save_memory_file(new, ["gate", "memory_adapter", "memory_decay"], tmp_path / "new", "tiny")
    with pytest.raises(CheckpointMismatch, match="decay: 0.5 vs 1.0"):
        init_from_trained(old, tmp_path / "new")
    split = tiny_eijax_model("llama", eijax.MemoryConfig(sink=S, window=L, rule="delta", adapter=True, decay=0.5,
                                                         decay_keep_heads=1))
    with pytest.raises(CheckpointMismatch, match="decay_keep_heads: 0 vs 1"):  # another logit shape
        init_from_trained(split, tmp_path / "new")
    with pytest.raises(ValueError, match="decay"):
        eijax.with_memory_config(new, eijax.MemoryConfig(sink=S, window=L, rule="delta", adapter=True))
    again = tiny_eijax_model("llama", eijax.MemoryConfig(sink=S, window=L, rule="delta", adapter=True, decay=0.9))
    assert init_from_trained(again, tmp_path / "new") == ["gate", "memory_adapter", "memory_decay"]
    np.testing.assert_array_equal(again.blocks.memory_decay.logit[...], new.blocks.memory_decay.logit[...])


def test_training_metrics_report_the_retention():
    from eijax.train.metrics import gate_stats

    logit = np.log(np.asarray([[0.5, 0.9], [0.6, 0.99]]) / (1 - np.asarray([[0.5, 0.9], [0.6, 0.99]])))
    stats = gate_stats({"blocks": {"memory_decay": {"logit": logit}}})
    assert stats == pytest.approx({"retain/min": 0.5, "retain/mean": 0.7475, "retain/max": 0.99})
