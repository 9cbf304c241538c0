"""DESIGN §2.2-2.4, 2.6, 2.8 on the whole model, in float64, with random (non-initial) gates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import eijax
from eijax.layers import MEMORY_PATH
from eijax.testing import (check_streamed_memory, padded_inputs, random_tokens, randomise_memory_path, segment_loop,
                           tiny_eijax_model)
from eijax.trained import param_filter

S, L, N_SEG = 3, 6, 4
N = S + N_SEG * L
CASES = [("llama", "linear", "linear"), ("qwen3", "delta", "head_linear"), ("qwen2", "delta", "scalar")]


def _model(family, rule, gate, **mem_kw):
    mem = eijax.MemoryConfig(sink=S, window=L, rule=rule, gate=gate, **mem_kw)
    model = tiny_eijax_model(family, mem, dtype="float64")
    # Random gates: at the initial value (W = 0) some wiring mistakes would cancel out.
    rng = np.random.RandomState(0)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.PathContains("gate"))):
        var_in_model = model
        for p in path:
            var_in_model = getattr(var_in_model, str(p))
        var_in_model.set_value(jnp.asarray(rng.randn(*var.shape) * (0.5 if var.ndim > 2 else 1.0)))
    return model


def _inputs(seed=0):
    return padded_inputs(S, L, N_SEG, seed)


@pytest.mark.parametrize("family,rule,gate", CASES)
def test_scan_equals_python_loop_and_memory_references(family, rule, gate):
    with jax.enable_x64(True):
        model = _model(family, rule, gate)
        # Memory after each segment == float64 reference over the recorded pre-RoPE window keys.
        check_streamed_memory(model, *_inputs())


def test_causality_later_segment_changes_nothing_earlier():
    with jax.enable_x64(True):
        model = _model("llama", "delta", "linear")
        tokens, valid = _inputs()
        changed = tokens.at[:, S + 2 * L:].set((tokens[:, S + 2 * L:] + 5) % 97)  # segments 2, 3
        fwd = nnx.jit(lambda m, t, v: m.forward(t, v))
        a, b = np.asarray(fwd(model, tokens, valid)), np.asarray(fwd(model, changed, valid))
        np.testing.assert_array_equal(a[:, :S + 2 * L], b[:, :S + 2 * L])
        assert not np.allclose(a[:, S + 2 * L:], b[:, S + 2 * L:])
        # within a segment too: changing token t changes nothing before t
        mid = S + L + 3
        changed = tokens.at[:, mid].set((tokens[:, mid] + 1) % 97)
        c = np.asarray(fwd(model, changed, valid))
        np.testing.assert_array_equal(a[:, :mid], c[:, :mid])
        assert not np.allclose(a[:, mid], c[:, mid])


def test_padded_tokens_change_no_output_and_no_memory():
    with jax.enable_x64(True):
        model = _model("qwen3", "delta", "linear")
        tokens, valid = _inputs()
        junk = jnp.where(valid, tokens, (tokens * 7 + 3) % 97)
        assert not np.array_equal(np.asarray(junk), np.asarray(tokens))
        a, _, _, sa = segment_loop(model, tokens, valid)
        b, _, _, sb = segment_loop(model, junk, valid)
        keep = np.asarray(valid)
        np.testing.assert_array_equal(a[keep], b[keep])
        np.testing.assert_array_equal(sa.memory.M, sb.memory.M)
        np.testing.assert_array_equal(sa.memory.z, sb.memory.z)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: memory in its global layers only
def test_empty_memory_bypasses_gate_exactly(family):
    """Until something is written, outputs equal the memory-free model whatever the gate weights."""
    with jax.enable_x64(True):
        model = _model(family, "linear", "linear")
        plain = tiny_eijax_model(family, eijax.MemoryConfig(sink=S, window=L, enabled=False), dtype="float64")
        tokens, valid = _inputs()
        fwd = nnx.jit(lambda m, t, v: m.forward(t, v))
        a, b = np.asarray(fwd(model, tokens, valid)), np.asarray(fwd(plain, tokens, valid))
        np.testing.assert_array_equal(a[:, :S + L], b[:, :S + L])   # sink and segment 0
        assert not np.allclose(a[:, S + L:], b[:, S + L:])          # memory is read from segment 1 on


def _gate_loss(model, tokens):
    graph, gate, rest = nnx.split(model, nnx.PathContains("gate"), ...)
    weights = jnp.asarray(np.random.RandomState(1).randn(tokens.shape[0], N_SEG * L, model.config.d_model))

    def loss(gate_params):
        m = nnx.merge(graph, gate_params, rest)
        return jnp.sum(m.forward(tokens)[:, S:] * weights) / weights.size

    return loss, gate


def test_gradient_through_scan_matches_finite_differences():
    with jax.enable_x64(True):
        model = _model("llama", "delta", "linear", remat="segment")
        tokens = jnp.asarray(random_tokens((1, N), seed=3))
        loss, gate = _gate_loss(model, tokens)
        grads = jax.jit(jax.grad(loss))(gate)
        flat_g, unravel = jax.flatten_util.ravel_pytree(grads)
        flat_p, _ = jax.flatten_util.ravel_pytree(gate)
        assert np.all(np.isfinite(flat_g)) and np.abs(flat_g).max() > 0
        f = jax.jit(lambda p: loss(unravel(p)))
        rng = np.random.RandomState(0)
        for i in rng.choice(flat_p.size, 6, replace=False):
            h = 1e-6
            e = jnp.zeros_like(flat_p).at[i].set(h)
            fd = (f(flat_p + e) - f(flat_p - e)) / (2 * h)
            np.testing.assert_allclose(flat_g[i], fd, rtol=1e-5, atol=1e-10)


def test_remat_does_not_change_gradients():
    with jax.enable_x64(True):
        tokens = jnp.asarray(random_tokens((1, N), seed=4))
        out = {}
        for remat in ("none", "both"):
            loss, gate = _gate_loss(_model("qwen2", "linear", "linear", remat=remat), tokens)
            out[remat] = jax.flatten_util.ravel_pytree(jax.jit(jax.grad(loss))(gate))[0]
        np.testing.assert_allclose(out["none"], out["both"], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: local and global layers, per-layer kinds
def test_unrolled_layers_equal_the_layer_scan(family):
    """MemoryConfig.layer_loop: the forward's values and gradients do not depend on how its layers
    are looped (scan on accelerators, unrolled on CPU)."""
    with jax.enable_x64(True):
        tokens = jnp.asarray(random_tokens((1, N - 2), seed=8))
        out = {}
        for loop in ("scan", "unroll"):
            mem = eijax.MemoryConfig(sink=S, window=L, rule="delta", adapter=True, write_gate=True, layer_loop=loop)
            model = tiny_eijax_model(family, mem, dtype="float64")
            randomise_memory_path(model)
            graph, mem_path, rest = nnx.split(model, param_filter(MEMORY_PATH), ...)
            weights = jnp.asarray(np.random.RandomState(3).randn(1, N - 2, model.config.d_model))
            loss = lambda p: jnp.sum(nnx.merge(graph, p, rest).forward(tokens) * weights)
            value, grads = jax.jit(jax.value_and_grad(loss))(mem_path)
            out[loop] = (float(value), jax.flatten_util.ravel_pytree(grads)[0])
        assert out["scan"][0] == pytest.approx(out["unroll"][0], rel=1e-12)
        assert np.abs(out["scan"][1]).max() > 0
        np.testing.assert_allclose(out["unroll"][1], out["scan"][1], rtol=1e-10, atol=1e-13)


def test_stop_gradient_every_segment_cuts_memory_path():
    """With a cut every segment, the gate of segment s only sees gradient through the read."""
    with jax.enable_x64(True):
        tokens = jnp.asarray(random_tokens((1, N), seed=5))
        grads = []
        for every in (0, 1):
            loss, gate = _gate_loss(_model("llama", "delta", "linear", stop_gradient_every=every), tokens)
            g = jax.flatten_util.ravel_pytree(jax.jit(jax.grad(loss))(gate))[0]
            assert np.all(np.isfinite(g))
            grads.append(g)
        assert not np.allclose(grads[0], grads[1])


def test_short_last_segment_equals_its_padded_layout():
    """The trainer cuts a last segment's trailing padding: hidden states of the kept slots and the
    gate gradient must not change (padding is never attended to)."""
    with jax.enable_x64(True):
        model = _model("qwen3", "delta", "head_linear")
        tokens = jnp.asarray(random_tokens((2, N), seed=6))
        valid = np.ones((2, N), bool)
        valid[:, N - L + 2:] = False  # the last segment holds 2 real tokens
        valid[1, N - L + 1:] = False
        valid = jnp.asarray(valid)
        keep = N - L + 3  # cut to 3 slots: one padding slot stays
        full = model.forward(tokens, valid)
        short = model.forward(tokens[:, :keep], valid[:, :keep])
        np.testing.assert_allclose(np.asarray(short), np.asarray(full[:, :keep]), rtol=1e-12, atol=1e-12)
        graph, gate, rest = nnx.split(model, nnx.PathContains("gate"), ...)

        def grad(n):
            def loss(g):
                h = nnx.merge(graph, g, rest).forward(tokens[:, :n], valid[:, :n])
                return jnp.sum(h[:, :keep] * jnp.where(valid[:, :keep, None], 1.0, 0.0) ** 2 * h[:, :keep])
            return jax.flatten_util.ravel_pytree(jax.grad(loss)(gate))[0]

        np.testing.assert_allclose(grad(keep), grad(N), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("remat", ["none", "segment"])
def test_frozen_local_keeps_memory_path_gradients(remat):
    """frozen_local skips the backward of the sink and segment 0: values and the gradients of every
    memory-path parameter (gate, memory adapter, write gate) stay exactly the same."""
    with jax.enable_x64(True):
        model = _model("llama", "delta", "linear", adapter=True, write_gate=True, remat=remat)
        randomise_memory_path(model)
        tokens = jnp.asarray(random_tokens((1, N - 2), seed=7))  # a short last segment too
        graph, mem_path, rest = nnx.split(model, param_filter(MEMORY_PATH), ...)
        weights = jnp.asarray(np.random.RandomState(2).randn(1, N - 2, model.config.d_model))

        def loss(p, frozen_local):
            return jnp.sum(nnx.merge(graph, p, rest).forward(tokens, frozen_local=frozen_local) * weights)

        for fn in (loss, jax.grad(loss)):
            a, b = jax.jit(fn, static_argnums=1)(mem_path, False), jax.jit(fn, static_argnums=1)(mem_path, True)
            np.testing.assert_allclose(jax.flatten_util.ravel_pytree(a)[0], jax.flatten_util.ravel_pytree(b)[0],
                                       rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: local layers read their own history
def test_unrolled_prefill_equals_scanned(family):
    """Decode's unrolled layer loop over per-layer weights and caches computes what the scan over
    the stacked ones does: same hidden states and the same state, after memory holds two windows."""
    from eijax.model import split_caches, split_layers, stack_caches

    with jax.enable_x64(True):
        model = _model(family, "delta", "linear")
        tokens, valid = _inputs()
        state = model.init_state(tokens.shape[0])
        for i in range(2):  # fill and fold two windows, so the memory and (gemma3) history are not empty
            _, state = model.prefill(state, tokens[:, S + i * L:S + (i + 1) * L] if i else tokens[:, :S + L])
            state = model.compress(state)
        step = tokens[:, -3:]
        want_h, want = model.prefill(state, step)
        got_h, got = model.prefill_unrolled(split_layers(model), split_caches(state), step)
        np.testing.assert_allclose(got_h, want_h, rtol=1e-12, atol=1e-12)
        for a, b in zip(jax.tree.leaves(stack_caches(got)), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
