"""Flax NNX building blocks. Parameters of the decoder blocks carry a leading [n_layers] axis
(`lead`) so the model scans over layers and compile time does not grow with depth.

Every parameter carries logical axis names in its `axes` metadata; `eijax.sharding` maps them to a
mesh with one rules table.

Gemma 3 (`ModelConfig.gemma`) uses the same Block with its own pieces switched on: (1 + w) RMSNorm,
norms after attention and after the MLP too, GeGLU with tanh GELU, scores scaled by
query_pre_attn_scalar ** -0.5. Its sliding-window (local) layers take `Block.__call__`'s `local`
argument: a per-layer flag (scanned with the parameters, so the layer scan still compiles once)
selects, through `lax.cond`, either the global path (sink + window + memory, DESIGN §1) or the
local path: plain softmax attention over the layer's own bounded window of pre-RoPE keys (the
`local_history` tokens before the cache window, then the window itself), no memory read and no
gate. See the README section "Gemma 3" for why.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eijax import memory as mem_lib
from eijax.config import MemoryConfig, ModelConfig, to_dtype
from eijax.rope import apply_rope


def _param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str, ...], dtype, init: str | float) -> nnx.Param:
    """A parameter with logical `axes`. Initial values are made with numpy: no per-shape XLA
    compiles at construction (pretrained weights overwrite them anyway)."""
    if init == "normal":
        key = rngs.params()
        if isinstance(key, jax.core.Tracer):  # under nnx.eval_shape: only the shape matters
            return nnx.Param(jnp.zeros(shape, dtype), axes=axes)
        seed = np.asarray(jax.random.key_data(key)).astype(np.uint32)
        value = 0.02 * np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    else:
        value = np.full(shape, 1.0 if init == "ones" else 0.0 if init == "zeros" else init, np.float32)
    return nnx.Param(jnp.asarray(value, dtype=dtype), axes=axes)


class Linear(nnx.Module):
    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, lead: tuple[int, ...], lead_axes: tuple[str, ...],
                 bias: bool, param_dtype, rngs: nnx.Rngs, init: str = "normal"):
        self.kernel = _param(rngs, (*lead, d_in, d_out), (*lead_axes, *axes), param_dtype, init)
        self.bias = _param(rngs, (*lead, d_out), (*lead_axes, axes[1]), param_dtype, "zeros") if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...].astype(x.dtype)
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, axis_name: str, *, lead: tuple[int, ...], lead_axes: tuple[str, ...], eps: float, param_dtype,
                 offset: bool = False):
        # offset (Gemma): the stored weight w scales by (1 + w), so it starts at 0 instead of 1.
        self.scale = _param(None, (*lead, dim), (*lead_axes, axis_name), param_dtype, "zeros" if offset else "ones")
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:  # Gemma's order: scale by (1 + w) in float32, then cast back
            return (normed * (1.0 + self.scale[...].astype(x32.dtype))).astype(x.dtype)
        # Hugging Face (Llama) order: normalise in float32, cast back, then scale.
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, lead, lead_axes, rngs: nnx.Rngs):
        kw = dict(lead=lead, lead_axes=lead_axes, bias=False, param_dtype=to_dtype(cfg.param_dtype), rngs=rngs)
        self.gate_proj = Linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
        self.up_proj = Linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
        self.down_proj = Linear(cfg.d_ff, cfg.d_model, ("mlp", "embed"), **kw)
        self.gelu = cfg.gemma  # GeGLU with tanh-approximate GELU (gelu_pytorch_tanh) instead of SwiGLU

    def __call__(self, x: jax.Array) -> jax.Array:
        g = self.gate_proj(x)
        g = jax.nn.gelu(g, approximate=True) if self.gelu else jax.nn.silu(g)
        return self.down_proj(g * self.up_proj(x))


class MemoryGate(nnx.Module):
    """Mixes memory and local attention per token and head (DESIGN §1.2), in the memory's float32."""

    def __init__(self, cfg: ModelConfig, mem: MemoryConfig, *, lead, lead_axes, param_dtype):
        h, d = cfg.n_heads, cfg.head_dim
        bias0 = math.log(mem.gate_init / (1.0 - mem.gate_init))  # sigmoid(bias0) == gate_init
        self.kind = mem.gate
        if mem.gate == "linear":
            self.kernel = _param(None, (*lead, 2 * h * d, h), (*lead_axes, "gate_in", "gate_heads"), param_dtype, "zeros")
            self.bias = _param(None, (*lead, h), (*lead_axes, "gate_heads"), param_dtype, bias0)
        elif mem.gate == "head_linear":
            self.kernel = _param(None, (*lead, h, 2 * d), (*lead_axes, "gate_heads", "gate_in"), param_dtype, "zeros")
            self.bias = _param(None, (*lead, h), (*lead_axes, "gate_heads"), param_dtype, bias0)
        elif mem.gate == "joint":  # log c per head: the memory's mass against the window's
            self.bias = _param(None, (*lead, h), (*lead_axes, "gate_heads"), param_dtype, bias0)
        else:
            self.beta = _param(None, (*lead, h), (*lead_axes, "gate_heads"), param_dtype, bias0)

    def __call__(self, a_mem: jax.Array, a_local: jax.Array, log_mass: jax.Array | None = None) -> jax.Array:
        """a_mem, a_local: [B, T, H, d]; log_mass [B, T, H] (the "joint" gate's input: log of the memory's
        mass σ(q)·z minus the window's logsumexp). Returns the gate, float32 [B, T, H, 1]."""
        b, t, h, d = a_local.shape
        f = a_mem.dtype  # float32 (float64 in float64 tests)
        if self.kind == "joint":
            return jax.nn.sigmoid(self.bias[...].astype(f) + log_mass.astype(f))[..., None]
        if self.kind == "scalar":
            return jax.nn.sigmoid(self.beta[...].astype(f))[None, None, :, None] * jnp.ones((b, t, h, 1), f)
        a_local = a_local.astype(f)
        if self.kind == "linear":  # every head's gate sees all heads' memory and local outputs
            both = jnp.concatenate([a_mem.reshape(b, t, h * d), a_local.reshape(b, t, h * d)], axis=-1)
            logits = both @ self.kernel[...].astype(f)
        else:  # head_linear: each head sees only its own [A_mem ; A_local]
            both = jnp.concatenate([a_mem, a_local], axis=-1)
            logits = jnp.einsum("bthi,hi->bth", both, self.kernel[...].astype(f))
        return jax.nn.sigmoid(logits + self.bias[...].astype(f))[..., None]


