"""The exact store (MemoryConfig.store): what a fold keeps, what it writes to memory, and that the
engine streams with it as the model's own calls do."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eijax import store as store_lib
from eijax.config import MemoryConfig
from eijax.generate import Engine, SamplingConfig
from eijax.testing import memory_write_reference, random_tokens, randomise_memory_path, tiny_eijax_model

SINK, WINDOW, STORE = 4, 16, 5


def _model(store: int = STORE, **memory):
    model = tiny_eijax_model("llama", MemoryConfig(sink=SINK, window=WINDOW, store=store, **memory))
    randomise_memory_path(model)
    return model


def _sigma(x):
    return np.where(x > 0, x + 1.0, np.exp(x))


def test_select_keeps_the_best_valid_tokens_in_window_order():
    score = jnp.asarray([[[5.0, 0.0], [1.0, 9.0], [7.0, 8.0], [9.0, 1.0], [3.0, 2.0]]])  # [B=1, W=5, Hkv=2]
    valid = jnp.asarray([[True, True, True, False, True]])
    idx = np.asarray(store_lib.select(score, valid, 3))
    assert idx[0, :, 0].tolist() == [0, 2, 4]  # token 3 scores best but is padding
    assert idx[0, :, 1].tolist() == [1, 2, 4]
    few = jnp.asarray([[True, False, False, False, True]])
    idx = np.asarray(store_lib.select(score, few, 3))
    assert idx[0, :2, 0].tolist() == [0, 4] and idx[0, :2, 1].tolist() == [0, 4]  # the valid ones first, in order
    assert np.asarray(store_lib.kept_valid(few, 3)).tolist() == [[True, True, False]]
    kept = np.asarray(store_lib.kept_mask(store_lib.select(score, few, 3), few))
    assert kept[0, :, 0].tolist() == [True, False, False, False, True]


def _novelty(M, z, k, v, eps):
    sk = _sigma(k)
    read = np.einsum("btkd,bkde->btke", sk, M) / (np.einsum("btkd,bkd->btk", sk, z)[..., None] + eps)
    return np.linalg.norm(v - read, axis=-1)


@pytest.mark.parametrize("enabled", [True, False])
def test_compress_keeps_the_most_novel_tokens_exactly_and_writes_only_the_rest(enabled):
    model = _model(rule="delta", enabled=enabled)
    mem = model.memory_config
    prefill = nnx.jit(lambda m, s, t, v: m.prefill(s, t, v))
    compress = nnx.jit(lambda m, s: m.compress(s))
    tokens = jnp.asarray(random_tokens((2, SINK + 2 * WINDOW), seed=3))
    state = model.init_state(2)
    _, state = prefill(model, state, tokens[:, :SINK + WINDOW], jnp.ones((2, SINK + WINDOW), bool))
    state = compress(model, state)  # the first fold: empty memory
    # the second window has padding at the end of row 1, and the first fold's kept tokens in front
    room = WINDOW - STORE
    valid = np.ones((2, room), bool)
    valid[1, -3:] = False
    _, before = prefill(model, state, tokens[:, SINK + WINDOW:SINK + WINDOW + room], jnp.asarray(valid))
    after = compress(model, before)

    assert int(after.fill) == SINK + STORE
    np.testing.assert_array_equal(np.asarray(after.valid[:, :SINK]), np.asarray(before.valid[:, :SINK]))
    assert np.asarray(after.valid[:, SINK:SINK + STORE]).all() and not np.asarray(after.valid[:, SINK + STORE:]).any()
    kb, vb = np.asarray(before.k[:, :, SINK:], np.float64), np.asarray(before.v[:, :, SINK:], np.float64)
    wv = np.asarray(before.valid[:, SINK:])
    M, z = np.asarray(before.memory.M, np.float64), np.asarray(before.memory.z, np.float64)
    n_layers, _, _, hkv, _ = kb.shape
    ref_M, ref_z = M.copy(), z.copy()
    for layer in range(n_layers):
        score = np.where(wv[:, :, None], _novelty(M[layer], z[layer], kb[layer], vb[layer], mem.eps), -np.inf)
        for b in range(2):
            for h in range(hkv):
                idx = np.sort(np.argsort(-score[b, :, h], kind="stable")[:STORE])
                np.testing.assert_allclose(np.asarray(after.k[layer, b, SINK:SINK + STORE, h]), kb[layer, b, idx, h],
                                           rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(np.asarray(after.v[layer, b, SINK:SINK + STORE, h]), vb[layer, b, idx, h],
                                           rtol=1e-6, atol=1e-6)
                if enabled:  # the reference writes one head at a time: only the tokens that left the cache
                    evicted = wv[b].copy()
                    evicted[idx] = False
                    m1, z1 = memory_write_reference(M[layer:layer + 1, b:b + 1, h:h + 1], z[layer:layer + 1, b:b + 1, h:h + 1],
                                                    kb[layer:layer + 1, b:b + 1, :, h:h + 1], vb[layer:layer + 1, b:b + 1, :, h:h + 1],
                                                    evicted[None], "delta", mem.eps)
                    ref_M[layer, b, h], ref_z[layer, b, h] = m1[0, 0, 0], z1[0, 0, 0]
    np.testing.assert_allclose(np.asarray(after.memory.M), ref_M, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(after.memory.z), ref_z, rtol=2e-5, atol=2e-5)
    assert np.asarray(after.written).tolist() == [enabled, enabled]


def test_every_token_is_written_once_when_it_leaves_the_cache():
    """Layer 0's keys depend on the token only, so with the linear rule the memory's z plus the
    store's σ(k) must equal z of the plain fold over the same tokens: nothing lost, nothing twice."""
    prefill = nnx.jit(lambda m, s, t, v: m.prefill(s, t, v))
    compress = nnx.jit(lambda m, s: m.compress(s))
    tokens = random_tokens((1, 200), seed=5)

    def stream(model):
        state, at, cap = model.init_state(1), 0, model.memory_config.cache_size
        while at < tokens.shape[1]:
            n = min(cap - int(state.fill), tokens.shape[1] - at)
            _, state = prefill(model, state, jnp.asarray(tokens[:, at:at + n]), jnp.ones((1, n), bool))
            at += n
            state = compress(model, state)
        return state

    plain, kept = stream(_model(store=0, rule="linear")), stream(_model(rule="linear"))
    in_store = _sigma(np.asarray(kept.k[0, :, SINK:SINK + STORE], np.float64)).sum(axis=1)
    np.testing.assert_allclose(np.asarray(kept.memory.z[0]) + in_store, np.asarray(plain.memory.z[0]), rtol=1e-5)
    assert not np.allclose(np.asarray(kept.memory.z[0]), np.asarray(plain.memory.z[0]), rtol=1e-3)


