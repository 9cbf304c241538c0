"""The output adapter (MemoryConfig.out_adapter): a fresh one changes nothing; a trained one changes
the attention output only once the memory holds something, so inputs that fit sink + window stay the
base model exactly; the streamed and the scanned forward agree with it; the update is A·B of the
attention output; B gets gradients; a warm start adds a fresh one; the twin refuses it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import eijax
from eijax.cli import InputError
from eijax.testing import (check_gradient_by_finite_differences, check_streamed_memory, padded_inputs,
                           random_tokens, randomise_memory_path, tiny_eijax_model)

S, L, N_SEG, RANK = 3, 6, 4, 4
fwd = nnx.jit(lambda m, t, v: m.forward(t, v))


def _model(rank: int, family: str = "llama"):
    mem = eijax.MemoryConfig(sink=S, window=L, rule="delta", adapter=True, out_adapter=rank)
    return tiny_eijax_model(family, mem, dtype="float64")


def _plain_and_adapted():
    plain, adapted = _model(0), _model(RANK)
    randomise_memory_path(plain)
    nnx.update(adapted, nnx.state(plain))  # every shared parameter equal; the output adapter fresh
    return plain, adapted


def test_a_fresh_adapter_adds_nothing():
    with jax.enable_x64(True):
        plain, adapted = _plain_and_adapted()
        tokens, valid = padded_inputs(S, L, N_SEG, 0)
        np.testing.assert_array_equal(np.asarray(fwd(plain, tokens, valid)), np.asarray(fwd(adapted, tokens, valid)))


def test_a_trained_adapter_acts_only_after_the_first_fold():
    with jax.enable_x64(True):
        plain, adapted = _plain_and_adapted()
        randomise_memory_path(adapted, seed=3, scale=0.5)  # b moves off zero (and the rest of the path with it)
        nnx.update(plain, nnx.state(adapted, nnx.Not(nnx.PathContains("out_adapter"))))
        tokens, valid = padded_inputs(S, L, N_SEG, 0)
        a, p = np.asarray(fwd(adapted, tokens, valid)), np.asarray(fwd(plain, tokens, valid))
        # sink and the first window: memory empty, so exactly the model without the adapter
        np.testing.assert_array_equal(a[:, :S + L], p[:, :S + L])
        assert np.abs(a[:, S + L:] - p[:, S + L:]).max() > 1e-3
        # a short input through the streaming path (prefill only) is the plain model's too
        short = jnp.asarray(random_tokens((1, S + L - 1), seed=4))
        logits = lambda m: np.asarray(m.logits(m.prefill(m.init_state(1), short, jnp.ones_like(short, bool))[0]))
        np.testing.assert_array_equal(logits(adapted), logits(plain))


def test_streaming_equals_the_scanned_forward_and_the_update_is_a_times_b():
    with jax.enable_x64(True):
        model = _model(RANK, family="qwen3")
        randomise_memory_path(model, scale=0.3)
        check_streamed_memory(model, *padded_inputs(S, L, N_SEG, 1),
                              writes=lambda ws: [(np.einsum("lbthd,lhde->lbthe", k, np.asarray(model.blocks.memory_adapter.k[...])),
                                                  np.einsum("lbthd,lhde->lbthe", v, np.asarray(model.blocks.memory_adapter.v[...])), m)
                                                 for k, v, m in ws])
        layer = jax.tree.map(lambda x: x[0], nnx.state(model.blocks.out_adapter))
        x = np.random.RandomState(0).randn(2, 3, model.config.n_heads * model.config.head_dim)
        adapter = nnx.merge(nnx.graphdef(model.blocks.out_adapter), layer)
        np.testing.assert_allclose(np.asarray(adapter(jnp.asarray(x))),
                                   x @ np.asarray(layer["a"][...]) @ np.asarray(layer["b"][...]), rtol=1e-12)


def test_b_gets_gradients_that_match_finite_differences():
    with jax.enable_x64(True):
        model = _model(RANK)
        randomise_memory_path(model, scale=0.3)
        check_gradient_by_finite_differences(model, "out_adapter", S, n_checks=12)


def test_warm_start_adds_a_fresh_adapter(tmp_path):
    from eijax.trained import init_from_trained, save_memory_file

    source = tiny_eijax_model("llama", eijax.MemoryConfig(sink=S, window=L, rule="delta", adapter=True))
    randomise_memory_path(source)
    stem = tmp_path / "mem"
    save_memory_file(source, ["gate", "memory_adapter"], stem, "tiny")
    target = tiny_eijax_model("llama", eijax.MemoryConfig(sink=S, window=L, rule="delta", adapter=True, out_adapter=RANK))
    init_from_trained(target, stem)
    np.testing.assert_array_equal(np.asarray(target.blocks.gate.kernel[...]), np.asarray(source.blocks.gate.kernel[...]))
    assert not np.any(np.asarray(target.blocks.out_adapter.b[...]))


def test_bad_rank_and_the_twin_refuse():
    with pytest.raises(ValueError, match="out_adapter"):
        eijax.MemoryConfig(out_adapter=-1)
    pytest.importorskip("torch")
    from convert.torch_model import EdgeInfiniteTorch

    model = tiny_eijax_model("llama", eijax.MemoryConfig(sink=S, window=L, out_adapter=RANK))
    with pytest.raises(InputError, match="out_adapter"):
        EdgeInfiniteTorch(model.config, model.memory_config)