class MemoryAdapter(nnx.Module):
    """Identity-initialised per-head maps of q (per query head) and k, v (per KV head) for the memory."""

    def __init__(self, cfg: ModelConfig, *, lead, lead_axes, param_dtype):
        h, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        eye = lambda n: jnp.broadcast_to(jnp.eye(d, dtype=param_dtype), (*lead, n, d, d))
        self.q = nnx.Param(eye(h), axes=(*lead_axes, "gate_heads", "head_dim", "head_dim_out"))
        self.k = nnx.Param(eye(hkv), axes=(*lead_axes, "kv_heads_n", "head_dim", "head_dim_out"))
        self.v = nnx.Param(eye(hkv), axes=(*lead_axes, "kv_heads_n", "head_dim", "head_dim_out"))


class MemoryPrior(nnx.Module):
    """The memory a long prompt starts from (MemoryConfig.prior): M0 [Hkv, d, d], z0 [Hkv, d] per layer,
    float32 like the memory itself. Zeros here; `eijax.memory_prior.prime` fills them from a primer text."""

    def __init__(self, cfg: ModelConfig, *, lead, lead_axes):
        hkv, d = cfg.n_kv_heads, cfg.head_dim
        self.M = nnx.Param(jnp.zeros((*lead, hkv, d, d), jnp.float32), axes=(*lead_axes, "kv_heads_n", "head_dim", "head_dim_out"))
        self.z = nnx.Param(jnp.zeros((*lead, hkv, d), jnp.float32), axes=(*lead_axes, "kv_heads_n", "head_dim"))


# The per-layer modules EdgeInfinite adds to the base model (Block attribute names): the memory path
# of DESIGN §1.2, what trains, what a memory file holds and what the twin keeps beside the base weights.
MEMORY_PATH = ("gate", "memory_adapter", "write_gate", "memory_prior", "key_conv", "memory_decay")