def test_engine_streams_with_a_store_as_the_model_calls_do():
    """Chunks larger than the room a fold leaves (window - store) are used only in the first window;
    the engine's logits equal the model's own prefill/compress calls at the same fold points."""
    model = _model()
    engine = Engine(model, (WINDOW, 8, 1))
    engine.warm_up()
    tokens = random_tokens((1, 70), seed=7)[0].tolist()
    logits, state = engine.prefill(engine.init_state(), tokens)

    prefill = nnx.jit(lambda m, s, t, v: m.prefill(s, t, v))
    ref, at = model.init_state(1), 0
    while at < len(tokens):
        if int(ref.fill) == model.memory_config.cache_size:
            ref = model.compress(ref)
        n = min(model.memory_config.cache_size - int(ref.fill), len(tokens) - at)
        hidden, ref = prefill(model, ref, jnp.asarray([tokens[at:at + n]]), jnp.ones((1, n), bool))
        at += n
    want = model.logits(hidden[:, -1])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-4, atol=1e-4)
    assert int(state.fill) == int(ref.fill)

    # greedy decoding folds at the same points: 30 tokens cross two folds of the 11 free slots
    got = list(engine.decode(state, logits, SamplingConfig(max_new_tokens=30, stop_ids=())))
    token, expected = int(jnp.argmax(want[0])), []
    for _ in range(30):
        expected.append(token)
        if int(ref.fill) == model.memory_config.cache_size:
            ref = model.compress(ref)
        hidden, ref = prefill(model, ref, jnp.asarray([[token]]), jnp.ones((1, 1), bool))
        token = int(jnp.argmax(model.logits(hidden[:, -1])[0]))
    assert got == expected


def test_store_must_leave_room_in_the_window():
    with pytest.raises(ValueError, match="store must lie"):
        MemoryConfig(sink=4, window=16, store=16)
    with pytest.raises(ValueError, match="store_score"):
        MemoryConfig(store=4, store_score="random")
