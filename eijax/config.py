"""Model and memory configuration: plain frozen dataclasses, validated on construction.

`ModelConfig` describes the frozen base decoder (Llama / Qwen2 / Qwen3 families);
`MemoryConfig` describes the EdgeInfinite additions (sink, window, memory rule, gate).
`model_config_from_hf` turns a Hugging Face `config.json` dict into a `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

Family = Literal["llama", "qwen2", "qwen3"]
GateType = Literal["linear", "head_linear", "scalar"]
MemoryRule = Literal["linear", "delta"]
RematPolicy = Literal["none", "segment", "layer", "both"]

# model_type -> the transformers class of a checkpoint (the one table of supported families)
HF_ARCHITECTURE_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SUPPORTED_FAMILIES = tuple(HF_ARCHITECTURE_CLASS)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}


def to_dtype(name: str) -> Any:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: Literal["default", "linear", "llama3"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: Family
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope: RopeConfig = RopeConfig()
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = False   # Qwen2 always; Llama with attention_bias
    o_bias: bool = False     # Llama with attention_bias
    qk_norm: bool = False    # Qwen3
    max_position: int = 8192
    param_dtype: str = "float32"
    dtype: str = "float32"   # compute dtype; memory state is float32 regardless

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"unsupported family {self.family!r}; supported: {SUPPORTED_FAMILIES}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        to_dtype(self.param_dtype), to_dtype(self.dtype)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """EdgeInfinite memory. Cache = `sink` + `window` slots; slot i always sits at RoPE position i."""

    sink: int = 64
    window: int = 512
    rule: MemoryRule = "linear"
    gate: GateType = "linear"
    gate_init: float = 0.05  # initial gate value: local-dominant but not saturated (DESIGN §1.2)
    eps: float = 1e-6
    enabled: bool = True     # False: memory never written -> sink + window (StreamingLLM) baseline
    # Memory-path widening (DESIGN §1.2): per-head d x d maps on the q/k/v that the memory reads and
    # writes, identity-initialised. They act on cached pre-RoPE k/v (no extra cache) and never touch
    # the local path, so short inputs stay exactly the base model.
    adapter: bool = False
    remat: RematPolicy = "segment"
    stop_gradient_every: int = 0  # >0: cut backprop through memory every k segments

    def __post_init__(self) -> None:
        if self.sink < 0 or self.window < 1:
            raise ValueError(f"need sink >= 0 and window >= 1, got sink={self.sink}, window={self.window}")
        if self.rule not in ("linear", "delta"):
            raise ValueError(f"unknown memory rule {self.rule!r}; choose 'linear' or 'delta'")
        if self.gate not in ("linear", "head_linear", "scalar"):
            raise ValueError(f"unknown gate {self.gate!r}; choose 'linear', 'head_linear' or 'scalar'")
        if not 0.0 < self.gate_init < 1.0:
            raise ValueError(f"gate_init must lie in (0, 1), got {self.gate_init}")
        if self.remat not in ("none", "segment", "layer", "both"):
            raise ValueError(f"unknown remat policy {self.remat!r}")

    @property
    def cache_size(self) -> int:
        return self.sink + self.window


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older configs write rope_theta + rope_scaling.
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"unsupported RoPE scaling {kind!r}; supported: default, linear, llama3")
    return RopeConfig(
        theta=float(theta),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
    )


def model_config_from_hf(hf: dict[str, Any], *, param_dtype: str = "float32", dtype: str = "float32") -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config dict (llama, qwen2 or qwen3)."""
    family = hf.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        archs = hf.get("architectures")
        raise ValueError(
            f"unsupported architecture: model_type={family!r} architectures={archs}; "
            f"eijax supports model_type in {SUPPORTED_FAMILIES}"
        )
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("Qwen2 sliding-window attention is not supported (use_sliding_window=True)")
    n_heads = hf["num_attention_heads"]
    d_model = hf["hidden_size"]
    head_dim = hf.get("head_dim") or d_model // n_heads
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family=family,
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        d_ff=hf["intermediate_size"],
        rope=_rope_from_hf(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or attention_bias,
        o_bias=family == "llama" and attention_bias,
        qk_norm=family == "qwen3",
        max_position=int(hf.get("max_position_embeddings", 8192)),
        param_dtype=param_dtype,
        dtype=dtype,
    )
