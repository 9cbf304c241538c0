"""DESIGN §2.3, §2.4, §2.7 at the level of the memory functions (float64 references)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eijax import memory as mem_lib

B, T, H, HKV, D, N_SEG = 2, 5, 4, 2, 3, 4
EPS = 1e-6


def _sigma_np(x):
    return np.where(x > 0, x + 1.0, np.exp(x))


def _segments(seed=0):
    rng = np.random.RandomState(seed)
    k = rng.randn(N_SEG, B, T, HKV, D)
    v = rng.randn(N_SEG, B, T, HKV, D)
    valid = rng.rand(N_SEG, B, T) > 0.25
    return k, v, valid


def _scan_memory(k, v, valid, rule):
    """Memory before each segment, via jax.lax.scan over `write`."""
    def body(memory, xs):
        ks, vs, ms = xs
        return mem_lib.write(memory, ks, vs, ms, rule, EPS), memory

    init = mem_lib.Memory(jnp.zeros((B, HKV, D, D), jnp.float64), jnp.zeros((B, HKV, D), jnp.float64))
    final, before = jax.lax.scan(body, init, (jnp.asarray(k), jnp.asarray(v), jnp.asarray(valid)))
    return final, before


def test_linear_rule_scan_equals_exclusive_cumsum():
    k, v, valid = _segments()
    with jax.enable_x64(True):
        final, before = _scan_memory(k, v, valid, "linear")
        sk = _sigma_np(k) * valid[..., None, None]
        per_seg_M = np.einsum("sbtkd,sbtke->sbkde", sk, v)
        per_seg_z = sk.sum(axis=2)
        closed_M = np.cumsum(per_seg_M, axis=0) - per_seg_M  # exclusive cumulative sum
        closed_z = np.cumsum(per_seg_z, axis=0) - per_seg_z
        np.testing.assert_allclose(before.M, closed_M, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(before.z, closed_z, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(final.M, per_seg_M.sum(0), rtol=1e-12, atol=1e-12)


def _delta_reference(k, v, valid):
    """Token-by-token float64 loops; within a segment every token sees the memory from before it."""
    M = np.zeros((B, HKV, D, D))
    z = np.zeros((B, HKV, D))
    history = []
    for s in range(N_SEG):
        history.append((M.copy(), z.copy()))
        M_new, z_new = M.copy(), z.copy()
        for b in range(B):
            for t in range(T):
                if not valid[s, b, t]:
                    continue
                for g in range(HKV):
                    sk = _sigma_np(k[s, b, t, g])
                    retrieved = sk @ M[b, g] / (sk @ z[b, g] + EPS)
                    M_new[b, g] += np.outer(sk, v[s, b, t, g] - retrieved)
                    z_new[b, g] += sk
        M, z = M_new, z_new
    return M, z, history


def test_delta_rule_equals_token_loop_reference():
    k, v, valid = _segments(1)
    M_ref, z_ref, history = _delta_reference(k, v, valid)
    with jax.enable_x64(True):
        final, before = _scan_memory(k, v, valid, "delta")
        np.testing.assert_allclose(final.M, M_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(final.z, z_ref, rtol=1e-10, atol=1e-12)
        for s, (M_s, z_s) in enumerate(history):
            np.testing.assert_allclose(before.M[s], M_s, rtol=1e-10, atol=1e-12)


def test_delta_first_write_equals_linear():
    """The subtracted retrieval is exactly zero while memory is empty."""
    k, v, valid = _segments(2)
    with jax.enable_x64(True):
        empty = mem_lib.Memory(jnp.zeros((B, HKV, D, D), jnp.float64), jnp.zeros((B, HKV, D), jnp.float64))
        lin = mem_lib.write(empty, jnp.asarray(k[0]), jnp.asarray(v[0]), jnp.asarray(valid[0]), "linear", EPS)
        dlt = mem_lib.write(empty, jnp.asarray(k[0]), jnp.asarray(v[0]), jnp.asarray(valid[0]), "delta", EPS)
        np.testing.assert_array_equal(lin.M, dlt.M)


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_padding_writes_nothing(rule):
    k, v, valid = _segments(3)
    valid[:] = True
    valid[:, :, -2:] = False
    k2, v2 = k.copy(), v.copy()
    k2[:, :, -2:] = 1e3 * np.random.RandomState(9).randn(*k2[:, :, -2:].shape)  # junk in padded slots
    v2[:, :, -2:] = -7.0
    with jax.enable_x64(True):
        a, _ = _scan_memory(k, v, valid, rule)
        b, _ = _scan_memory(k2, v2, valid, rule)
        c, _ = _scan_memory(k[:, :, :-2], v[:, :, :-2], valid[:, :, :-2], rule)
        np.testing.assert_array_equal(a.M, b.M)
        np.testing.assert_allclose(a.M, c.M, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(a.z, c.z, rtol=1e-12, atol=1e-12)


def test_memory_is_float32_for_bf16_inputs():
    k, v, valid = _segments(4)
    empty = mem_lib.empty_memory(B, HKV, D)
    out = mem_lib.write(empty, jnp.asarray(k[0], jnp.bfloat16), jnp.asarray(v[0], jnp.bfloat16), jnp.asarray(valid[0]), "delta", EPS)
    assert out.M.dtype == jnp.float32 and out.z.dtype == jnp.float32
    q = jnp.asarray(np.random.RandomState(0).randn(B, T, H, D), jnp.bfloat16)
    assert mem_lib.read(out, q, EPS).dtype == jnp.float32


def test_gqa_query_head_reads_kv_head_h_div_group():
    """Query head h reads KV head h // (H / Hkv): heads 0,1 -> kv 0; heads 2,3 -> kv 1 (never tiled)."""
    rng = np.random.RandomState(5)
    with jax.enable_x64(True):
        M = rng.randn(B, HKV, D, D)
        z = rng.rand(B, HKV, D) + 0.5
        q = rng.randn(B, T, H, D)
        out = np.asarray(mem_lib.read(mem_lib.Memory(jnp.asarray(M), jnp.asarray(z)), jnp.asarray(q), EPS))
        group = H // HKV
        for h in range(H):
            g = h // group
            sq = _sigma_np(q[:, :, h])
            expect = np.einsum("btd,bde->bte", sq, M[:, g]) / (np.einsum("btd,bd->bt", sq, z[:, g])[..., None] + EPS)
            np.testing.assert_allclose(out[:, :, h], expect, rtol=1e-12)
        # a tiled (h % Hkv) assignment would read different heads: make sure the test can tell
        assert not np.allclose(out[:, :, 1], out[:, :, 3])
