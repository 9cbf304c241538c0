"""Tiny random Hugging Face models of each supported family, built locally (no hub).

Used by the tests and benchmarks: a transformers model with random weights plus its tensors as
numpy, and the matching eijax model.
"""

from __future__ import annotations

import functools

import numpy as np

from eijax.config import SUPPORTED_FAMILIES as FAMILIES


def tiny_hf_config(family: str, **overrides):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    kw = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              intermediate_size=96, vocab_size=97, max_position_embeddings=256)
    if family == "llama":
        cls = LlamaConfig
        kw["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    elif family == "qwen2":
        cls = Qwen2Config
        kw["tie_word_embeddings"] = True
    elif family == "qwen3":
        cls = Qwen3Config
        kw["head_dim"] = 24
    elif family == "gemma3":
        # local, global, local layers with a 5-token sliding window, two RoPE bases, a query scale
        # that is not head_dim, and both soft-caps on (gemma-3-270m has them off), so every
        # Gemma-specific path is exercised.
        cls = Gemma3TextConfig
        kw.update(head_dim=24, num_hidden_layers=3, query_pre_attn_scalar=20, sliding_window=5,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 50000.0},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                  attn_logit_softcapping=5.0, final_logit_softcapping=3.0, pad_token_id=0, bos_token_id=2,
                  eos_token_id=1)
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    kw.update({k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()})  # tuples: hashable overrides
    return cls(**kw)


@functools.lru_cache(maxsize=16)
def _tiny_hf_model(family: str, seed: int, overrides: tuple):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_hf_config(family, **dict(overrides))).eval()
    with torch.no_grad():  # random norms and biases, so parity tests see every tensor
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    tensors = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    return hf, tensors


def tiny_hf_model(family: str, seed: int = 0, **overrides):
    """(transformers model, {HF name: float32 numpy}) for a tiny random model; cached per arguments."""
    hf, tensors = _tiny_hf_model(family, seed, tuple(sorted(overrides.items())))
    return hf, dict(tensors)


def tiny_eijax_model(family: str, memory, *, seed: int = 0, dtype: str = "float32", **overrides):
    """The eijax twin of `tiny_hf_model(family, seed, **overrides)`."""
    from eijax.config import model_config_from_hf
    from eijax.pretrained import model_from_hf_tensors

    hf, tensors = tiny_hf_model(family, seed, **overrides)
    return model_from_hf_tensors(model_config_from_hf(hf.config.to_dict(), param_dtype=dtype, dtype=dtype), memory, tensors)