class MemoryWriteGate(nnx.Module):
    """Learned write strength of the memory (MemoryConfig.write_gate): w [Hkv, 2d], b [Hkv] per layer,
    zero-initialised so that β = 1 (see `memory.write_strength`)."""

    def __init__(self, cfg: ModelConfig, *, lead, lead_axes, param_dtype):
        hkv, d = cfg.n_kv_heads, cfg.head_dim
        self.w = nnx.Param(jnp.zeros((*lead, hkv, 2 * d), param_dtype), axes=(*lead_axes, "kv_heads_n", "head_dim"))
        self.b = nnx.Param(jnp.zeros((*lead, hkv), param_dtype), axes=(*lead_axes, "kv_heads_n"))


class MemoryDecay(nnx.Module):
    """Retention of the memory per fold (MemoryConfig.decay): γ = σ(logit) per layer for every KV head
    but the first `decay_keep_heads`, which keep γ = 1 (no parameter); the learned ones start at
    `decay` (see `memory.write`)."""

    def __init__(self, cfg: ModelConfig, mem: MemoryConfig, *, lead, lead_axes, param_dtype):
        self.keep = mem.decay_keep_heads
        if self.keep >= cfg.n_kv_heads:
            raise ValueError(f"decay_keep_heads must leave a KV head to decay: {self.keep} of {cfg.n_kv_heads}")
        logit = math.log(mem.decay / (1.0 - mem.decay))
        self.logit = nnx.Param(jnp.full((*lead, cfg.n_kv_heads - self.keep), logit, param_dtype),
                               axes=(*lead_axes, "kv_heads_n"))

    def retain(self) -> jax.Array:
        """γ [..., Hkv]: ones for the kept heads, then σ(logit)."""
        logit = self.logit[...]
        gamma = jax.nn.sigmoid(logit.astype(jnp.promote_types(logit.dtype, jnp.float32)))
        return jnp.concatenate([jnp.ones((*gamma.shape[:-1], self.keep), gamma.dtype), gamma], axis=-1)


class MemoryKeyConv(nnx.Module):
    """Taps of the memory keys' causal convolution (MemoryConfig.key_conv): [Hkv, N] per layer, lag 0
    first; 1 at lag 0 and key_conv_context / (N - 1) at every other lag, so by default the keys start
    as the tokens' own (see `memory.conv_keys`)."""

    def __init__(self, cfg: ModelConfig, mem: MemoryConfig, *, lead, lead_axes, param_dtype):
        n_taps = mem.key_conv
        taps = np.full((*lead, cfg.n_kv_heads, n_taps), mem.key_conv_context / (n_taps - 1), np.float32)
        taps[..., 0] = 1.0
        self.taps = nnx.Param(jnp.asarray(taps, param_dtype), axes=(*lead_axes, "kv_heads_n", "conv_taps"))


def memory_path_modules(cfg: ModelConfig, mem: MemoryConfig, *, lead: tuple[int, ...]) -> dict[str, nnx.Module | None]:
    """The memory path's modules of a Block, by their MEMORY_PATH names, at their initial values (all
    deterministic: identity maps, zeros and configured constants); None where `mem` leaves one out."""
    axes = dict(lead=lead, lead_axes=("layers",) * len(lead))
    kw = dict(axes, param_dtype=to_dtype(cfg.param_dtype))
    return {
        "gate": MemoryGate(cfg, mem, **kw),
        "memory_adapter": MemoryAdapter(cfg, **kw) if mem.adapter else None,
        "write_gate": MemoryWriteGate(cfg, **kw) if mem.write_gate else None,
        # used by the model at the start of a long prompt (EdgeInfiniteLM.prime), never inside the layer
        "memory_prior": MemoryPrior(cfg, **axes) if mem.prior else None,
        "key_conv": MemoryKeyConv(cfg, mem, **kw) if mem.key_conv else None,
        "memory_decay": MemoryDecay(cfg, mem, **kw) if mem.decays else None,
    }


def adapt(x: jax.Array, maps: jax.Array) -> jax.Array:
    """x [B, T, heads, d] @ maps [heads, d, d] per head."""
    return jnp.einsum("bthd,hde->bthe", x, maps.astype(x.dtype))


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | None = None,
                    softcap: float = 0.0, with_lse: bool = False):
    """Softmax attention with interleaved GQA. q [B,T,H,d]; k, v [B,C,Hkv,d]; mask [B,T,C] -> [B,T,H,d]
    (and, `with_lse`, the scores' logsumexp [B,T,H], float32).

    Scores are divided by sqrt(d), or multiplied by `scale` when given (Gemma: query_pre_attn_scalar
    ** -0.5), then soft-capped (cap * tanh(s / cap)) when `softcap` is set."""
    b, t, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, h // hkv, d)
    f = jnp.promote_types(q.dtype, jnp.float32)
    scores = jnp.einsum("btkgd,bckd->bkgtc", qg, k).astype(f)
    scores = scores / math.sqrt(d) if scale is None else scores * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    # A finite floor (not -inf) keeps fully masked rows (all-padding queries) NaN-free.
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(f).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgtc,bckd->btkgd", probs, v).reshape(b, t, h, d)
    if with_lse:
        return out, jnp.moveaxis(jax.nn.logsumexp(scores, axis=-1), -1, 1).reshape(b, t, h)
    return out


