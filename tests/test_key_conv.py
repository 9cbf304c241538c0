"""Memory keys from a causal convolution over the stream (MemoryConfig.key_conv): fresh taps are
today's keys exactly; trained taps convolve each written key with the keys before it across window
folds, the same in the layer-major training forward and in streaming prefill + compress, as a
float64 NumPy reference says; the taps get gradients; the PyTorch twin refuses the option."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import eijax
from eijax.cli import InputError
from eijax.testing import check_streamed_memory, padded_inputs, randomise_memory_path, tiny_eijax_model

S, L, N_SEG, TAPS = 3, 6, 4, 4
fwd = nnx.jit(lambda m, t, v: m.forward(t, v))


def _model(key_conv: int, rule: str = "delta", family: str = "llama"):
    mem = eijax.MemoryConfig(sink=S, window=L, rule=rule, adapter=True, key_conv=key_conv)
    return tiny_eijax_model(family, mem, dtype="float64")


def _conv_reference(windows, taps):
    """Each window's keys [NL, B, L, Hkv, d] convolved over each row's stream of real (written) tokens:
    padding is not part of the stream."""
    ks = np.concatenate([k for k, _ in windows], axis=2)      # [NL, B, T, Hkv, d]
    valid = np.concatenate([m for _, m in windows], axis=1)   # [B, T]
    out = np.zeros_like(ks)
    for b in range(ks.shape[1]):
        at = np.flatnonzero(valid[b])
        stream = ks[:, b, at]                                 # [NL, n, Hkv, d]
        for s in range(taps.shape[-1]):
            out[:, b, at[s:]] += taps[:, None, :, s, None] * stream[:, :len(at) - s]
    return np.split(out, len(windows), axis=2)


def test_fresh_taps_are_the_tokens_own_keys():
    with jax.enable_x64(True):
        tokens, valid = padded_inputs(S, L, N_SEG, 0)
        plain, conv = _model(0), _model(TAPS)
        randomise_memory_path(plain)
        nnx.update(conv, nnx.state(plain))  # every shared parameter equal; the taps fresh
        np.testing.assert_array_equal(np.asarray(fwd(plain, tokens, valid)), np.asarray(fwd(conv, tokens, valid)))


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_convolved_writes_match_the_reference_and_streaming(rule):
    with jax.enable_x64(True):
        model = _model(TAPS, rule, family="qwen3")
        randomise_memory_path(model, scale=0.3)
        taps = np.asarray(model.blocks.key_conv.taps[...])
        ad = model.blocks.memory_adapter
        adapt = lambda x, maps: np.einsum("lbthd,lhde->lbthe", x, np.asarray(maps))

        def writes(windows):  # convolved keys, then the adapter on keys and values
            keys = _conv_reference([(k, m) for k, _, m in windows], taps)
            return [(adapt(k, ad.k[...]), adapt(v, ad.v[...]), m) for (_, v, m), k in zip(windows, keys)]

        windows, _ = check_streamed_memory(model, *padded_inputs(S, L, N_SEG, 1), writes=writes)
        keys = _conv_reference([(k, m) for k, _, m in windows], taps)
        assert not np.allclose(keys[1], windows[1][0], rtol=1e-3)  # the taps really mix in earlier keys


def test_taps_get_gradients_through_the_memory():
    model = tiny_eijax_model("llama", eijax.MemoryConfig(sink=S, window=L, rule="delta", key_conv=TAPS))
    randomise_memory_path(model, scale=0.3)
    tokens, valid = padded_inputs(S, L, N_SEG, 2)

    graph, taps, rest = nnx.split(model, nnx.PathContains("key_conv"), ...)

    def loss(taps):
        return jnp.sum(nnx.merge(graph, taps, rest).forward(tokens, valid)[:, S + L:] ** 2)

    grad = np.asarray(jax.jit(jax.grad(loss))(taps)["blocks"]["key_conv"]["taps"][...])
    assert np.all(np.isfinite(grad)) and np.abs(grad[..., 1:]).max() > 0


def test_context_init_adds_the_mean_of_the_earlier_keys():
    model = tiny_eijax_model("llama", eijax.MemoryConfig(sink=S, window=L, key_conv=TAPS, key_conv_context=0.6))
    taps = np.asarray(model.blocks.key_conv.taps[...])
    np.testing.assert_allclose(taps[..., 0], 1.0)
    np.testing.assert_allclose(taps[..., 1:], 0.2, rtol=1e-6)


def test_bad_key_conv_and_the_twin_refuse():
    with pytest.raises(ValueError, match="key_conv"):
        eijax.MemoryConfig(key_conv=1)
    pytest.importorskip("torch")
    from convert.torch_model import EdgeInfiniteTorch

    model = tiny_eijax_model("llama", eijax.MemoryConfig(sink=S, window=L, key_conv=TAPS))
    with pytest.raises(InputError, match="key_conv"):
        EdgeInfiniteTorch(model.config, model.memory_config)
