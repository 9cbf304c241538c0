"""Streaming generation (eijax.generate): routing, chunked streaming, folding, baselines, sampling."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import eijax
from eijax.generate import Engine, Generator, SamplingConfig, sample_token, truncate_middle, with_memory_config
from eijax.pretrained import params_from_hf
from eijax.testing import random_tokens, tiny_hf_model

MEM = eijax.MemoryConfig(sink=4, window=16)


def _model(family="llama", memory=MEM):
    hf, tensors = tiny_hf_model(family)
    model = eijax.build_model(eijax.model_config_from_hf(hf.config.to_dict()), memory)
    params_from_hf(model, tensors)
    _perturb_gate(model)
    return hf, model


def _perturb_gate(model):
    """A non-trivial gate, so that reading memory visibly changes outputs."""
    gate = nnx.state(model, nnx.PathContains("gate"))
    nnx.update(model, jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(1), a.shape, a.dtype), gate))


def _hf_greedy(hf, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _layout_logits(model, tokens):
    padded, valid = eijax.pad_to_layout(jnp.asarray([tokens], jnp.int32), model.memory_config)
    return np.asarray(model(padded, valid))[0, : len(tokens)]


def test_short_prompt_routes_to_plain_base_model(family):
    hf, model = _model(family)
    prompt = random_tokens((12,), seed=3).tolist()
    gen = Generator(model, "edgeinfinite")
    logits, _, _, _, kind = gen.prefill(prompt)
    assert kind == "plain"
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1].numpy()
    np.testing.assert_allclose(np.asarray(logits)[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    out = gen.generate(prompt, SamplingConfig(max_new_tokens=8))  # 12 + 8 = 20 = sink + window: never folds
    assert out.tokens == _hf_greedy(hf, prompt, 8)


@pytest.mark.parametrize("chunks", [(8, 3), (256, 64, 16)])
def test_streamed_scores_equal_segmented_forward(chunks):
    """Chunked streaming with folds == the training path (scan over segments), any chunk sizes."""
    _, model = _model()
    tokens = random_tokens((4 + 4 * 16 + 7,), seed=5).tolist()
    nll, state = Engine(model, chunks).score(model.init_state(1), tokens)
    logp = jax.nn.log_softmax(_layout_logits(model, tokens), axis=-1)
    ref = -np.take_along_axis(np.asarray(logp)[:-1], np.asarray(tokens[1:])[:, None], axis=-1)[:, 0]
    np.testing.assert_allclose(nll, ref, rtol=1e-4, atol=1e-4)
    assert bool(state.written[0]) and int(state.fill) == 4 + 7


def test_memory_changes_long_outputs():
    """Guard for the test above: with memory off, the same long input scores differently."""
    _, model = _model()
    tokens = random_tokens((4 + 3 * 16 + 5,), seed=5).tolist()
    on = Generator(model, "edgeinfinite").score(tokens)
    off = Generator(model, "streaming").score(tokens)
    np.testing.assert_allclose(on[:19], off[:19], rtol=1e-5, atol=1e-5)  # before the first fold
    assert np.abs(on[20:] - off[20:]).max() > 1e-3


def test_greedy_decode_across_folds_matches_teacher_forcing():
    """Decoding past several window folds == the segmented forward over prompt + generation."""
    _, model = _model()
    prompt = random_tokens((30,), seed=7).tolist()
    out = Generator(model, "edgeinfinite").generate(prompt, SamplingConfig(max_new_tokens=40))
    assert out.route == "stream" and len(out.tokens) == 40
    logits = _layout_logits(model, prompt + out.tokens)
    assert np.argmax(logits[len(prompt) - 1:-1], axis=-1).tolist() == out.tokens


def test_document_question_uses_question_last_layout():
    """Document streams, its partial window folds, the question starts a fresh segment (as in S-SFT)."""
    _, model = _model()
    doc = random_tokens((4 + 16 + 9,), seed=11).tolist()
    question = random_tokens((6,), seed=12).tolist()
    logits, state, _, _, kind = Generator(model, "edgeinfinite", chunk_sizes=(8,)).prefill(doc, question)
    assert kind == "stream" and int(state.fill) == 4 + 6
    padded_doc = doc + [0] * (16 - 9)
    layout = jnp.asarray([padded_doc + question + [0] * 10], jnp.int32)
    valid = jnp.asarray([[True] * len(doc) + [False] * 7 + [True] * 6 + [False] * 10])
    ref = np.asarray(model(layout, valid))[0, len(padded_doc) + 5]
    np.testing.assert_allclose(np.asarray(logits)[0], ref, rtol=1e-4, atol=1e-4)


def test_full_method_is_plain_attention_over_everything():
    hf, model = _model()
    prompt = random_tokens((45,), seed=9).tolist()  # longer than sink + window
    gen = Generator(model, "full", full_bucket=16)
    out = gen.generate(prompt, SamplingConfig(max_new_tokens=6))
    assert gen.engine_for(51).cache_size >= 51 and out.route == "plain"
    assert out.tokens == _hf_greedy(hf, prompt, 6)


def test_full_method_with_a_blocked_cache_matches_the_base_model(monkeypatch):
    """A 64-slot `full` cache in blocks of 8: the same greedy tokens as transformers and the same
    prompt logits as the one-shot softmax."""
    hf, model = _model()
    prompt = random_tokens((45,), seed=9).tolist()
    one_shot, *_ = Generator(model, "full", full_bucket=64).prefill(prompt)
    monkeypatch.setattr(eijax.layers, "KV_BLOCK", 8)
    gen = Generator(model, "full", full_bucket=64)
    logits, *_ = gen.prefill(prompt)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(one_shot), rtol=1e-5, atol=1e-5)
    assert gen.generate(prompt, SamplingConfig(max_new_tokens=6)).tokens == _hf_greedy(hf, prompt, 6)


def test_full_method_truncates_the_middle_at_max_context():
    _, model = _model()
    gen = Generator(model, "full", max_context=32, full_bucket=8)
    out = gen.generate(random_tokens((100,), seed=1).tolist(), SamplingConfig(max_new_tokens=4))
    assert out.prompt_tokens == 28 and gen.engine_for(32).cache_size == 32
    assert truncate_middle(list(range(10)), 4) == [0, 1, 8, 9]


def test_streaming_method_sees_sink_and_current_window_only():
    hf, model = _model()
    prompt = random_tokens((4 + 16 + 16 + 5,), seed=4).tolist()
    logits, *_ = Generator(model, "streaming").prefill(prompt)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt[:4] + prompt[-5:]])).logits[0, -1].numpy()
    np.testing.assert_allclose(np.asarray(logits)[0], ref, rtol=1e-4, atol=1e-4)


def test_streaming_memory_is_the_same_at_2k_and_32k():
    """Constant memory: after 2K and 32K streamed tokens the live device bytes and the compiled
    programs are the same (nothing was recompiled or grown for the longer input)."""
    _, model = _model(memory=eijax.MemoryConfig(sink=8, window=56))
    engine = Engine(model, (64, 16, 1))

    def run(n):
        tokens = random_tokens((n,), seed=n).tolist()
        logits, state = engine.prefill(engine.init_state(), tokens)
        gen = list(engine.decode(state, logits, SamplingConfig(max_new_tokens=70)))  # folds during decoding
        live = sum(a.nbytes for a in jax.live_arrays())
        return live, engine._prefill._cache_size(), engine._decode_executable(), len(gen)

    short, long = run(2048), run(32768)
    assert short == long


def test_sampling_greedy_temperature_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    draw = lambda t, p: np.asarray(jax.vmap(lambda k: sample_token(logits, k, jnp.float32(t), jnp.float32(p))[0])(keys))
    assert set(draw(0.0, 1.0)) == {0}
    assert set(draw(1.0, 0.6)) == {0, 1}          # nucleus: 0.5 < 0.6, then 0.3 takes it past
    assert set(draw(1.0, 1.0)) == {0, 1, 2, 3}
    frac0 = np.mean(draw(1.0, 1.0) == 0)
    assert 0.4 < frac0 < 0.6


def test_seeded_sampling_is_reproducible_and_stops_at_stop_id():
    _, model = _model()
    gen = Generator(model, "edgeinfinite")
    prompt = random_tokens((25,), seed=2).tolist()
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    a, b = gen.generate(prompt, cfg).tokens, gen.generate(prompt, cfg).tokens
    assert a == b and len(a) == 12
    stop = a[4]
    cut = gen.generate(prompt, dataclasses.replace(cfg, stop_ids=(stop,))).tokens
    assert cut == a[: a.index(stop)]


def test_with_memory_config_keeps_parameters():
    _, model = _model()
    other = with_memory_config(model, dataclasses.replace(MEM, window=40, enabled=False))
    assert other.memory_config.window == 40 and not other.blocks.use_memory
    np.testing.assert_array_equal(other.blocks.gate.kernel[...], model.blocks.gate.kernel[...])


def test_geometry_defaults_to_the_checkpoints_and_a_mismatch_warns(caplog):
    """A memory path is trained for one sink + window and does not transfer to another, so the
    inference CLIs default to the checkpoint's geometry, and running it at another one says so."""
    import json

    from eijax.generate import inference_memory
    from eijax.trained import PACKAGED_DIR, trained_memory

    trained = json.loads((PACKAGED_DIR / "smollm2-memory.json").read_text())["memory"]
    mem = inference_memory(None, None, "smollm2-memory")
    assert (mem.sink, mem.window) == (trained["sink"], trained["window"])
    assert (inference_memory(8, None, "smollm2-memory").sink, inference_memory(None, 100, None).window) == (8, 100)
    assert inference_memory(None, None, None) == eijax.MemoryConfig()

    saved = eijax.MemoryConfig(sink=32, window=256, rule="delta", adapter=True)
    with caplog.at_level("WARNING", logger="eijax.trained"):
        same = trained_memory(saved, eijax.MemoryConfig(sink=32, window=256))
        assert not caplog.records and (same.rule, same.adapter) == ("delta", True)
        trained_memory(saved, eijax.MemoryConfig(sink=64, window=512))
    assert "trained with sink 32 + window 256" in caplog.text and "sink 64 + window 512" in caplog.text


def test_engines_share_decode_weights_and_see_refreshed_params():
    """Engines of one Generator share one per-layer copy of the weights (decode's), and after the
    model's parameters change (training's in-loop eval) `refresh_params` makes decode use the new
    ones: the decoded tokens equal a fresh Generator's on the changed model."""
    _, model = _model()
    gen = Generator(model, "edgeinfinite", chunk_sizes=(8, 1))
    sampling = SamplingConfig(max_new_tokens=12)
    prompt = random_tokens((40,), seed=3).tolist()
    full = Generator(model, "full", chunk_sizes=(8, 1), max_context=64, full_bucket=16)
    short, long = full.engine_for(10), full.engine_for(40)
    assert short is not long and short.layer_params is long.layer_params
    before = gen.generate(prompt, sampling).tokens
    blocks = model.blocks
    blocks.mlp_norm.scale.set_value(blocks.mlp_norm.scale[...] * -3.0)  # a change decode must see
    gen.refresh_params()
    after = gen.generate(prompt, sampling).tokens
    assert after == Generator(model, "edgeinfinite", chunk_sizes=(8, 1)).generate(prompt, sampling).tokens
    assert after != before