# Caches of at least 2 x KV_BLOCK slots (the `full` method's, up to the model's whole context; the
# chat scenario's) are attended block by block with a running softmax, and only the blocks before
# the chunk's last position are computed: a prefill chunk at slot n costs O(n), not O(cache), and
# its scores stay small. SmolLM2's `full` eval at 8K: 221 -> 180 s an example (docs/performance.md);
# what is left is XLA's element-wise softmax work. Smaller caches (sink + window) keep the one-shot softmax.
KV_BLOCK = 512


def blocked_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array, limit: jax.Array,
                      cos: jax.Array, sin: jax.Array, scale: float | None = None, softcap: float = 0.0,
                      block: int | None = None, with_lse: bool = False):
    """`local_attention` over a large cache, KV_BLOCK slots at a time, skipping blocks at or past `limit`
    (no query may see them). q [B,T,H,d] already rotated; k_cache, v_cache [B,C,Hkv,d] pre-RoPE (each
    block is rotated with cos/sin[slot] when it is used); mask [B,T,C]. Same values as `local_attention`
    for every query that sees at least one slot (rounding aside); a fully masked query averages the
    computed blocks instead of all C. A scan over blocks with a cond, so it differentiates too."""
    b, t, h, d = q.shape
    c, hkv = k_cache.shape[1], k_cache.shape[2]
    block = block or KV_BLOCK
    n_blocks = c // block
    f = jnp.promote_types(q.dtype, jnp.float32)
    # scaled before the dot: one pass less over the scores than local_attention (rounding aside)
    qg = (q * (1.0 / math.sqrt(d) if scale is None else scale)).reshape(b, t, hkv, h // hkv, d)
    floor = jnp.finfo(f).min
    split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], n_blocks, block, *x.shape[2:]), 1, 0)
    mask_blocks = jnp.moveaxis(mask.reshape(b, t, n_blocks, block), 2, 0)  # [n, B, T, block]
    xs = (split(k_cache), split(v_cache), mask_blocks,
          cos.reshape(n_blocks, block, -1), sin.reshape(n_blocks, block, -1), jnp.arange(n_blocks) * block)

    def step(carry, x):
        k, v, m, cos_b, sin_b, start = x

        def attend(carry):
            run_max, run_sum, acc = carry
            s = jnp.einsum("btkgd,bckd->bkgtc", qg, apply_rope(k, cos_b, sin_b)).astype(f)
            if softcap:
                s = jnp.tanh(s / softcap) * softcap
            s = jnp.where(m[:, None, None], s, floor)
            new_max = jnp.maximum(run_max, jnp.max(s, axis=-1))
            p = jnp.exp(s - new_max[..., None])
            rescale = jnp.exp(run_max - new_max)
            acc = acc * rescale[..., None] + jnp.einsum("bkgtc,bckd->bkgtd", p.astype(v.dtype), v).astype(f)
            return new_max, run_sum * rescale + jnp.sum(p, axis=-1), acc

        return jax.lax.cond(start < limit, attend, lambda carry: carry, carry), None

    init = (jnp.full((b, hkv, h // hkv, t), floor, f), jnp.zeros((b, hkv, h // hkv, t), f),
            jnp.zeros((b, hkv, h // hkv, t, d), f))
    (run_max, run_sum, acc), _ = jax.lax.scan(step, init, xs)
    out = (acc / run_sum[..., None]).astype(v_cache.dtype)  # [b, k, g, t, d]
    out = jnp.moveaxis(out, 3, 1).reshape(b, t, h, d)
    if with_lse:
        return out, jnp.moveaxis(run_max + jnp.log(run_sum), -1, 1).reshape(b, t, h)
    return out


class LocalContext(NamedTuple):
    """What a layer of a model with local (sliding-window) layers needs besides the cache: its kind,
    and its own window of the `Hn` tokens before the cache window (positions sink - Hn .. sink - 1)."""

    is_local: jax.Array   # scalar bool: this layer is a local (sliding-window) layer
    k: jax.Array          # [B, Hn, Hkv, d] pre-RoPE keys of the Hn tokens before the window
    v: jax.Array          # [B, Hn, Hkv, d]
    valid: jax.Array      # [B, Hn]; any valid entry also means the sink no longer precedes the window
    cos: jax.Array        # local RoPE table for positions `start` .. sink + window - 1
    sin: jax.Array
    start: int            # position of row 0 of the table (<= 0)
    sink: int


class Block(nnx.Module):
    """One decoder layer with EdgeInfinite attention (stacked: all params have a leading layer axis)."""

    def __init__(self, cfg: ModelConfig, mem: MemoryConfig, *, lead: tuple[int, ...], rngs: nnx.Rngs):
        lead_axes = ("layers",) * len(lead)
        pd = to_dtype(cfg.param_dtype)
        h, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kw = dict(lead=lead, lead_axes=lead_axes, param_dtype=pd, rngs=rngs)
        nkw = dict(lead=lead, lead_axes=lead_axes, eps=cfg.norm_eps, param_dtype=pd, offset=cfg.gemma)
        self.attn_norm = RMSNorm(cfg.d_model, "embed", **nkw)
        self.q_proj = Linear(cfg.d_model, h * d, ("embed", "q_heads"), bias=cfg.qkv_bias, **kw)
        self.k_proj = Linear(cfg.d_model, hkv * d, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.v_proj = Linear(cfg.d_model, hkv * d, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.o_proj = Linear(h * d, cfg.d_model, ("q_heads", "embed"), bias=cfg.o_bias, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, "head_dim", **nkw)
            self.k_norm = RMSNorm(d, "head_dim", **nkw)
        else:
            self.q_norm = self.k_norm = None
        for name, module in memory_path_modules(cfg, mem, lead=lead).items():
            setattr(self, name, module)
        self.mlp_norm = RMSNorm(cfg.d_model, "embed", **nkw)
        self.mlp = MLP(cfg, lead=lead, lead_axes=lead_axes, rngs=rngs)
        if cfg.gemma:  # Gemma normalises the attention and MLP outputs too, before the residual add
            self.post_attn_norm = RMSNorm(cfg.d_model, "embed", **nkw)
            self.post_mlp_norm = RMSNorm(cfg.d_model, "embed", **nkw)
        else:
            self.post_attn_norm = self.post_mlp_norm = None
        self.shape = (h, hkv, d)
        self.mem_eps = mem.eps
        self.use_memory = mem.enabled
        self.scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None
        self.softcap = cfg.attn_softcap
        self.sliding_window = cfg.sliding_window
        self.has_local = cfg.has_local_layers

    def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Pre-RoPE q [B,T,H,d], k, v [B,T,Hkv,d] (after q_norm/k_norm where the family has them)."""
        b, t, _ = x.shape
        h, hkv, d = self.shape
        q = self.q_proj(x).reshape(b, t, h, d)
        k = self.k_proj(x).reshape(b, t, hkv, d)
        v = self.v_proj(x).reshape(b, t, hkv, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def __call__(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, valid: jax.Array, fill: jax.Array,
                 memory: mem_lib.Memory, written: jax.Array, cos: jax.Array, sin: jax.Array,
                 local: LocalContext | None = None, qkv: tuple[jax.Array, jax.Array, jax.Array] | None = None):
        """Process T new tokens written at cache slots fill..fill+T-1.

        k_cache, v_cache: [B, C, Hkv, d] pre-RoPE; valid: [B, C] slot validity *after* this write;
        memory: this layer's (M, z); written: [B] whether memory holds anything; local: only for
        models with local layers (then `local.is_local` picks this layer's attention); qkv: this
        layer's `project_qkv(attn_norm(x))` when the caller has it already.
        Returns (x_out, k_cache, v_cache).
        """
        t = x.shape[1]
        n_slots = k_cache.shape[1]
        # Inference and streaming (no precomputed qkv) attend a large cache block by block; the training
        # forward's one-window teacher keeps the one-shot softmax its step was measured with.
        blocked = qkv is None and n_slots >= 2 * KV_BLOCK and n_slots % KV_BLOCK == 0
        q, k, v = self.project_qkv(self.attn_norm(x)) if qkv is None else qkv
        zero = jnp.zeros((), jnp.int32)  # index dtypes must agree (also under jax_enable_x64)
        at = (zero, fill.astype(jnp.int32), zero, zero)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), at)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), at)
        q_pos = fill + jnp.arange(t, dtype=jnp.int32)

        def global_attention():  # DESIGN §1.1: [sink ; window] softmax attention mixed with memory
            q_rot = apply_rope(q, jnp.take(cos, q_pos, axis=0), jnp.take(sin, q_pos, axis=0))
            mask = valid[:, None, :] & (jnp.arange(n_slots, dtype=jnp.int32)[None, None, :] <= q_pos[None, :, None])
            joint = self.use_memory and self.gate.kind == "joint"
            if blocked:
                out = blocked_attention(q_rot, k_cache, v_cache, mask, fill + t, cos[:n_slots], sin[:n_slots],
                                        self.scale, self.softcap, with_lse=joint)
            else:
                k_rot = apply_rope(k_cache, cos[:n_slots], sin[:n_slots])
                out = local_attention(q_rot, k_rot, v_cache, mask, self.scale, self.softcap, with_lse=joint)
            out, lse = out if joint else (out, None)
            if self.use_memory:
                q_mem = q if self.memory_adapter is None else adapt(q, self.memory_adapter.q[...])
                if joint:
                    a_mem, log_mass = mem_lib.read(memory, q_mem, self.mem_eps, with_log_mass=True)
                    g = self.gate(a_mem, out, log_mass - lse)
                else:
                    a_mem = mem_lib.read(memory, q_mem, self.mem_eps)
                    g = self.gate(a_mem, out)
                mixed = (g * a_mem + (1.0 - g) * out.astype(a_mem.dtype)).astype(out.dtype)
                out = jnp.where(written[:, None, None, None], mixed, out)  # empty memory: exactly local
            return out

        if local is None:
            if self.has_local:
                raise ValueError("this model has local (sliding-window) layers: pass each layer its LocalContext")
            out = global_attention()
        else:
            out = jax.lax.cond(local.is_local, lambda: self._sliding_attention(q, k_cache, v_cache, valid, q_pos, local),
                               global_attention)
        b, _, h, d = out.shape
        attn = self.o_proj(out.reshape(b, t, h * d))
        if self.post_attn_norm is not None:
            attn = self.post_attn_norm(attn)
        x = x + attn
        mlp = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            mlp = self.post_mlp_norm(mlp)
        x = x + mlp
        return x, k_cache, v_cache

    def _sliding_attention(self, q, k_cache, v_cache, valid, q_pos, local: LocalContext) -> jax.Array:
        """A local layer: softmax attention over the last `sliding_window` tokens of the stream, with
        their true distances. Keys: the layer's history (the Hn tokens before the window, at
        positions sink - Hn .. sink - 1), then the cache slots; the sink slots only while nothing
        has been compressed (then they directly precede the window in the stream). No memory, no
        gate: this is the base model's own sliding-window attention at any input length."""
        s, n_slots, hn = local.sink, k_cache.shape[1], local.k.shape[1]
        keys = jnp.concatenate([local.k.astype(k_cache.dtype), k_cache], axis=1)
        values = jnp.concatenate([local.v.astype(v_cache.dtype), v_cache], axis=1)
        k_pos = np.concatenate([np.arange(s - hn, s), np.arange(n_slots)]).astype(np.int32)
        detached = jnp.any(local.valid, axis=1)  # the window no longer follows the sink
        sink_visible = jnp.asarray(np.arange(n_slots) >= s)[None, :] | ~detached[:, None]
        k_valid = jnp.concatenate([local.valid, valid & sink_visible], axis=1)
        dist = q_pos[:, None] - jnp.asarray(k_pos)[None, :]
        mask = k_valid[:, None, :] & ((dist >= 0) & (dist < self.sliding_window))[None]
        q_idx = q_pos - local.start
        q_rot = apply_rope(q, jnp.take(local.cos, q_idx, axis=0), jnp.take(local.sin, q_idx, axis=0))
        k_rot = apply_rope(keys, local.cos[k_pos - local.start], local.sin[k_pos - local.start])
        return local_attention(q_rot, k_rot, values, mask, self.scale, self.softcap)
