"""The EdgeInfinite decoder LM (DESIGN §1).

All sequence state lives in `State`, passed in and returned; the module holds only parameters.
The cache has `sink + window` slots and slot i always sits at RoPE position i:

    prefill(state, tokens)  T new tokens into slots fill..fill+T-1, attend, return hidden states
    compress(state)         fold the window slots into memory (M, z) and empty the window
    step_segment(...)       prefill one window-sized segment, then compress
    forward(tokens)         sink + segments laid out flat [B, S + n*L]: jax.lax.scan over segments

Short inputs (<= sink + window tokens) never reach compress, so the model is the base model.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from eijax import memory as mem_lib
from eijax.config import MemoryConfig, ModelConfig, to_dtype
from eijax.layers import Block, Linear, RMSNorm, _param, adapt
from eijax.rope import rope_table


class State(NamedTuple):
    """Fixed-size inference / training state (DESIGN §1.4). Leading [n_layers] axis on k, v, memory."""

    k: jax.Array          # [NL, B, C, Hkv, d] pre-RoPE keys, C = sink + window
    v: jax.Array          # [NL, B, C, Hkv, d]
    valid: jax.Array      # [B, C] bool: slot holds a real token
    fill: jax.Array       # int32 scalar: next free slot
    memory: mem_lib.Memory  # M [NL, B, Hkv, d, d], z [NL, B, Hkv, d], float32
    written: jax.Array    # [B] bool: memory holds at least one token (else the gate is bypassed)


class EdgeInfiniteLM(nnx.Module):
    def __init__(self, config: ModelConfig, memory: MemoryConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.memory_config = memory
        pd = to_dtype(config.param_dtype)
        self.embed = _param(rngs, (config.vocab_size, config.d_model), ("vocab", "embed"), pd, "normal")
        self.blocks = Block(config, memory, lead=(config.n_layers,), rngs=rngs)
        self.final_norm = RMSNorm(config.d_model, "embed", lead=(), lead_axes=(), eps=config.norm_eps, param_dtype=pd)
        self.lm_head = None if config.tie_embeddings else Linear(
            config.d_model, config.vocab_size, ("embed", "vocab"), lead=(), lead_axes=(), bias=False,
            param_dtype=pd, rngs=rngs)

    # ---------------------------------------------------------------- state
    def init_state(self, batch: int) -> State:
        cfg, mem = self.config, self.memory_config
        shape = (cfg.n_layers, batch, mem.cache_size, cfg.n_kv_heads, cfg.head_dim)
        dtype = to_dtype(cfg.dtype)
        return State(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, mem.cache_size), bool),
            fill=jnp.zeros((), jnp.int32),
            memory=mem_lib.empty_memory(batch, cfg.n_kv_heads, cfg.head_dim, lead=(cfg.n_layers,), dtype=dtype),
            written=jnp.zeros((batch,), bool),
        )

    # ---------------------------------------------------------------- pieces
    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], tokens, axis=0).astype(to_dtype(self.config.dtype))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden states -> float32 logits."""
        w = self.embed[...].T if self.lm_head is None else self.lm_head.kernel[...]
        return (hidden @ w.astype(hidden.dtype)).astype(jnp.float32)

    def _rope(self) -> tuple[jax.Array, jax.Array]:
        cos, sin = rope_table(self.config.rope, self.config.head_dim, self.memory_config.cache_size)
        return jnp.asarray(cos), jnp.asarray(sin)

    # ---------------------------------------------------------------- steps
    def prefill_embedded(self, state: State, x: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, State]:
        """Run T embedded tokens x [B, T, D] through all layers; returns final-normed hidden states.

        Valid tokens must form a prefix of each row (right padding); fill advances by the longest
        row's valid count. The caller keeps fill + T <= sink + window (checked when fill is concrete).
        """
        b, t, _ = x.shape
        if valid is None:
            valid = jnp.ones((b, t), bool)
        if not isinstance(state.fill, jax.core.Tracer) and int(state.fill) + t > self.memory_config.cache_size:
            raise ValueError(f"prefill of {t} tokens at slot {int(state.fill)} overflows the cache of "
                             f"{self.memory_config.cache_size} slots; compress first or use a smaller chunk")
        slots_valid = jax.lax.dynamic_update_slice(state.valid, valid, (jnp.zeros((), jnp.int32), state.fill.astype(jnp.int32)))
        cos, sin = self._rope()
        graph, params = nnx.split(self.blocks)

        def layer(h, xs):
            p, k, v, m, z = xs
            h, k, v = nnx.merge(graph, p)(h, k, v, slots_valid, state.fill, mem_lib.Memory(m, z), state.written, cos, sin)
            return h, (k, v)

        if self.memory_config.remat in ("layer", "both"):
            layer = jax.checkpoint(layer)
        x, (k, v) = jax.lax.scan(layer, x, (params, state.k, state.v, state.memory.M, state.memory.z))
        n_new = jnp.max(jnp.sum(valid, axis=1)).astype(jnp.int32)
        return self.final_norm(x), state._replace(k=k, v=v, valid=slots_valid, fill=state.fill + n_new)

    def prefill(self, state: State, tokens: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, State]:
        return self.prefill_embedded(state, self.embed_tokens(tokens), valid)

    def compress(self, state: State) -> State:
        """Fold the window (slots sink..) into memory and empty it. With memory disabled it just drops it."""
        mem = self.memory_config
        s = mem.sink
        window_valid = state.valid[:, s:]
        memory, written = state.memory, state.written
        if mem.enabled:
            k, v = state.k[:, :, s:], state.v[:, :, s:]
            adapter = self.blocks.memory_adapter
            if adapter is not None:  # memory-path maps, per layer
                k = jax.vmap(adapt)(k, adapter.k[...])
                v = jax.vmap(adapt)(v, adapter.v[...])
            write = lambda m, z, k, v: mem_lib.write(mem_lib.Memory(m, z), k, v, window_valid, mem.rule, mem.eps)
            memory = jax.vmap(write)(memory.M, memory.z, k, v)
            written = written | window_valid.any(axis=1)
        return state._replace(valid=state.valid.at[:, s:].set(False), fill=jnp.minimum(state.fill, s),
                              memory=memory, written=written)

    def step_segment(self, state: State, tokens: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, State]:
        """One segment of `window` tokens into the empty window, then compress. Returns hidden states."""
        return self._step_segment_embedded(state, self.embed_tokens(tokens), valid)

    def _step_segment_embedded(self, state, x, valid):
        hidden, state = self.prefill_embedded(state._replace(fill=jnp.asarray(self.memory_config.sink, jnp.int32)), x, valid)
        return hidden, self.compress(state)

    # ---------------------------------------------------------------- whole sequences
    def forward(self, tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """Hidden states for a laid-out sequence [B, sink + n*window] (see `pad_to_layout`).

        The sink is prefilled once; segments go through `jax.lax.scan`, carrying only the memory
        (the sink cache is a constant of the scan and the window is empty at every segment start),
        so with remat the saved activations per segment are just (M, z).
        """
        mem = self.memory_config
        b, n_tokens = tokens.shape
        s, w = mem.sink, mem.window
        n_seg, rest = divmod(n_tokens - s, w)
        if n_tokens < s or rest or n_seg < 1:
            raise ValueError(f"forward expects sink + n*window tokens (sink={s}, window={w}, n>=1); got {n_tokens}. "
                             "Use eijax.pad_to_layout for raw token streams.")
        if valid is None:
            valid = jnp.ones((b, n_tokens), bool)
        x = self.embed_tokens(tokens)
        state = self.init_state(b)
        parts = []
        if s:
            h_sink, state = self.prefill_embedded(state, x[:, :s], valid[:, :s])
            parts.append(h_sink)
        sink_state = state
        seg_x = x[:, s:].reshape(b, n_seg, w, -1).swapaxes(0, 1)
        seg_valid = valid[:, s:].reshape(b, n_seg, w).swapaxes(0, 1)
        every = mem.stop_gradient_every

        def body(carry, xs):
            memory, written = carry
            xi, vi, idx = xs
            if every:  # truncated backprop through memory: cut every `every` segments
                cut = (idx % every) == 0
                memory = jax.tree.map(lambda a: jnp.where(cut, jax.lax.stop_gradient(a), a), memory)
            hidden, out = self._step_segment_embedded(sink_state._replace(memory=memory, written=written), xi, vi)
            return (out.memory, out.written), hidden

        if mem.remat in ("segment", "both"):
            body = jax.checkpoint(body)
        _, hs = jax.lax.scan(body, (state.memory, state.written), (seg_x, seg_valid, jnp.arange(n_seg)))
        parts.append(hs.swapaxes(0, 1).reshape(b, n_seg * w, -1))
        return jnp.concatenate(parts, axis=1)

    def __call__(self, tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """Logits for a laid-out sequence (see `forward`)."""
        return self.logits(self.forward(tokens, valid))


def with_memory_config(model: EdgeInfiniteLM, memory: MemoryConfig) -> EdgeInfiniteLM:
    """The same parameter arrays (shared, not copied) under another MemoryConfig, e.g. another
    sink/window or memory off for the baselines. Gate type and adapter are parameters: they must match."""
    old = model.memory_config
    if memory == old:
        return model
    if (memory.gate, memory.adapter) != (old.gate, old.adapter):
        raise ValueError(f"gate/adapter change the parameters: have gate={old.gate!r} adapter={old.adapter}, "
                         f"asked gate={memory.gate!r} adapter={memory.adapter}")
    twin = nnx.eval_shape(lambda: EdgeInfiniteLM(model.config, memory, rngs=nnx.Rngs(0)))
    nnx.update(twin, nnx.state(model))
    return twin


def layout_length(n_tokens: int, memory: MemoryConfig) -> int:
    """Smallest sink + n*window (n >= 1) that holds n_tokens."""
    n_seg = max(1, -(-(n_tokens - memory.sink) // memory.window))
    return memory.sink + n_seg * memory.window


def pad_to_layout(tokens: jax.Array, memory: MemoryConfig, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """Right-pad a raw stream [B, T] to the flat sink+segments layout; returns (tokens, valid).

    A raw stream needs no other change: sink = its first `sink` tokens, then consecutive segments.
    """
    b, t = tokens.shape
    total = layout_length(t, memory)
    padded = jnp.full((b, total), pad_id, tokens.dtype).at[:, :t].set(tokens)
    valid = jnp.zeros((b, total), bool).at[:, :t].set(True)
    return padded, valid


@nnx.jit
def jit_forward(model: EdgeInfiniteLM, tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Jitted `model(tokens, valid)` (logits); compiled once per model structure and shapes."""
    return model(tokens, valid)


@nnx.jit
def jit_prefill(model: EdgeInfiniteLM, state: State, tokens: jax.Array, valid: jax.Array | None = None):
    """Jitted `model.prefill` returning (float32 logits, state)."""
    hidden, state = model.prefill(state, tokens, valid)
    return model.logits(hidden), state