def random_tokens(shape, vocab: int = 97, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def randomise_memory_path(model, seed: int = 1, scale: float = 0.2) -> None:
    """Add noise to the gate (and memory-adapter maps and write gate, if any) in place: freshly
    initialised they make the memory path an exact no-op, which no equivalence test should rely on."""
    import jax.numpy as jnp
    from flax import nnx

    from eijax.layers import MEMORY_PATH
    from eijax.trained import param_filter

    rng = np.random.RandomState(seed)
    flat = nnx.to_flat_state(nnx.state(model, param_filter(MEMORY_PATH)))
    nnx.update(model, nnx.from_flat_state(
        [(p, v.replace(v[...] + jnp.asarray(scale * rng.randn(*v.shape), v[...].dtype))) for p, v in flat]))


# Command-line overrides for a seconds-long training run of the tiny-random preset (train tests).
# the tests' own recipe, pinned here so that a change of the default (configs/base.yaml) does not move them
TINY_TRAIN_ARGS = ("model_name=tiny-random", "data.tokenizer=bytes", "memory.sink=8", "memory.window=128",
                   "memory.remat=none", "memory.rule=linear", "memory.adapter=false", "optim.trainable=[gate]",
                   "optim.distill_weight=0.0", "data.tasks=[passkey]", "data.context_lengths=[250]",
                   "data.max_segments=8", "data.buckets=[4,8]", "eval.before=false", "eval.after=false",
                   "optim.learning_rate=1e-2", "optim.warmup_steps=1", "run.report=false")


def check_gradient_by_finite_differences(model, module: str, sink: int, n_checks: int | None = None) -> None:
    """The gradient of a random linear function of `forward`'s hidden states after the sink with
    respect to one memory-path module's params (e.g. "write_gate") is finite, non-zero, and equals
    central differences at `n_checks` random coordinates (default: all). Call under jax.enable_x64."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    n = sink + 4 * model.memory_config.window
    tokens = jnp.asarray(random_tokens((1, n), seed=5))
    graph, params, rest = nnx.split(model, nnx.PathContains(module), ...)
    weights = jnp.asarray(np.random.RandomState(1).randn(1, n - sink, model.config.d_model))

    def loss(p):
        return jnp.sum(nnx.merge(graph, p, rest).forward(tokens)[:, sink:] * weights) / weights.size

    flat_p, unravel = jax.flatten_util.ravel_pytree(params)
    flat_g = jax.flatten_util.ravel_pytree(jax.jit(jax.grad(loss))(params))[0]
    assert np.all(np.isfinite(flat_g)) and np.abs(flat_g).max() > 0
    f = jax.jit(lambda p: loss(unravel(p)))
    picks = range(flat_p.size) if n_checks is None else np.random.RandomState(0).choice(flat_p.size, n_checks, replace=False)
    for i in picks:
        e = jnp.zeros_like(flat_p).at[i].set(1e-6)
        np.testing.assert_allclose(flat_g[i], (f(flat_p + e) - f(flat_p - e)) / 2e-6, rtol=1e-5, atol=1e-10)


def padded_inputs(sink: int, window: int, n_segments: int, seed: int = 0):
    """(tokens [2, N], valid [2, N]) for the equivalence tests: row 1 has padding at the end of
    segment 0, row 0 at the end of the last segment."""
    import jax.numpy as jnp

    n = sink + n_segments * window
    valid = np.ones((2, n), bool)
    valid[1, sink + window - 2:sink + window] = False
    valid[0, n - 3:] = False
    return jnp.asarray(random_tokens((2, n), seed=seed)), jnp.asarray(valid)


@functools.cache
def _jitted_steps():
    import jax.numpy as jnp
    from flax import nnx

    prefill = nnx.jit(lambda m, s, t, v: m.prefill(s, t, v))
    window = nnx.jit(lambda m, s, t, v: m.prefill(s._replace(fill=jnp.asarray(m.memory_config.sink, jnp.int32)), t, v))
    step = nnx.jit(lambda m, s, t, v: m.step_segment(s, t, v))
    forward = nnx.jit(lambda m, t, v: m.forward(t, v))
    return prefill, window, step, forward


def segment_loop(model, tokens, valid):
    """A plain Python loop over segments, the reference for the scanned `forward`. Returns (hidden
    [B, N, D], per segment (k, v, valid) of the window before compress, the memory before each
    segment, the final state)."""
    prefill, window, step, _ = _jitted_steps()
    s, w = model.memory_config.sink, model.memory_config.window
    state = model.init_state(tokens.shape[0])
    h, state = prefill(model, state, tokens[:, :s], valid[:, :s])
    if tokens.shape[1] > s + w:  # a long input starts from the memory prior, if the model has one
        state = model.prime(state)
    hidden, windows, memories = [h], [], []
    for at in range(s, tokens.shape[1], w):
        sl = slice(at, at + w)
        memories.append(state.memory)
        _, before_compress = window(model, state, tokens[:, sl], valid[:, sl])
        windows.append((np.asarray(before_compress.k[:, :, s:]), np.asarray(before_compress.v[:, :, s:]),
                        np.asarray(valid[:, sl])))
        h, state = step(model, state, tokens[:, sl], valid[:, sl])
        hidden.append(h)
    return np.concatenate(hidden, axis=1), windows, memories, state


def check_streamed_memory(model, tokens, valid, writes=None, **reference):
    """What every memory feature is held to (run under jax.enable_x64): the segment-by-segment stream
    (`segment_loop`) equals the scanned `forward`, and the memory before each segment and after the last
    equals `memory_write_reference` folded over the windows in float64 (`reference`: its keyword
    arguments; `writes(windows)`: the (k, v, valid) actually written when they are not the cached
    k, v, e.g. convolved and adapted keys). Returns (the recorded windows, the final state)."""
    hidden, windows, memories, final = segment_loop(model, tokens, valid)
    np.testing.assert_allclose(hidden, np.asarray(_jitted_steps()[3](model, tokens, valid)), rtol=1e-10, atol=1e-10)
    folded = fold_memory_reference(windows if writes is None else writes(windows), model.memory_config.rule,
                                   model.memory_config.eps, **reference)
    for before, (M, z) in zip([*memories, final.memory], folded, strict=True):
        np.testing.assert_allclose(before.M, M, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(before.z, z, rtol=1e-9, atol=1e-12)
    return windows, final


def fold_memory_reference(windows, rule: str, eps: float, **reference) -> list:
    """`memory_write_reference` over windows [(k, v, valid)] from an empty memory: the memory before
    each window and after the last, [(M, z)]."""
    nl, b, _, hkv, d = windows[0][0].shape
    M, z = np.zeros((nl, b, hkv, d, windows[0][1].shape[-1])), np.zeros((nl, b, hkv, d))
    out = [(M, z)]
    for k, v, m in windows:
        M, z = memory_write_reference(M, z, k, v, m, rule, eps, **reference)
        out.append((M, z))
    return out


def memory_write_reference(M, z, k, v, valid, rule: str, eps: float, layers=None, write_gate=None, retain=None):
    """One window's memory write in float64 NumPy (DESIGN §1.1), stacked over layers:
    M [NL, B, Hkv, d, d], z [NL, B, Hkv, d], k, v [NL, B, L, Hkv, d], valid [B, L];
    `layers` [NL] bool: the layers that write (default: all); `write_gate` (w [NL, Hkv, 2d],
    b [NL, Hkv]): each token's write scaled by β = 2σ([k; v]·w + b); `retain` γ [NL, Hkv]: M and z
    scaled by γ first, in writing layers, for rows whose window holds a valid token. Returns (M, z)."""
    sig = lambda x: np.where(x > 0, x + 1.0, np.exp(x))
    if retain is not None:
        writes = np.ones(M.shape[0], bool) if layers is None else np.asarray(layers, bool)
        g = np.where(writes[:, None, None] & valid.any(axis=1)[None, :, None], np.asarray(retain)[:, None, :], 1.0)
        M, z = M * g[..., None, None], z * g[..., None]
    sk = sig(k) * valid[None, :, :, None, None]
    vv = v * valid[None, :, :, None, None]
    if rule == "delta":
        vv = vv - np.einsum("nbtkd,nbkde->nbtke", sk, M) / (np.einsum("nbtkd,nbkd->nbtk", sk, z)[..., None] + eps)
    if write_gate is not None:
        w, b = write_gate
        logits = np.einsum("nbtki,nki->nbtk", np.concatenate([k, v], axis=-1), w) + b[:, None, None, :]
        sk = sk * (2.0 / (1.0 + np.exp(-logits)))[..., None]
    g = np.ones(M.shape[0]) if layers is None else np.asarray(layers, np.float64)
    return (M + np.einsum("nbtkd,nbtke->nbkde", sk, vv) * g[:, None, None, None, None],
            z + sk.sum(axis=2) * g[:, None, None, None])
