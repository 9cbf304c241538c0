"""Model and memory configuration: plain frozen dataclasses, validated on construction.

`ModelConfig` describes the frozen base decoder (Llama / Qwen2 / Qwen3 / Gemma 3 families);
`MemoryConfig` describes the EdgeInfinite additions (sink, window, memory rule, gate).
`model_config_from_hf` turns a Hugging Face `config.json` dict into a `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

import jax.numpy as jnp

Family = Literal["llama", "qwen2", "qwen3", "gemma3"]
GateType = Literal["linear", "head_linear", "scalar", "joint"]
MemoryRule = Literal["linear", "delta"]
RematPolicy = Literal["auto", "none", "segment", "layer", "both"]
LayerLoop = Literal["auto", "scan", "unroll"]

# family -> the transformers class of a checkpoint (the one table of supported families). The family
# is the config's model_type, except where HF_MODEL_TYPE names another (and the GGUF architecture).
HF_ARCHITECTURE_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                         "gemma3": "Gemma3ForCausalLM"}
SUPPORTED_FAMILIES = tuple(HF_ARCHITECTURE_CLASS)
# family -> Hugging Face model_type where they differ: Gemma3ForCausalLM's config is "gemma3_text"
# ("gemma3" is the multimodal Gemma3ForConditionalGeneration, whose text model sits in text_config).
HF_MODEL_TYPE = {"gemma3": "gemma3_text"}
_FAMILY_OF_MODEL_TYPE = {**{f: f for f in SUPPORTED_FAMILIES}, **{HF_MODEL_TYPE.get(f, f): f for f in SUPPORTED_FAMILIES}}
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
    # Gemma 3 only (see README "Gemma 3"): sliding-window (local) layers interleaved with global ones.
    local_layers: tuple[bool, ...] = ()   # per layer, True = local; () = every layer global
    sliding_window: int = 0               # a local layer's query sees the last `sliding_window` tokens
    local_rope: RopeConfig | None = None  # the local layers' RoPE (rope_local_base_freq)
    query_pre_attn_scalar: float = 0.0    # scores scaled by this ** -0.5; 0 = head_dim (every other family)
    attn_softcap: float = 0.0             # tanh soft-capping of attention scores; 0 = none
    final_softcap: float = 0.0            # tanh soft-capping of the logits; 0 = none

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"unsupported family {self.family!r}; supported: {SUPPORTED_FAMILIES}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.local_layers:
            if len(self.local_layers) != self.n_layers:
                raise ValueError(f"local_layers has {len(self.local_layers)} entries for {self.n_layers} layers")
            if self.sliding_window < 1:
                raise ValueError(f"local layers need sliding_window >= 1, got {self.sliding_window}")
        to_dtype(self.param_dtype), to_dtype(self.dtype)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def gemma(self) -> bool:
        """Gemma's layer: (1 + w) RMSNorm, norms after attention and MLP too, GeGLU (tanh), embeddings
        scaled by sqrt(d_model)."""
        return self.family == "gemma3"

    @property
    def has_local_layers(self) -> bool:
        return any(self.local_layers)

    @property
    def local_history(self) -> int:
        """Tokens a local layer keeps from before the current window (its query sees itself and
        sliding_window - 1 earlier tokens); 0 without local layers."""
        return self.sliding_window - 1 if self.has_local_layers else 0


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """EdgeInfinite memory. Cache = `sink` + `window` slots; slot i always sits at RoPE position i."""

    sink: int = 64
    window: int = 512
    rule: MemoryRule = "linear"
    # "joint" (JAX only): no learned mix of the two outputs; the memory stands in for the folded
    # tokens' share of one softmax, weight σ(c_h + log(σ(q)·z) - logsumexp of the window's scores)
    # per head (docs/memory-training.md, "layer by layer"). gate_init then sets c's start.
    gate: GateType = "linear"
    gate_init: float = 0.05  # initial gate value: local-dominant but not saturated (DESIGN §1.2)
    eps: float = 1e-6
    enabled: bool = True     # False: memory never written -> sink + window (StreamingLLM) baseline
    # Memory-path widening (DESIGN §1.2): per-head d x d maps on the q/k/v that the memory reads and
    # writes, identity-initialised. They act on cached pre-RoPE k/v (no extra cache) and never touch
    # the local path, so short inputs stay exactly the base model.
    adapter: bool = False
    # Learned write strength (README "Decisions"): each token's write into memory (and into z) is
    # scaled by β = 2σ([k; v]·w + b) per KV head, from the memory path's own k and v. w, b start at 0,
    # so β = 1 and the plain rule is unchanged until training moves them; the cache holds k and v
    # already, so it costs no state.
    write_gate: bool = False
    # Memory prior (README "Decisions"): a prompt longer than sink + window starts its memory from
    # stored per-layer (M0, z0) instead of zeros and reads it from the first token after the sink, so
    # the first window folded into memory is computed and written the way every later one is (the
    # first write into an empty memory was where a trained SmolLM2 lost most needles). Prompts that
    # fit the cache never touch it: they stay exactly the base model.
    prior: bool = False
    # Memory keys from a short causal convolution over the stream (docs/memory-training.md, "where a
    # binding key must come from"): the key a token writes with is Σ_s c_s k_{t-s} over its last
    # `key_conv` tokens' pre-RoPE keys (per KV head, learned taps, lag 0 starting at 1 and the rest at
    # 0: exactly today's key until trained), then the adapter. A value's own key holds little of the
    # name a few tokens before it; the taps can bring it in. 0 = off. State: the last key_conv - 1
    # keys written, per layer (State.conv_k). JAX only: the PyTorch twin and LiteRT graphs refuse it.
    key_conv: int = 0
    # The taps' initial weight on the N - 1 earlier keys, spread evenly (lag 0 keeps 1): 0 starts at
    # the token's own key; 1 adds the mean of the last N - 1 (the context a fit found binding in).
    key_conv_context: float = 0.0
    # Memory decay (docs/memory-training.md, "a memory that forgets"): before each window is folded in,
    # M and z of every KV head are scaled by a learned retention γ = σ(logit) in (0, 1), so the read
    # weighs recent windows more (a window folded n writes ago by γ^n against the newest). `decay` is
    # γ's start for every head; 1.0 = off (no parameter: the plain memory, which weighs every window alike).
    decay: float = 1.0
    # A split memory: the first `decay_keep_heads` KV heads of every layer keep every window (γ fixed
    # at 1, no parameter), the others forget at their learned γ. Untrained, one remembering head of
    # SmolLM2's three kept long recall that a memory decayed everywhere lost (docs/memory-training.md).
    decay_keep_heads: int = 0
    # Recompute in the backward (EdgeInfiniteLM.forward): "layer" each layer's pass from its input,
    # "segment" each group of segments (sink, segment 0, the full segments, the last) from its input,
    # "both" nested. "auto": none on CPU (memory is plentiful there and a third of the step's FLOPs
    # would go to recomputing the forward), "segment" on accelerators, where HBM bounds the length.
    remat: RematPolicy = "auto"
    # How the forward runs its layers: "scan" (one compiled layer body, its backward residuals
    # stacked into [n_layers, ...] buffers) or "unroll" (straight-line layers: no stacking, but each
    # layer compiles on its own, 35-70 s more for SmolLM2's 30 on 2 CPU cores). "auto": unroll on CPU,
    # where the stacking copies cost ~10% of a short-input step (docs/performance.md), scan on accelerators.
    layer_loop: LayerLoop = "auto"
    stop_gradient_every: int = 0  # >0: cut backprop through memory every k segments

    def __post_init__(self) -> None:
        if self.sink < 0 or self.window < 1:
            raise ValueError(f"need sink >= 0 and window >= 1, got sink={self.sink}, window={self.window}")
        if self.rule not in ("linear", "delta"):
            raise ValueError(f"unknown memory rule {self.rule!r}; choose 'linear' or 'delta'")
        if self.gate not in get_args(GateType):
            raise ValueError(f"unknown gate {self.gate!r}; choose {', '.join(map(repr, get_args(GateType)))}")
        if not 0.0 < self.gate_init < 1.0:
            raise ValueError(f"gate_init must lie in (0, 1), got {self.gate_init}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay is a retention per fold in (0, 1] (1 = off), got {self.decay}")
        if self.decay_keep_heads < 0 or (self.decay_keep_heads and not self.decays):
            raise ValueError(f"decay_keep_heads is a number of KV heads >= 0 that keep everything while the others "
                             f"decay (needs decay < 1), got {self.decay_keep_heads} with decay {self.decay}")
        if self.key_conv < 0 or self.key_conv == 1:
            raise ValueError(f"key_conv is 0 (off) or a number of taps >= 2, got {self.key_conv}")
        if self.remat not in get_args(RematPolicy):
            raise ValueError(f"unknown remat policy {self.remat!r}; choose {', '.join(get_args(RematPolicy))}")
        if self.layer_loop not in get_args(LayerLoop):
            raise ValueError(f"unknown layer_loop {self.layer_loop!r}; choose {', '.join(get_args(LayerLoop))}")

    @property
    def cache_size(self) -> int:
        return self.sink + self.window

    @property
    def decays(self) -> bool:
        """The memory has a learned retention (a `memory_decay` parameter): decay < 1."""
        return self.decay < 1.0

    def resolved_remat(self) -> str:
        """The remat policy in force: "auto" resolved for the default JAX backend (see `remat`)."""
        return _by_backend(self.remat, cpu="none", accelerator="segment")

    def resolved_layer_loop(self) -> str:
        """The layer loop in force: "auto" resolved for the default JAX backend (see `layer_loop`)."""
        return _by_backend(self.layer_loop, cpu="unroll", accelerator="scan")


def _by_backend(value: str, *, cpu: str, accelerator: str) -> str:
    """An execution policy's "auto" resolved for the default JAX backend; any other value as set."""
    if value != "auto":
        return value
    import jax

    return cpu if jax.default_backend() == "cpu" else accelerator


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


