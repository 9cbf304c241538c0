"""The EdgeInfinite decoder LM (DESIGN §1).

All sequence state lives in `State`, passed in and returned; the module holds only parameters.
The cache has `sink + window` slots and slot i always sits at RoPE position i:

    prefill(state, tokens)  T new tokens into slots fill..fill+T-1, attend, return hidden states
    compress(state)         fold the window slots into memory (M, z) and empty the window
    step_segment(...)       prefill one window-sized segment, then compress
    forward(tokens)         sink + segments laid out flat [B, S + n*L]: the same values, layer by layer (training)

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
from eijax.local_history import history_indices, roll_history
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
    # MemoryConfig.key_conv only, else None: the last key_conv - 1 pre-RoPE keys written to memory
    # (right-aligned), which the next window's first keys are convolved with (`memory.conv_keys`).
    conv_k: jax.Array | None = None       # [NL, B, key_conv - 1, Hkv, d]
    conv_valid: jax.Array | None = None   # [B, key_conv - 1] bool


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
        if mem.key_conv:
            local.update(conv_k=jnp.zeros((cfg.n_layers, batch, mem.key_conv - 1, cfg.n_kv_heads, cfg.head_dim), dtype),
                         conv_valid=jnp.zeros((batch, mem.key_conv - 1), bool))
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

    def _block_caller(self):
        """One layer as a pure function of its parameters: (p, h, k, v, slots_valid, fill, memory,
        written, local) -> (h, k, v), `local` being (is_local, history k, history v, history valid)
        for models with local layers, else None."""
        cos, sin = self._rope()
        graph = nnx.graphdef(self.blocks)
        if self.config.has_local_layers:
            local_cos, local_sin, start = self._local_rope()

        def call(p, h, k, v, slots_valid, fill, memory, written, local, qkv=None):
            ctx = None if local is None else LocalContext(*local, local_cos, local_sin, start, self.memory_config.sink)
            return nnx.merge(graph, p)(h, k, v, slots_valid, fill, memory, written, cos, sin, ctx, qkv)

        return call

    def _layer_body(self, state: State, slots_valid: jax.Array):
        """One layer, (h, k, v, xs) -> (h, k, v), xs being one layer's slice of `_layer_inputs`."""
        call = self._block_caller()
        has_local = self.config.has_local_layers

        def block(h, k, v, xs):
            p, m, z, *rest = xs
            local = (rest[0], rest[1], rest[2], state.local_valid) if has_local else None
            return call(p, h, k, v, slots_valid, state.fill, mem_lib.Memory(m, z), state.written, local)

        if self.memory_config.resolved_remat() in ("layer", "both"):
            block = jax.checkpoint(block)  # saves this layer's inputs, not the whole carried caches
        return block

    def prefill(self, state: State, tokens: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, State]:
        return self.prefill_embedded(state, self.embed_tokens(tokens), valid, cache_in_carry=True)

    def compress(self, state: State) -> State:
        """Fold the window (slots sink..) into memory and empty it. With memory disabled it just drops it.
        The key convolution's history (MemoryConfig.key_conv) and the local layers' own window (if
        any) roll forward: see `memory.conv_keys` and `roll_history`."""
        mem = self.memory_config
        s = mem.sink
        window_valid = state.valid[:, s:]
        memory, written = state.memory, state.written
        extra = {}  # State fields of the key convolution and the local layers, when the model has them
        if mem.enabled:
            keys = state.k[:, :, s:]
            if mem.key_conv:
                conv = lambda k, taps, hist: mem_lib.conv_keys(k, window_valid, taps, hist, state.conv_valid)
                keys, conv_k, conv_valid = jax.vmap(conv)(keys, self.blocks.key_conv.taps[...], state.conv_k)
                extra.update(conv_k=conv_k, conv_valid=conv_valid[0])
            fold = lambda m, k, v, *memory_path: fold_window(m, k, v, window_valid, mem, *memory_path)
            memory = jax.vmap(fold)(memory, keys, state.v[:, :, s:], *self._memory_path_params())
            memory = self._global_only(memory, state.memory)
            written = written | window_valid.any(axis=1)
        if self.config.has_local_layers:
            src, keep = history_indices(state.local_valid, state.valid, s)
            extra.update(local_k=roll_history(state.local_k, state.k, src, keep),
                         local_v=roll_history(state.local_v, state.v, src, keep), local_valid=keep)
        return state._replace(valid=state.valid.at[:, s:].set(False), fill=jnp.minimum(state.fill, s),
                              memory=memory, written=written, **extra)

    def _memory_path_params(self, blocks=None) -> tuple:
        """(adapter (k, v) maps or None, write gate (w, b) or None, retention γ or None) of `blocks`
        (default: all layers)."""
        blocks = self.blocks if blocks is None else blocks
        adapter, gate, decay = blocks.memory_adapter, blocks.write_gate, blocks.memory_decay
        return (None if adapter is None else (adapter.k[...], adapter.v[...]),
                None if gate is None else (gate.w[...], gate.b[...]),
                None if decay is None else decay.retain())

    def step_segment(self, state: State, tokens: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, State]:
        """One segment of `window` tokens into the empty window, then compress. Returns hidden states."""
        at_sink = state._replace(fill=jnp.asarray(self.memory_config.sink, jnp.int32))
        hidden, state = self.prefill_embedded(at_sink, self.embed_tokens(tokens), valid)
        return hidden, self.compress(state)

    # ---------------------------------------------------------------- whole sequences
    def forward(self, tokens: jax.Array, valid: jax.Array | None = None, *, frozen_local: bool = False) -> jax.Array:
        """Hidden states for a laid-out sequence [B, sink + (n-1)*window + t], 0 < t <= window
        (see `pad_to_layout`; t = window is the plain layout). The same values as streaming it
        through `prefill` and `compress` (DESIGN §2.2), computed layer by layer.

        A layer's memory before segment i depends only on that layer's own keys and values of
        segments < i, and those come from the layer's input. So each layer (a `jax.lax.scan` over
        the stacked layers, or a Python loop over them: `MemoryConfig.layer_loop`) runs the sink
        once, projects k and v of all segments at once, scans the small memory update over
        segments (`fold_window`: each segment's memory is read by it), and then runs every full
        segment as one batch, each row reading its own memory. Against a scan
        over segments of a scan over layers this reads each layer's weights once per pass, not once
        per segment (a copy out of the stacked arrays on CPU: 0.8 s of a 5.6 s S-SFT step), stores
        the backward's residuals once, not twice (nested scans stack them twice), and multiplies
        larger matrices. A shorter last segment (t < window) is the same on its own slots: padding
        is never attended to, so trimming a segment's trailing padding changes no output (S-SFT's
        question segment is mostly padding; the trainer trims it).

        Remat (`MemoryConfig.remat`): "layer" recomputes each layer's pass in the backward from its
        input; "segment" each group of segments (the sink, segment 0, the full segments, the last)
        from its input and memory; "both" nests them.

        `frozen_local=True` says that only memory-path parameters (gate, memory adapter, write gate)
        are being differentiated. The sink and segment 0 run with memory empty, so their local path
        (gate bypassed) depends on nothing trainable: their backward is skipped (stop_gradient), a
        quarter of a 4-segment step (the sink only, when a memory prior is read from segment 0).
        Values are unchanged; only gradients of local-path parameters would be lost, hence the flag.
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
        init = self.init_state(b)
        # a long input starts its memory from the prior once the sink is in (as Generator does)
        start = self.prime(init) if n_seg > 1 and self.primes else init
        first = 1 if frozen_local and n_seg > 1 and not self.primes else 0  # segment 0 without its backward
        n_full = (n_seg if tail == w else n_seg - 1) - first

        sink_slots = jnp.zeros((b, mem.cache_size), bool).at[:, :s].set(valid[:, :s])

        def group(lo: int, n: int, length: int) -> tuple:
            """Segments lo..lo+n-1 of `length` tokens, batch-major (a sharded batch axis stays the
            leading one): hidden [B, n, length, D] and (slot validity [B, n, C], memory written
            before each [B, n], index [n])."""
            at, end = s + lo * w, s + lo * w + (n - 1) * w + length
            seg_valid = valid[:, at:end].reshape(b, n, length)
            slots = jnp.broadcast_to(sink_slots[:, None], (b, n, sink_slots.shape[1])).at[:, :, s:s + length].set(seg_valid)
            any_valid = seg_valid.any(axis=2)
            before = jnp.cumsum(any_valid, axis=1) - any_valid  # earlier segments of the group
            written = (start.written | valid[:, s:at].any(axis=1))[:, None] | (before > 0)
            return x[:, at:end].reshape(b, n, length, -1), (slots, written, jnp.arange(lo, lo + n))

        groups = {}  # name -> (hidden, per-segment inputs, frozen)
        if first:
            groups["first"] = (*group(0, 1, w), True)
        if n_full:
            groups["full"] = (*group(first, n_full, w), False)
        if tail < w:
            groups["tail"] = (*group(n_seg - 1, 1, tail), False)

        call = self._block_caller()
        graph = nnx.graphdef(self.blocks)
        has_local, every, remat = self.config.has_local_layers, mem.stop_gradient_every, mem.resolved_remat()
        fill = jnp.asarray(s, jnp.int32)
        flat = lambda a: a.reshape(-1, *a.shape[2:])  # [B, n, ...] -> [B * n, ...]

        def layer(h, xs):
            p, m0, z0, is_local = xs
            k0 = jnp.zeros(init.k.shape[1:], init.k.dtype)
            v0 = jnp.zeros_like(k0)
            history = (init.local_k[0], init.local_v[0], init.local_valid) if has_local else None
            conv = (init.conv_k[0], init.conv_valid) if mem.key_conv and mem.enabled else None
            local = lambda hist: None if hist is None else (is_local, *hist)
            blk = nnx.merge(graph, p)
            memory_path = self._memory_path_params(blk)
            out = dict(h)
            if s:
                empty = mem_lib.Memory(jnp.zeros_like(m0), jnp.zeros_like(z0))
                out["sink"], k0, v0 = call(p, h["sink"], k0, v0, sink_slots, jnp.zeros((), jnp.int32), empty,
                                           init.written, local(history))
                if frozen_local:
                    out["sink"], k0, v0 = jax.lax.stop_gradient((out["sink"], k0, v0))

            def fold(carry, xs):  # one segment's memory update (and local history roll); emits what it reads
                memory, hist, conv = carry
                k, v, slots, idx = xs
                if every:  # truncated backprop through memory (and the local window): cut every `every` segments
                    cut = (idx % every) == 0
                    memory, hist, conv = jax.tree.map(lambda a: jnp.where(cut, jax.lax.stop_gradient(a), a),
                                                      (memory, hist, conv))
                read = (memory, hist)
                if mem.enabled:
                    keys = k
                    if conv is not None:  # the memory's keys from the last key_conv tokens (memory.conv_keys)
                        keys, *conv = mem_lib.conv_keys(k, slots[:, s:s + k.shape[1]], blk.key_conv.taps[...], *conv)
                        conv = tuple(conv)
                    new = fold_window(memory, keys, v, slots[:, s:s + k.shape[1]], mem, *memory_path)
                    memory = new if is_local is None else jax.tree.map(lambda n, o: jnp.where(is_local, o, n), new, memory)
                if hist is not None:
                    cache = lambda c0, c: jax.lax.dynamic_update_slice_in_dim(c0, c.astype(c0.dtype), s, axis=1)
                    src, keep = history_indices(hist[2], slots, s)
                    hist = (roll_history(hist[0], cache(k0, k), src, keep), roll_history(hist[1], cache(v0, v), src, keep),
                            keep)
                return (memory, hist, conv), read

            def segments(carry, hs, seg_xs, frozen):
                """n segments [B, n, t, D]: memory through them in order, then all of them in one batch."""
                slots, written, idx = seg_xs
                n = hs.shape[1]
                q, k, v = blk.project_qkv(blk.attn_norm(flat(hs)))
                by_segment = lambda a: a.reshape(b, n, *a.shape[1:]).swapaxes(0, 1)  # [B*n, ...] -> [n, B, ...]
                kv = (k, v) if not frozen else jax.lax.stop_gradient((k, v))
                carry, read = jax.lax.scan(fold, carry, (*map(by_segment, kv), slots.swapaxes(0, 1), idx))
                memory, hist = jax.tree.map(lambda a: flat(a.swapaxes(0, 1)), read)  # what each segment reads
                tile = lambda c: flat(jnp.broadcast_to(c[:, None], (b, n, *c.shape[1:])))
                ho, _, _ = call(p, flat(hs), tile(k0), tile(v0), flat(slots), fill, memory, flat(written), local(hist),
                                (q, k, v))
                ho = ho.reshape(hs.shape)
                return carry, jax.lax.stop_gradient(ho) if frozen else ho

            if remat in ("segment", "both"):
                segments = jax.checkpoint(segments, static_argnums=(3,))
            carry = (mem_lib.Memory(m0, z0), history, conv)
            for name in ("first", "full", "tail"):
                if name in groups:
                    carry, out[name] = segments(carry, h[name], groups[name][1], groups[name][2])
            return out, None

        if remat in ("layer", "both"):
            layer = jax.checkpoint(layer)
        is_local = jnp.asarray(self.config.local_layers) if has_local else None
        hidden = {"sink": x[:, :s]} if s else {}
        hidden.update({name: g[0] for name, g in groups.items()})
        per_layer = (nnx.state(self.blocks), start.memory.M, start.memory.z, is_local)
        if mem.resolved_layer_loop() == "unroll":  # straight-line layers: no stacked residuals (MemoryConfig.layer_loop)
            for i in range(self.config.n_layers):
                hidden, _ = layer(hidden, jax.tree.map(lambda a: a[i], per_layer))
        else:
            hidden, _ = jax.lax.scan(layer, hidden, per_layer)
        parts = [hidden[k].reshape(b, -1, hidden[k].shape[-1]) for k in ("first", "full", "tail") if k in hidden]
        return self.final_norm(jnp.concatenate(([hidden["sink"]] if s else []) + parts, axis=1))

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


def fold_window(memory: mem_lib.Memory, k: jax.Array, v: jax.Array, window_valid: jax.Array, mem: MemoryConfig,
                adapter: tuple[jax.Array, jax.Array] | None, write_gate: tuple[jax.Array, jax.Array] | None,
                retain: jax.Array | None = None) -> mem_lib.Memory:
    """One layer's compress: the window's pre-RoPE k, v [B, W, Hkv, d] through the memory adapter
    (if any) and written into memory, each token scaled by the write gate's strength (if any), after
    the memory is scaled by its retention γ [Hkv] (if any)."""
    if adapter is not None:  # memory-path maps
        k, v = adapt(k, adapter[0]), adapt(v, adapter[1])
    strength = None if write_gate is None else mem_lib.write_strength(*write_gate, k, v)
    return mem_lib.write(memory, k, v, window_valid, mem.rule, mem.eps, strength, retain)


def with_memory_config(model: EdgeInfiniteLM, memory: MemoryConfig) -> EdgeInfiniteLM:
    """The same parameter arrays (shared, not copied) under another MemoryConfig, e.g. another
    sink/window or memory off for the baselines. Gate type, adapter, write gate, prior, key_conv and decay are
    parameters: they must match."""
    old = model.memory_config
    if memory == old:
        return model
    fields = ("gate", "adapter", "write_gate", "prior", "key_conv", "decay", "decay_keep_heads")
    if any(getattr(memory, f) != getattr(old, f) for f in fields):
        raise ValueError("these memory-path fields shape the parameters and must match: have "
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
