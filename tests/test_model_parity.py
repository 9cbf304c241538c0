"""DESIGN §2.1 and §1.3: input that fits in sink + window is exactly the Hugging Face model."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import eijax
from eijax.testing import random_tokens, tiny_eijax_model, tiny_hf_model


def _rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("n_tokens", [3, 6, 14, 20])  # inside the sink, across it, exactly sink+window
def test_short_input_matches_transformers(family, n_tokens):
    hf, _ = tiny_hf_model(family)
    model = tiny_eijax_model(family, eijax.MemoryConfig(sink=4, window=16))
    toks = random_tokens((2, n_tokens))
    with torch.no_grad():
        ref = hf(torch.tensor(toks, dtype=torch.long)).logits.numpy()
    padded, valid = eijax.pad_to_layout(jnp.asarray(toks), model.memory_config)
    out = np.asarray(eijax.jit_forward(model, padded, valid))[:, :n_tokens]
    assert _rel_err(out, ref) <= 1e-4


def test_padded_batch_rows_match_unpadded(family):
    """Right padding in a batch changes nothing for the valid tokens of each row."""
    hf, _ = tiny_hf_model(family)
    model = tiny_eijax_model(family, eijax.MemoryConfig(sink=4, window=16))
    toks = random_tokens((2, 15))
    valid = np.ones((2, 20), bool)
    valid[1, 9:] = False
    padded = np.zeros((2, 20), np.int32)
    padded[:, :15] = toks
    out = np.asarray(eijax.jit_forward(model, jnp.asarray(padded), jnp.asarray(valid)))
    with torch.no_grad():
        ref_short = hf(torch.tensor(toks[1:2, :9], dtype=torch.long)).logits.numpy()
    assert _rel_err(out[1:2, :9], ref_short) <= 1e-4


def test_prefill_in_chunks_equals_one_pass(family):
    """Chunked prefill (any chunk sizes) gives the same logits as one pass: the cache is exact."""
    hf, _ = tiny_hf_model(family)
    model = tiny_eijax_model(family, eijax.MemoryConfig(sink=4, window=16))
    toks = jnp.asarray(random_tokens((1, 20)))
    h_all, _ = eijax.jit_prefill(model, model.init_state(1), toks)
    state, parts = model.init_state(1), []
    for lo, hi in [(0, 3), (3, 10), (10, 11), (11, 20)]:
        h, state = eijax.jit_prefill(model, state, toks[:, lo:hi])
        parts.append(h)
    np.testing.assert_allclose(np.concatenate(parts, axis=1), h_all, rtol=1e-5, atol=1e-5)
    assert int(state.fill) == 20


def test_prefill_overflow_is_an_error(family):
    hf, _ = tiny_hf_model(family)
    model = tiny_eijax_model(family, eijax.MemoryConfig(sink=4, window=16))
    _, state = eijax.jit_prefill(model, model.init_state(1), jnp.asarray(random_tokens((1, 15))))
    with pytest.raises(ValueError, match="overflows the cache"):
        model.prefill(state, jnp.asarray(random_tokens((1, 8))))


def test_memory_disabled_long_input_is_streaming_baseline(family):
    """enabled=False: compress drops the window and nothing is ever read from memory."""
    # Gemma 3's local layers keep their own sliding window across segments (README "Gemma 3";
    # tests/test_gemma3.py): this is about the global path, so every layer is made global here.
    ov = dict(layer_types=("full_attention",) * 3) if family == "gemma3" else {}
    hf, tensors = tiny_hf_model(family, **ov)
    model = tiny_eijax_model(family, eijax.MemoryConfig(sink=4, window=8, enabled=False), **ov)
    toks = jnp.asarray(random_tokens((1, 4 + 3 * 8)))
    out = np.asarray(eijax.jit_forward(model, toks))
    # Segment 2 sees only the sink and itself: equal to running [sink ; segment 2] through HF.
    seg2 = np.concatenate([np.asarray(toks[:, :4]), np.asarray(toks[:, 20:28])], axis=1)
    with torch.no_grad():
        ref = hf(torch.tensor(seg2, dtype=torch.long)).logits.numpy()
    assert _rel_err(out[:, 20:28], ref[:, 4:]) <= 1e-4