def _gemma3_fields(hf: dict[str, Any], n_layers: int, head_dim: int) -> dict[str, Any]:
    """The Gemma 3 entries of ModelConfig, read as transformers' Gemma3TextConfig reads them."""
    if hf.get("use_bidirectional_attention"):
        raise ValueError("Gemma 3 with use_bidirectional_attention=True (an encoder) is not supported")
    if hf.get("hidden_activation", hf.get("hidden_act", "gelu_pytorch_tanh")) != "gelu_pytorch_tanh":
        raise ValueError(f"Gemma 3 activation {hf.get('hidden_activation')!r} is not supported (gelu_pytorch_tanh is)")
    if hf.get("attention_bias"):
        raise ValueError("Gemma 3 with attention_bias=True is not supported")
    layer_types = hf.get("layer_types")
    if layer_types is None:  # older configs: every `sliding_window_pattern`-th layer is global
        pattern = int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)))
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown or len(layer_types) != n_layers:
        raise ValueError(f"Gemma 3 layer_types must name {n_layers} layers, each sliding_attention or "
                         f"full_attention; got {layer_types}")
    # transformers >= 5 keeps one RoPE dict per layer type; older configs: rope_theta, rope_scaling
    # (global layers) and rope_local_base_freq (local layers, never scaled).
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        global_rope = _rope_from_hf({"rope_parameters": params.get("full_attention") or {"rope_theta": 1e6}})
        local_rope = _rope_from_hf({"rope_parameters": params.get("sliding_attention") or {"rope_theta": 1e4}})
    else:
        global_rope = _rope_from_hf({"rope_theta": 1e6, **hf})
        local_rope = RopeConfig(theta=float(hf.get("rope_local_base_freq", 1e4)))
    return dict(
        rope=global_rope,
        local_rope=local_rope,
        local_layers=tuple(t == "sliding_attention" for t in layer_types),
        sliding_window=int(hf.get("sliding_window") or 4096),
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or head_dim),
        # transformers' Gemma3Attention keeps attn_logit_softcapping in its config but never passes it
        # to the attention function (5.24; every released Gemma 3 sets it to null): follow it, so
        # logits equal Gemma3ForCausalLM's. ModelConfig.attn_softcap itself works (Gemma 2 style).
        attn_softcap=0.0,
        final_softcap=float(hf.get("final_logit_softcapping") or 0.0),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qk_norm=True,
    )


