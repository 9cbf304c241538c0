"""The EdgeInfinite decoder LM (DESIGN §1).

All sequence state lives in `State`, passed in and returned; the module holds only parameters.
The cache has `sink + window` slots and slot i always sits at RoPE position i:

    prefill(state, tokens)  T new tokens into slots fill..fill+T-1, attend, return hidden states
    compress(state)         fold the window slots into memory (M, z) and empty the window
    step_segment(...)       prefill one window-sized segment, then compress
    forward(tokens)         sink + segments laid out flat [B, S + n*L]: jax.lax.scan over segments

Short inputs (<= sink + window tokens) never reach compress, so the model is the base model.

Models with sliding-window (local) layers (Gemma 3) put memory in the global layers only. Each
local layer keeps its own bounded window instead: State.local_k/local_v hold its pre-RoPE keys and
values of the `sliding_window - 1` tokens before the cache window, rolled forward by `compress`,
so a local layer attends to exactly the tokens the base model's would, at their true distances,
at any length; its memory stays empty and its gate unused. The state stays fixed-size and a
per-layer flag, scanned with the parameters, keeps one compiled layer body (README "Gemma 3").
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from eijax import memory as mem_lib
from eijax.config import MemoryConfig, ModelConfig, to_dtype
from eijax.layers import Block, Linear, LocalContext, RMSNorm, _param, adapt
from eijax.rope import rope_table


class State(NamedTuple):
    """Fixed-size inference / training state (DESIGN §1.4). Leading [n_layers] axis on k, v, memory."""

    k: jax.Array          # [NL, B, C, Hkv, d] pre-RoPE keys, C = sink + window
    v: jax.Array          # [NL, B, C, Hkv, d]
    valid: jax.Array      # [B, C] bool: slot holds a real token
    fill: jax.Array       # int32 scalar: next free slot
    memory: mem_lib.Memory  # M [NL, B, Hkv, d, d], z [NL, B, Hkv, d], float32
    written: jax.Array    # [B] bool: memory holds at least one token (else the gate is bypassed)
    # Models with local (sliding-window) layers only, else None: the Hn = sliding_window - 1 tokens
    # of the stream just before the window (right-aligned), the local layers' own bounded window.
    local_k: jax.Array | None = None      # [NL, B, Hn, Hkv, d] pre-RoPE (rows of global layers unused)
    local_v: jax.Array | None = None      # [NL, B, Hn, Hkv, d]
    local_valid: jax.Array | None = None  # [B, Hn] bool


class EdgeInfiniteLM(nnx.Module):
    def __init__(self, config: ModelConfig, memory: MemoryConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.memory_config = memory
        pd = to_dtype(config.param_dtype)
        self.embed = _param(rngs, (config.vocab_size, config.d_model), ("vocab", "embed"), pd, "normal")
        self.blocks = Block(config, memory, lead=(config.n_layers,), rngs=rngs)
        self.final_norm = RMSNorm(config.d_model, "embed", lead=(), lead_axes=(), eps=config.norm_eps, param_dtype=pd,
                                  offset=config.gemma)
        self.lm_head = None if config.tie_embeddings else Linear(
            config.d_model, config.vocab_size, ("embed", "vocab"), lead=(), lead_axes=(), bias=False,
            param_dtype=pd, rngs=rngs)

    # ---------------------------------------------------------------- state
    def init_state(self, batch: int) -> State:
        cfg, mem = self.config, self.memory_config
        shape = (cfg.n_layers, batch, mem.cache_size, cfg.n_kv_heads, cfg.head_dim)
        dtype = to_dtype(cfg.dtype)
        local = {}
        if cfg.has_local_layers:
            hn = cfg.local_history
            hist = (cfg.n_layers, batch, hn, cfg.n_kv_heads, cfg.head_dim)
            local = dict(local_k=jnp.zeros(hist, dtype), local_v=jnp.zeros(hist, dtype),
                         local_valid=jnp.zeros((batch, hn), bool))
        return State(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, mem.cache_size), bool),
            fill=jnp.zeros((), jnp.int32),
            memory=mem_lib.empty_memory(batch, cfg.n_kv_heads, cfg.head_dim, lead=(cfg.n_layers,), dtype=dtype),
            written=jnp.zeros((batch,), bool),
            **local,
        )

    @property
    def primes(self) -> bool:
        """Whether long inputs start from the memory prior (see `prime`)."""
        return self.memory_config.enabled and self.blocks.memory_prior is not None

    def prime(self, state: State) -> State:
        """Start the memory from the stored prior (M0, z0) and read it from the next token on: applied
        once the sink is full, only to inputs longer than sink + window (MemoryConfig.prior). Any other
        state passes through unchanged, so callers need not check `primes`."""
        if not self.primes:
            return state
        prior, b = self.blocks.memory_prior, state.written.shape[0]
        lead = lambda a: jnp.broadcast_to(a[:, None], (a.shape[0], b, *a.shape[1:])).astype(state.memory.M.dtype)
        memory = self._global_only(mem_lib.Memory(M=lead(prior.M[...]), z=lead(prior.z[...])), state.memory)
        return state._replace(memory=memory, written=jnp.ones_like(state.written))

    def _global_only(self, new: mem_lib.Memory, old: mem_lib.Memory) -> mem_lib.Memory:
        """`new` in the layers that have memory, `old` in local (sliding-window) layers."""
        if not self.config.has_local_layers:
            return new
        is_global = ~jnp.asarray(self.config.local_layers)
        return jax.tree.map(lambda n, o: jnp.where(is_global.reshape(-1, *(1,) * (n.ndim - 1)), n, o), new, old)

    # ---------------------------------------------------------------- pieces
    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        dtype = to_dtype(self.config.dtype)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        if self.config.gemma:  # scaled by sqrt(d_model), the scale rounded to the compute dtype as HF does
            x = x * jnp.asarray(math.sqrt(self.config.d_model), dtype)
        return x

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden states -> float32 logits (soft-capped where the config says so)."""
        w = self.embed[...].T if self.lm_head is None else self.lm_head.kernel[...]
        out = (hidden @ w.astype(hidden.dtype)).astype(jnp.float32)
        if self.config.final_softcap:
            out = jnp.tanh(out / self.config.final_softcap) * self.config.final_softcap
        return out

    def _rope(self) -> tuple[jax.Array, jax.Array]:
        cos, sin = rope_table(self.config.rope, self.config.head_dim, self.memory_config.cache_size)
        return jnp.asarray(cos), jnp.asarray(sin)

    def _local_rope(self) -> tuple[jax.Array, jax.Array, int]:
        """The local layers' RoPE table from the oldest history position (sink - Hn, or 0) to the
        last cache slot, and that first position."""
        start = min(0, self.memory_config.sink - self.config.local_history)
        n = self.memory_config.cache_size - start
        cos, sin = rope_table(self.config.local_rope, self.config.head_dim, n, start=start)
        return jnp.asarray(cos), jnp.asarray(sin), start

    # ---------------------------------------------------------------- steps
    def prefill_embedded(self, state: State, x: jax.Array, valid: jax.Array | None = None, *,
                         cache_in_carry: bool = False) -> tuple[jax.Array, State]:
        """Run T embedded tokens x [B, T, D] through all layers; returns final-normed hidden states.

        `cache_in_carry` (inference: `prefill`) carries the stacked KV caches through the layer scan
        and updates each layer's slice in place; otherwise (training) they are the scan's inputs and
        outputs. Same values. In place, a donated cache needs no fresh copy per call (as scanned
        inputs and outputs it did: XLA cannot write ys over the xs it is still reading; ~42 MB of
        new pages per SmolLM2 decode step, a third of the step in page faults, seen with
        benchmarks/decode_step.py --profile). Under differentiation the carried caches measured
        slower (S-SFT step 35.7 s against 29.7 s per pass, benchmarks/ssft_step.py, one run each),
        so training keeps xs/ys.

        Valid tokens must form a prefix of each row (right padding); fill advances by the longest
        row's valid count. The caller keeps fill + T <= sink + window (checked when fill is concrete).
        """
        slots_valid, n_new = self._claim_slots(state, x, valid)
        block = self._layer_body(state, slots_valid)
        xs = self._layer_inputs(state, nnx.state(self.blocks))
        if cache_in_carry:
            def layer(carry, xs):
                h, k_all, v_all, i = carry
                k, v = (jax.lax.dynamic_index_in_dim(c, i, keepdims=False) for c in (k_all, v_all))
                h, k, v = block(h, k, v, xs)
                k_all, v_all = (jax.lax.dynamic_update_index_in_dim(c, u, i, 0) for c, u in ((k_all, k), (v_all, v)))
                return (h, k_all, v_all, i + 1), None

            (x, k, v, _), _ = jax.lax.scan(layer, (x, state.k, state.v, jnp.zeros((), jnp.int32)), xs)
        else:
            def layer(h, xs):
                h, k, v = block(h, *xs[:2], xs[2:])
                return h, (k, v)

            x, (k, v) = jax.lax.scan(layer, x, (state.k, state.v) + xs)
        return self.final_norm(x), state._replace(k=k, v=v, valid=slots_valid, fill=state.fill + n_new)

    def prefill_unrolled(self, layer_params: tuple[nnx.State, ...], state: State, tokens: jax.Array,
                         valid: jax.Array | None = None) -> tuple[jax.Array, State]:
        """`prefill` with the layer loop unrolled over per-layer weights (`split_layers`) and caches
        (state.k, state.v as per-layer tuples: `split_caches`). Same values. For decode: a scan
        copies each layer's weights out of the stacked arrays (425 MB per SmolLM2 token, seen in
        the profile); unrolled, the dots read them in place (56 -> 36 ms a step,
        benchmarks/decode_step.py). It compiles slower, so prefill keeps the scan."""
        x = self.embed_tokens(tokens)
        slots_valid, n_new = self._claim_slots(state, x, valid)
        block = jax.jit(self._layer_body(state, slots_valid))  # traced once for all layers, not 30 times
        stacked = self._layer_inputs(state, None)[1:]  # memory (and local history), sliced per layer below
        ks, vs = [], []
        for i, p in enumerate(layer_params):
            x, k, v = block(x, state.k[i], state.v[i], (p,) + tuple(a[i] for a in stacked))
            ks.append(k)
            vs.append(v)
        return self.final_norm(x), state._replace(k=tuple(ks), v=tuple(vs), valid=slots_valid, fill=state.fill + n_new)

    def _claim_slots(self, state: State, x: jax.Array, valid: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Slot validity after writing x [B, T, D] at fill (checked against the cache size when fill
        is concrete), and how far fill advances (the longest row's valid count)."""
        b, t, _ = x.shape
        if valid is None:
            valid = jnp.ones((b, t), bool)
        if not isinstance(state.fill, jax.core.Tracer) and int(state.fill) + t > self.memory_config.cache_size:
            raise ValueError(f"prefill of {t} tokens at slot {int(state.fill)} overflows the cache of "
                             f"{self.memory_config.cache_size} slots; compress first or use a smaller chunk")
        slots_valid = jax.lax.dynamic_update_slice(state.valid, valid, (jnp.zeros((), jnp.int32), state.fill.astype(jnp.int32)))
        return slots_valid, jnp.max(jnp.sum(valid, axis=1)).astype(jnp.int32)

    def _layer_inputs(self, state: State, params) -> tuple:
        """Per-layer inputs with a leading layer axis: (params, M, z[, is_local, local_k, local_v])."""
        xs = (params, state.memory.M, state.memory.z)
        if self.config.has_local_layers:  # per-layer kind, scanned with the parameters: one compiled layer body
            xs += (jnp.asarray(self.config.local_layers), state.local_k, state.local_v)
        return xs

    def _layer_body(self, state: State, slots_valid: jax.Array):
        """One layer, (h, k, v, xs) -> (h, k, v), xs being one layer's slice of `_layer_inputs`."""
        cos, sin = self._rope()
        graph = nnx.graphdef(self.blocks)
        has_local = self.config.has_local_layers
        if has_local:
            local_cos, local_sin, start = self._local_rope()

        def block(h, k, v, xs):
            p, m, z, *rest = xs
            local = None
            if has_local:
                is_local, hk, hv = rest
                local = LocalContext(is_local, hk, hv, state.local_valid, local_cos, local_sin, start,
                                     self.memory_config.sink)
            return nnx.merge(graph, p)(h, k, v, slots_valid, state.fill, mem_lib.Memory(m, z), state.written, cos, sin,
                                       local)

        if self.memory_config.resolved_remat() in ("layer", "both"):
            block = jax.checkpoint(block)  # saves this layer's inputs, not the whole carried caches
        return block

    def prefill(self, state: State, tokens: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, State]:
        return self.prefill_embedded(state, self.embed_tokens(tokens), valid, cache_in_carry=True)

    def compress(self, state: State) -> State:
        """Fold the window (slots sink..) into memory and empty it. With memory disabled it just drops it.
        Local layers (if any) roll their own window forward instead: see `_roll_local_history`."""
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
            write = lambda m, z, k, v, *wb: mem_lib.write(mem_lib.Memory(m, z), k, v, window_valid, mem.rule, mem.eps,
                                                          mem_lib.write_strength(*wb, k, v) if wb else None)
            gate = self.blocks.write_gate
            wb = () if gate is None else (gate.w[...], gate.b[...])
            memory = self._global_only(jax.vmap(write)(memory.M, memory.z, k, v, *wb), state.memory)
            written = written | window_valid.any(axis=1)
        local = self._roll_local_history(state) if self.config.has_local_layers else {}
        return state._replace(valid=state.valid.at[:, s:].set(False), fill=jnp.minimum(state.fill, s),
                              memory=memory, written=written, **local)

    def _roll_local_history(self, state: State) -> dict[str, jax.Array]:
        """The local layers' history after compress: per row, the last Hn valid tokens of
        [history ; sink (until the first compress: then it directly precedes the window) ; window],
        in stream order, right-aligned (slot Hn - 1 is the token just before the next window)."""
        s, hn = self.memory_config.sink, self.config.local_history
        detached = jnp.any(state.local_valid, axis=1)
        all_valid = jnp.concatenate([state.local_valid, state.valid[:, :s] & ~detached[:, None], state.valid[:, s:]],
                                    axis=1)                                          # [B, Hn + C]
        count = jnp.cumsum(all_valid.astype(jnp.int32), axis=1)                      # valid entries so far
        # history slot j takes the valid entry numbered total - Hn + 1 + j (the first index reaching it)
        want = count[:, -1:] - hn + 1 + jnp.arange(hn, dtype=jnp.int32)[None, :]     # [B, Hn]
        src = jax.vmap(lambda c, w: jnp.searchsorted(c, w, side="left"))(count, want)
        src = jnp.minimum(src, all_valid.shape[1] - 1).astype(jnp.int32)
        keep = want >= 1

        def roll(hist, cache):  # [NL, B, Hn, Hkv, d], [NL, B, C, Hkv, d]
            both = jnp.concatenate([hist, cache.astype(hist.dtype)], axis=2)
            taken = jnp.take_along_axis(both, src[None, :, :, None, None], axis=2)
            return jnp.where(keep[None, :, :, None, None], taken, jnp.zeros((), hist.dtype))

        return dict(local_k=roll(state.local_k, state.k), local_v=roll(state.local_v, state.v), local_valid=keep)

    def step_segment(self, state: State, tokens: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, State]:
        """One segment of `window` tokens into the empty window, then compress. Returns hidden states."""
        return self._step_segment_embedded(state, self.embed_tokens(tokens), valid)

    def _step_segment_embedded(self, state, x, valid, frozen_local: bool = False):
        hidden, state = self.prefill_embedded(state._replace(fill=jnp.asarray(self.memory_config.sink, jnp.int32)), x, valid)
        if frozen_local:  # see `forward`: nothing trainable upstream of this segment's local path
            hidden, state = jax.lax.stop_gradient((hidden, state))
        return hidden, self.compress(state)

    # ---------------------------------------------------------------- whole sequences
    def forward(self, tokens: jax.Array, valid: jax.Array | None = None, *, frozen_local: bool = False) -> jax.Array:
        """Hidden states for a laid-out sequence [B, sink + (n-1)*window + t], 0 < t <= window
        (see `pad_to_layout`; t = window is the plain layout).

        The sink is prefilled once; full segments go through `jax.lax.scan`, carrying only the
        memory (the sink cache is a constant of the scan and the window is empty at every segment
        start), so with remat the saved activations per segment are just (M, z). A shorter last
        segment (t < window) is the same step on fewer slots: padding is never attended to, so
        trimming a segment's trailing padding changes no output (S-SFT's question segment is
        mostly padding; the trainer trims it).

        `frozen_local=True` says that only memory-path parameters (gate, memory adapter) are being
        differentiated. The sink and segment 0 run with memory empty, so their local path (gate
        bypassed) depends on nothing trainable: their backward is skipped (stop_gradient), a
        quarter of a 4-segment step (the sink only, when a memory prior is read from segment 0).
        Values are unchanged; only gradients of local-path
        parameters would be lost, hence the flag.
        """
        mem = self.memory_config
        b, n_tokens = tokens.shape
        s, w = mem.sink, mem.window
        if n_tokens <= s:
            raise ValueError(f"forward expects sink + n*window tokens (sink={s}, window={w}, n>=1; the last "
                             f"segment may be shorter); got {n_tokens}. Use eijax.pad_to_layout for raw token streams.")
        n_seg = -(-(n_tokens - s) // w)
        tail = n_tokens - s - (n_seg - 1) * w
        if valid is None:
            valid = jnp.ones((b, n_tokens), bool)
        x = self.embed_tokens(tokens)
        state = self.init_state(b)
        parts = []
        if s:
            h_sink, state = self.prefill_embedded(state, x[:, :s], valid[:, :s])
            if frozen_local:
                h_sink, state = jax.lax.stop_gradient((h_sink, state))
            parts.append(h_sink)
        sink_state = state
        # a long input starts its memory from the prior once the sink is in (as Generator does)
        primed = n_seg > 1 and self.primes
        if primed:
            state = self.prime(state)
        every = mem.stop_gradient_every

        def body(carry, xs, frozen=False):
            memory, written, local = carry
            xi, vi, idx = xs
            if every:  # truncated backprop through memory (and the local layers' window): cut every `every` segments
                cut = (idx % every) == 0
                memory, local = jax.tree.map(lambda a: jnp.where(cut, jax.lax.stop_gradient(a), a), (memory, local))
            seg_state = sink_state._replace(memory=memory, written=written, **(local or {}))
            hidden, out = self._step_segment_embedded(seg_state, xi, vi, frozen)
            return (out.memory, out.written, _local_part(out)), hidden

        body_frozen = functools.partial(body, frozen=True)
        if mem.resolved_remat() in ("segment", "both"):
            body, body_frozen = jax.checkpoint(body), jax.checkpoint(body_frozen)
        # the carry: memory, and the local layers' window where the model has local layers
        carry = (state.memory, state.written, _local_part(state))

        def segment(i: int, length: int):
            at = s + i * w
            return x[:, at:at + length], valid[:, at:at + length], jnp.asarray(i)

        first = 0
        if frozen_local and n_seg > 1 and not primed:  # segment 0 outside the scan, without its backward
            carry, h0 = body_frozen(carry, segment(0, w))
            parts.append(h0)
            first = 1
        n_full = (n_seg if tail == w else n_seg - 1) - first
        if n_full > 0:
            at, end = s + first * w, s + (first + n_full) * w
            seg_x = x[:, at:end].reshape(b, n_full, w, -1).swapaxes(0, 1)
            seg_valid = valid[:, at:end].reshape(b, n_full, w).swapaxes(0, 1)
            carry, hs = jax.lax.scan(body, carry, (seg_x, seg_valid, jnp.arange(first, first + n_full)))
            parts.append(hs.swapaxes(0, 1).reshape(b, n_full * w, -1))
        if first + max(n_full, 0) < n_seg:  # the shorter last segment, outside the scan (its own shapes)
            _, h_tail = body(carry, segment(n_seg - 1, tail))
            parts.append(h_tail)
        return jnp.concatenate(parts, axis=1)

    def __call__(self, tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """Logits for a laid-out sequence (see `forward`)."""
        return self.logits(self.forward(tokens, valid))


def split_layers(model: EdgeInfiniteLM) -> tuple[nnx.State, ...]:
    """Each layer's parameters as separate arrays (copies: the stacked ones stay for the scans),
    for `prefill_unrolled`."""
    return _unstack(nnx.state(model.blocks), model.config.n_layers)


@functools.partial(jax.jit, static_argnums=1)
def _unstack(stacked: nnx.State, n: int) -> tuple[nnx.State, ...]:
    # One dispatch: eagerly, SmolLM2's 30 x 12 slices cost ~0.4 s of a start.
    return tuple(jax.tree.map(lambda a: a[i], stacked) for i in range(n))


def split_caches(state: State) -> State:
    """The KV caches as per-layer tuples (the layout `prefill_unrolled` reads and returns)."""
    return state._replace(k=tuple(state.k), v=tuple(state.v))


def stack_caches(state: State) -> State:
    """Back to the stacked layout that `prefill` and `compress` take."""
    return state._replace(k=jnp.stack(state.k), v=jnp.stack(state.v))


def _local_part(state: State) -> dict[str, jax.Array] | None:
    if state.local_k is None:
        return None
    return dict(local_k=state.local_k, local_v=state.local_v, local_valid=state.local_valid)


def with_memory_config(model: EdgeInfiniteLM, memory: MemoryConfig) -> EdgeInfiniteLM:
    """The same parameter arrays (shared, not copied) under another MemoryConfig, e.g. another
    sink/window or memory off for the baselines. Gate type, adapter, write gate and prior are parameters: they must match."""
    old = model.memory_config
    if memory == old:
        return model
    fields = ("gate", "adapter", "write_gate", "prior")
    if any(getattr(memory, f) != getattr(old, f) for f in fields):
        raise ValueError("gate/adapter/write_gate change the parameters: have "
                         + ", ".join(f"{f}={getattr(old, f)!r}" for f in fields) + "; asked "
                         + ", ".join(f"{f}={getattr(memory, f)!r}" for f in fields))
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
