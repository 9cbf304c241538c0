"""Hugging Face tensors -> eijax parameters, and `load_pretrained` for HF folders and GGUF files.

The mapping is one table (`_BLOCK_TENSORS`): eijax path -> (HF name pattern, transpose), with the
few names Gemma 3 spells differently in `_GEMMA3_BLOCK_TENSORS`. Block tensors are stacked over layers. Gate parameters are not in the base checkpoint; they keep their
deterministic initial value (DESIGN §1.2) unless an eijax gate checkpoint is given.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eijax.cli import InputError
from eijax.config import HF_ARCHITECTURE_CLASS, HF_MODEL_TYPE, MemoryConfig, ModelConfig, model_config_from_hf
from eijax.layers import memory_path_modules
from eijax.model import EdgeInfiniteLM

# eijax path inside `blocks` -> (HF name with {i} for the layer, transpose to [in, out]?)
_BLOCK_TENSORS: dict[tuple[str, ...], tuple[str, bool]] = {
    ("attn_norm", "scale"): ("model.layers.{i}.input_layernorm.weight", False),
    ("q_proj", "kernel"): ("model.layers.{i}.self_attn.q_proj.weight", True),
    ("k_proj", "kernel"): ("model.layers.{i}.self_attn.k_proj.weight", True),
    ("v_proj", "kernel"): ("model.layers.{i}.self_attn.v_proj.weight", True),
    ("o_proj", "kernel"): ("model.layers.{i}.self_attn.o_proj.weight", True),
    ("q_proj", "bias"): ("model.layers.{i}.self_attn.q_proj.bias", False),
    ("k_proj", "bias"): ("model.layers.{i}.self_attn.k_proj.bias", False),
    ("v_proj", "bias"): ("model.layers.{i}.self_attn.v_proj.bias", False),
    ("o_proj", "bias"): ("model.layers.{i}.self_attn.o_proj.bias", False),
    ("q_norm", "scale"): ("model.layers.{i}.self_attn.q_norm.weight", False),
    ("k_norm", "scale"): ("model.layers.{i}.self_attn.k_norm.weight", False),
    ("mlp_norm", "scale"): ("model.layers.{i}.post_attention_layernorm.weight", False),
    ("mlp", "gate_proj", "kernel"): ("model.layers.{i}.mlp.gate_proj.weight", True),
    ("mlp", "up_proj", "kernel"): ("model.layers.{i}.mlp.up_proj.weight", True),
    ("mlp", "down_proj", "kernel"): ("model.layers.{i}.mlp.down_proj.weight", True),
}
# Gemma 3: four norms per layer (input, post-attention, pre- and post-feedforward).
_GEMMA3_BLOCK_TENSORS = {
    **_BLOCK_TENSORS,
    ("post_attn_norm", "scale"): ("model.layers.{i}.post_attention_layernorm.weight", False),
    ("mlp_norm", "scale"): ("model.layers.{i}.pre_feedforward_layernorm.weight", False),
    ("post_mlp_norm", "scale"): ("model.layers.{i}.post_feedforward_layernorm.weight", False),
}
_TOP_TENSORS: dict[tuple[str, ...], tuple[str, bool]] = {
    ("embed",): ("model.embed_tokens.weight", False),
    ("final_norm", "scale"): ("model.norm.weight", False),
    ("lm_head", "kernel"): ("lm_head.weight", True),
}


def hf_tensor_names(family: str | None = None) -> tuple[dict, dict]:
    """The mapping tables of a family (used by convert/ to go back to Hugging Face names)."""
    return (_GEMMA3_BLOCK_TENSORS if family == "gemma3" else _BLOCK_TENSORS), _TOP_TENSORS


def _take(tensors: dict[str, np.ndarray], name: str, transpose: bool, shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
        raise InputError(f"checkpoint is missing tensor {name!r}")
    a = tensors[name].T if transpose else tensors[name]
    if a.shape != shape:
        raise InputError(f"tensor {name!r} has shape {tensors[name].shape} but the model expects "
                         f"{shape[::-1] if transpose else shape}{' (HF [out, in] layout)' if transpose else ''}")
    return a


def _device_array(parts: list[np.ndarray], dtype) -> jax.Array:
    """np.stack(parts) as a jax array of `dtype`, copied once: when the dtype already matches, NumPy
    stacks into a 64-byte-aligned buffer, which the CPU backend adopts without copying it again
    (an unaligned one is copied: 0.5 GB for SmolLM2, a noticeable share of a start)."""
    if any(p.dtype != dtype for p in parts):
        return jnp.asarray(np.stack(parts), dtype=dtype)
    shape = (len(parts), *parts[0].shape)
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start:start + nbytes].view(dtype).reshape(shape)
    for i, part in enumerate(parts):  # a loop: np.stack(out=) is several times slower on transposed parts
        out[i] = part
    return jax.device_put(out)


def params_from_hf(model: EdgeInfiniteLM, tensors: dict[str, np.ndarray]) -> None:
    """Overwrite the base-model parameters of `model` in place from HF-named tensors."""
    n_layers = model.config.n_layers
    block_tensors, top_tensors = hf_tensor_names(model.config.family)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    used: set[str] = set()
    updates = []
    for path, var in flat:
        path = tuple(str(p) for p in path)
        if path[0] == "blocks" and path[1:] in block_tensors:
            pattern, tr = block_tensors[path[1:]]
            names = [pattern.format(i=i) for i in range(n_layers)]
            value = _device_array([_take(tensors, n, tr, var.shape[1:]) for n in names], var.dtype)
        elif path in top_tensors:
            name, tr = top_tensors[path]
            names = [name]
            value = _device_array([_take(tensors, name, tr, var.shape)], var.dtype)[0]
        else:
            continue  # gate / memory adapter: not part of the base checkpoint
        used.update(names)
        updates.append((path, var.replace(value)))
    ignorable = {"lm_head.weight"} if model.config.tie_embeddings else set()  # tied copies
    unused = sorted(n for n in set(tensors) - used - ignorable if not n.endswith("rotary_emb.inv_freq"))
    if unused:
        raise InputError(f"checkpoint has {len(unused)} tensors the model does not use, e.g. {unused[:3]}; "
                         "is the config right for this checkpoint?")
    nnx.update(model, nnx.from_flat_state(updates))


def build_model(config: ModelConfig, memory: MemoryConfig, seed: int = 0) -> EdgeInfiniteLM:
    return EdgeInfiniteLM(config, memory, rngs=nnx.Rngs(seed))


def load_pretrained(name_or_path: str | os.PathLike, memory: MemoryConfig | None = None, *,
                    dtype: str = "float32", param_dtype: str = "float32") -> EdgeInfiniteLM:
    """Load a base model from a local HF folder, a GGUF file, or a registered name ("smollm2", "gemma3-270m").

    The gate starts at its initial value (gate ≈ memory.gate_init everywhere).
    """
    from eijax.checkpoint import read_checkpoint

    hf_config, tensors = read_checkpoint(name_or_path)
    try:
        config = model_config_from_hf(hf_config, param_dtype=param_dtype, dtype=dtype)
    except ValueError as e:  # the checkpoint's config asks for something eijax does not support
        raise InputError(f"{name_or_path}: {e}") from e
    except KeyError as e:
        raise InputError(f"{name_or_path}: the model config has no {e.args[0]!r}") from e
    return model_from_hf_tensors(config, memory or MemoryConfig(), tensors)


def model_from_hf_tensors(config: ModelConfig, memory: MemoryConfig, tensors: dict[str, np.ndarray]) -> EdgeInfiniteLM:
    """Build the model without random-initialising the base (it is overwritten): abstract shapes,
    then the memory path's deterministic initial values (a prior stays zeros until primed or loaded
    from a memory file), then the checkpoint tensors."""
    model = nnx.eval_shape(lambda: build_model(config, memory))
    for name, module in memory_path_modules(config, memory, lead=(config.n_layers,)).items():
        if module is not None:
            nnx.update(getattr(model.blocks, name), nnx.state(module))
    params_from_hf(model, tensors)
    return model


def hf_config_of(model: EdgeInfiniteLM) -> dict[str, Any]:
    """Inverse of model_config_from_hf, enough for transformers to rebuild the base model."""
    c = model.config
    rope: dict[str, Any] = {"rope_type": c.rope.kind, "rope_theta": c.rope.theta}
    if c.rope.kind != "default":
        rope.update(factor=c.rope.factor, low_freq_factor=c.rope.low_freq_factor,
                    high_freq_factor=c.rope.high_freq_factor, original_max_position_embeddings=c.rope.original_max_position)
    arch = HF_ARCHITECTURE_CLASS[c.family]
    out = dict(architectures=[arch], model_type=HF_MODEL_TYPE.get(c.family, c.family), vocab_size=c.vocab_size,
               hidden_size=c.d_model,
               num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
               head_dim=c.head_dim, intermediate_size=c.d_ff, rms_norm_eps=c.norm_eps,
               tie_word_embeddings=c.tie_embeddings, max_position_embeddings=c.max_position,
               rope_parameters=rope, hidden_act="silu", torch_dtype=c.param_dtype)
    if c.family == "llama":
        out["attention_bias"] = c.qkv_bias
    if c.gemma:
        local = c.local_rope or c.rope
        scalar = c.query_pre_attn_scalar
        out.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=int(scalar) if scalar.is_integer() else scalar,
                   sliding_window=c.sliding_window, attn_logit_softcapping=c.attn_softcap or None,
                   final_logit_softcapping=c.final_softcap or None,
                   layer_types=["sliding_attention" if f else "full_attention"
                                for f in (c.local_layers or (False,) * c.n_layers)],
                   rope_parameters={"full_attention": rope,
                                    "sliding_attention": {"rope_type": "default", "rope_theta": local.theta}})
        del out["hidden_act"]
    return out
