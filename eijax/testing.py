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
    """Add noise to the gate (and memory-adapter maps, if any) in place: freshly initialised they
    make the memory path an exact no-op, which no equivalence test should rely on."""
    import jax.numpy as jnp
    from flax import nnx

    rng = np.random.RandomState(seed)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.PathContains("gate"), nnx.PathContains("memory_adapter"))))
    nnx.update(model, nnx.from_flat_state(
        [(p, v.replace(v[...] + jnp.asarray(scale * rng.randn(*v.shape), v[...].dtype))) for p, v in flat]))


# Command-line overrides for a seconds-long training run of the tiny-random preset (train tests).
TINY_TRAIN_ARGS = ("model_name=tiny-random", "data.tokenizer=bytes", "memory.sink=8", "memory.window=128",
                   "memory.remat=none", "data.tasks=[passkey]", "data.context_lengths=[250]", "data.max_segments=8",
                   "data.buckets=[4,8]", "eval.before=false", "eval.after=false", "optim.learning_rate=1e-2",
                   "optim.warmup_steps=1", "run.report=false")
