"""key_fit learns a memory read that binds when its key input carries the name, and only then."""

from __future__ import annotations

import numpy as np

from eijax.eval.key_fit import causal_mean, fit, scores


def _planted_traces(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Four needles of three value tokens each among 28 filler tokens. The hidden state at a value's
    tokens carries its name's code, as does the query's; the per-head keys are noise."""
    rng = np.random.default_rng(seed)
    d_hidden, t = 16, 40
    codes = rng.standard_normal((8, d_hidden)) * 2
    traces = []
    for _ in range(n):
        names = rng.choice(8, size=4, replace=False)
        hidden = rng.standard_normal((t, d_hidden)) * 0.5
        values = np.zeros((4, t), bool)
        slots = rng.permutation(t)[:12].reshape(4, 3)
        for j, at in enumerate(slots):
            values[j, at] = True
            hidden[at] += codes[names[j]]
        queries = codes[names] + rng.standard_normal((4, d_hidden)) * 0.5   # query j asks for needle j
        traces.append({"hidden_q": np.stack([queries, queries], 1)[:, None].astype(np.float32),
                       "hidden_k": hidden[None].astype(np.float16),
                       "keys": rng.standard_normal((1, t, 1, 8)).astype(np.float16),
                       "values": values, "weight": np.ones(t, np.float32),
                       "value_tokens": values.sum(1), "written": np.int64(t)})
    return traces


def test_fit_finds_binding_in_the_hidden_state_and_none_in_noise():
    traces = _planted_traces(40)
    out = fit(traces, 24, ["hidden", "heads"], rank=8, steps=200, lr=1e-2)
    assert out["hidden"]["pick"][0] > 0.8 and out["hidden"]["binding"][0] > 2
    assert out["heads"]["pick"][0] < 0.55          # chance is 0.25: held out, noise keys cannot bind
    assert out["heads"]["binding"][0] < 1.5


def test_scores_pick_binding_and_share():
    # two samples, one layer; value tokens 2 each of 100 written (uniform share 0.02)
    mass = np.array([[0.10, 0.02, 0.02, 0.02], [0.02, 0.04, 0.01, 0.01]])
    got = scores(mass, np.full((2, 4), 2), np.array([100, 100]))
    assert got["pick"] == 0.5                        # the first sample's asked value wins, the second's does not
    np.testing.assert_allclose(got["binding"], np.sqrt(5.0 * (0.02 / 0.02)))
    np.testing.assert_allclose(got["share"], 0.06)


def test_causal_mean_averages_each_positions_last_n():
    x = np.random.default_rng(0).standard_normal((2, 9, 3))
    got = causal_mean(x, 4)
    for t in range(9):
        np.testing.assert_allclose(got[:, t], x[:, max(0, t - 3):t + 1].mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(causal_mean(x, 20)[:, -1], x.mean(1), rtol=1e-5, atol=1e-6)  # n past the start


def test_hedgehog_features_are_a_positive_kernel_of_twice_the_rank_and_bind_planted_names():
    import jax.numpy as jnp

    from eijax.eval.key_fit import hedgehog

    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 8)), jnp.float32)
    phi = np.asarray(hedgehog(x))
    assert phi.shape == (5, 16) and (phi > 0).all()
    np.testing.assert_allclose(phi.sum(-1), 2.0, rtol=1e-6)          # each half is a softmax over features
    np.testing.assert_allclose(phi[:, :8], np.asarray(hedgehog(-x))[:, 8:], rtol=1e-6)
    # the spiky kernel, like the memory's, learns the planted binding from the hidden state, and cannot
    # from noise; started from the softmax fit it keeps it
    traces = _planted_traces(40)
    for kernel in ("hedgehog", "softmax_then_hedgehog"):
        out = fit(traces, 24, ["hidden", "heads"], rank=8, steps=200, lr=1e-2, kernel=kernel)
        assert out["hidden"]["pick"][0] > 0.8, kernel
        assert out["heads"]["pick"][0] < 0.55, kernel