def model_config_from_hf(hf: dict[str, Any], *, param_dtype: str = "float32", dtype: str = "float32") -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config dict (llama, qwen2, qwen3 or gemma3_text)."""
    model_type = hf.get("model_type")
    family = _FAMILY_OF_MODEL_TYPE.get(model_type)
    if model_type == "gemma3" and "text_config" in hf:
        raise ValueError("multimodal Gemma 3 checkpoints (Gemma3ForConditionalGeneration, model_type 'gemma3') "
                         "are not supported; eijax reads text-only Gemma3ForCausalLM ('gemma3_text') checkpoints")
    if family is None:
        archs = hf.get("architectures")
        raise ValueError(
            f"unsupported architecture: model_type={model_type!r} architectures={archs}; "
            f"eijax supports model_type in {tuple(HF_MODEL_TYPE.get(f, f) for f in SUPPORTED_FAMILIES)}"
        )
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("Qwen2 sliding-window attention is not supported (use_sliding_window=True)")
    n_heads = hf["num_attention_heads"]
    d_model = hf["hidden_size"]
    head_dim = hf.get("head_dim") or d_model // n_heads
    attention_bias = bool(hf.get("attention_bias", False))
    n_layers = hf["num_hidden_layers"]
    family_fields = dict(rope=_rope_from_hf(hf), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                         qk_norm=family == "qwen3") if family != "gemma3" else _gemma3_fields(hf, n_layers, head_dim)
    return ModelConfig(
        family=family,
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        d_ff=hf["intermediate_size"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=family == "qwen2" or attention_bias,
        o_bias=family == "llama" and attention_bias,
        max_position=int(hf.get("max_position_embeddings", 8192)),
        param_dtype=param_dtype,
        dtype=dtype,
        **family_fields,
    )
