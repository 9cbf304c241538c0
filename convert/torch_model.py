"""PyTorch twin of `eijax.model.EdgeInfiniteLM`, written for torch.export / LiteRT.

Same semantics as eijax (DESIGN §1): a cache of `sink + window` slots where slot i sits at RoPE
position i, pre-RoPE keys, a [B, C] slot-valid mask, a fill pointer, float32 memory (M, z) per
layer and a `written` flag that bypasses the gate while memory is empty. Models with local
(sliding-window) layers (Gemma 3) follow eijax's choice (README "Gemma 3"): memory in the global
layers only, and each local layer keeps its own window of the `sliding_window - 1` tokens before
the cache window (`State.local_k/local_v/local_valid`), rolled forward by `compress`
(convert.torch_local).

Written for export: every shape is static, the fill position is a tensor used only through
one-hot masks (no data-dependent shapes, no Python branching on values), state goes in and comes
out (`State`, a registered pytree dataclass; per-layer tensors in lists so the graphs can name
one tensor per layer and never stack/unstack the cache).

Parameter names are eijax's flat paths with the layer index after `blocks` and Linear kernels
stored as torch `weight` [out, in] (so they lower to FULLY_CONNECTED):
    eijax blocks.q_proj.kernel [L, in, out]  <->  torch blocks.{i}.q_proj.weight [out, in]
See `convert.weights` for the rename + transpose.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from eijax.cli import InputError
from eijax.config import MemoryConfig, ModelConfig
from eijax.rope import inverse_frequencies, rope_table

from convert.torch_layers import AttentionView, Block, MemoryWrite, RMSNorm
from convert.torch_local import LocalHistory, local_view


@dataclasses.dataclass
class State:
    """Fixed-size inference state (DESIGN §1.4). Lists hold one tensor per layer."""

    k: list[torch.Tensor]   # [B, C, Hkv, d] pre-RoPE keys
    v: list[torch.Tensor]   # [B, C, Hkv, d]
    M: list[torch.Tensor]   # [B, Hkv, d, d] float32
    z: list[torch.Tensor]   # [B, Hkv, d] float32
    valid: torch.Tensor     # [B, C] bool: slot holds a real token
    fill: torch.Tensor      # int32 scalar: next free slot
    written: torch.Tensor   # [B] bool: memory holds at least one token
    # Models with local layers only, else None: per layer the pre-RoPE k / v of the Hn =
    # sliding_window - 1 tokens before the window (right-aligned), None for a global layer.
    local_k: list[torch.Tensor | None] | None = None   # [B, Hn, Hkv, d]
    local_v: list[torch.Tensor | None] | None = None
    local_valid: torch.Tensor | None = None            # [B, Hn] bool


pytree.register_dataclass(State)


def onehot_write(fill: torch.Tensor, t: int, n_slots: int):
    """Row writer by one-hot matmul: exact (one product by 1.0 plus zeros), no extra imports."""
    write = ((fill + torch.arange(t, dtype=torch.int32))[:, None] == torch.arange(n_slots, dtype=torch.int32)).float()
    keep = 1.0 - write.sum(0)

    def write_rows(cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        b = cache.shape[0]
        placed = torch.matmul(write.t(), new.reshape(b, t, -1)).reshape(cache.shape)
        return cache * keep.reshape(1, n_slots, *([1] * (cache.dim() - 2))) + placed
    return write_rows


def dus_write(fill: torch.Tensor, t: int, n_slots: int):
    """Row writer by DYNAMIC_UPDATE_SLICE (what LiteRT and NPUs handle best). It clamps the start
    so the update fits, so the caller must keep fill + T <= C."""
    from litert_torch.generative.custom_ops.dynamic_update_slice import dynamic_update_slice

    zero = torch.zeros((), dtype=torch.int32)

    def write_rows(cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        starts = [zero, fill.reshape(())] + [zero] * (cache.dim() - 2)
        return dynamic_update_slice(cache, new.to(cache.dtype), starts)
    return write_rows


WRITERS = {"onehot": onehot_write, "dus": dus_write}


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


class EdgeInfiniteTorch(nn.Module):
    """The whole LM. Methods mirror eijax: init_state, prefill, compress, step_segment, logits.

    `cache_write` picks how new rows enter the cache: "onehot" (default, plain torch) or "dus"
    (DYNAMIC_UPDATE_SLICE, set by the LiteRT exporter). Both give identical results.
    """

    def __init__(self, config: ModelConfig, memory: MemoryConfig, cache_write: str = "onehot"):
        super().__init__()
        if memory.key_conv:  # an experiment of the JAX model (MemoryConfig.key_conv), not in the shared semantics
            raise InputError(f"memory.key_conv={memory.key_conv}: the PyTorch twin and LiteRT graphs do not "
                             "implement the memory key convolution (JAX only)")
        if memory.gate == "joint":  # likewise (MemoryConfig.gate)
            raise InputError("memory.gate='joint': the PyTorch twin and LiteRT graphs do not implement the joint "
                             "gate (JAX only)")
        self.config, self.memory_config = config, memory
        self.cache_write = cache_write
        local = config.local_layers or (False,) * config.n_layers
        self.embed = nn.Parameter(torch.zeros(config.vocab_size, config.d_model))
        self.blocks = nn.ModuleList([Block(config, memory, local=is_local) for is_local in local])
        self.final_norm = RMSNorm(config.d_model, config.norm_eps, offset=config.gemma)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.mem_write = MemoryWrite(memory.rule, memory.eps)
        self.local_history = LocalHistory(config, memory) if config.has_local_layers else None
        # Keys are rotated over the whole cache with constant tables (slot == position); queries
        # compute their angles in the graph (a table lookup by position would become an
        # EMBEDDING_LOOKUP that quantisers mistake for a weight).
        cos, sin = rope_table(config.rope, config.head_dim, memory.cache_size)  # the same float32 tables as eijax
        inv = inverse_frequencies(config.rope, config.head_dim)
        self.register_buffer("rope_cos", torch.from_numpy(cos), persistent=False)
        self.register_buffer("rope_sin", torch.from_numpy(sin), persistent=False)
        self.register_buffer("inv_freq", torch.from_numpy(np.concatenate([inv, inv])), persistent=False)
        # Gemma scales embeddings by sqrt(d_model), the scale rounded to the compute dtype as HF does
        self.embed_scale = math.sqrt(config.d_model) if config.gemma else None

    def init_state(self, batch: int) -> State:
        cfg, c = self.config, self.memory_config.cache_size
        hkv, d, n = cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
        zeros = lambda *s: [torch.zeros(s) for _ in range(n)]
        local = {}
        if self.local_history is not None:
            hn = cfg.local_history
            history = lambda: [torch.zeros(batch, hn, hkv, d) if b.local else None for b in self.blocks]
            local = dict(local_k=history(), local_v=history(), local_valid=torch.zeros(batch, hn, dtype=torch.bool))
        return State(k=zeros(batch, c, hkv, d), v=zeros(batch, c, hkv, d), M=zeros(batch, hkv, d, d),
                     z=zeros(batch, hkv, d), valid=torch.zeros(batch, c, dtype=torch.bool),
                     fill=torch.zeros((), dtype=torch.int32), written=torch.zeros(batch, dtype=torch.bool), **local)

    @property
    def primes(self) -> bool:
        """Whether long inputs start from the memory prior (eijax EdgeInfiniteLM.prime)."""
        return self.memory_config.enabled and self.memory_config.prior

    def prime(self, state: State) -> State:
        """Memory := the prior (global layers), read from the next token on; unchanged without a prior.
        Applied once the sink is full, to inputs longer than sink + window, as eijax does."""
        if not self.primes:
            return state
        b = state.written.shape[0]
        M = [blk.memory_prior.M.detach().expand(b, *blk.memory_prior.M.shape).clone() if blk.use_memory else m
             for blk, m in zip(self.blocks, state.M)]
        z = [blk.memory_prior.z.detach().expand(b, *blk.memory_prior.z.shape).clone() if blk.use_memory else zz
             for blk, zz in zip(self.blocks, state.z)]
        return dataclasses.replace(state, M=M, z=z, written=torch.ones_like(state.written))

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        x = F.embedding(tokens, self.embed)
        return x if self.embed_scale is None else x * torch.tensor(self.embed_scale, dtype=x.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.embed if self.lm_head is None else self.lm_head.weight
        out = F.linear(hidden, w).float()
        cap = self.config.final_softcap
        return torch.tanh(out / cap) * cap if cap else out

    def prefill(self, state: State, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """T tokens into slots fill..fill+T-1; returns (final-normed hidden [B, T, D], new state).

        `valid` [B, T] must be a right-padded prefix; fill advances by the longest row's count.
        The caller keeps fill + T <= sink + window (outside export the check is done here).
        """
        return self._attend(state, tokens, valid, write=True)

    def decode(self, state: State, tokens: torch.Tensor) -> tuple[torch.Tensor, list, list, State]:
        """One token per row [B, 1], without rebuilding the caches: returns (hidden [B, 1, D], the
        token's k rows and v rows per layer [B, 1, Hkv, d], the state less those rows). Writing the
        rows at slot `fill` of the caches gives exactly `prefill`'s state; the LiteRT decode graph
        returns only the rows, so no cache is copied per token (docs/performance.md)."""
        hidden, new = self._attend(state, tokens, None, write=False)
        return hidden, new.k, new.v, dataclasses.replace(new, k=state.k, v=state.v)

    def _attend(self, state: State, tokens: torch.Tensor, valid: torch.Tensor | None, write: bool) -> tuple[torch.Tensor, State]:
        """`prefill`; with write=False (decode) the state's k, v are the new tokens' rows instead of the caches."""
        b, t = tokens.shape
        c = self.memory_config.cache_size
        if valid is None:
            valid = torch.ones(b, t, dtype=torch.bool)
        if not _tracing() and int(state.fill) + t > c:
            raise ValueError(f"prefill of {t} tokens at slot {int(state.fill)} overflows the cache of {c} "
                             "slots; compress first or use a smaller chunk")
        fill = state.fill.reshape(())
        slots = torch.arange(c, dtype=torch.int32)
        q_pos = fill + torch.arange(t, dtype=torch.int32)                      # [T]
        n_valid = valid.sum(dim=1).to(torch.int32)                             # [B]: valid is a prefix
        in_chunk = (slots >= fill) & (slots < fill + t)                        # [C]
        slot_valid = torch.where(in_chunk[None, :], slots[None, :] < (fill + n_valid)[:, None], state.valid)
        seen = slot_valid if write else state.valid  # decode attends its own row beside the cache
        mask = seen[:, None, :] & (slots[None, None, :] <= q_pos[None, :, None])
        angles = q_pos.float()[:, None] * self.inv_freq[None, :]
        views = {False: AttentionView(mask, torch.cos(angles), torch.sin(angles), self.rope_cos, self.rope_sin)}
        if self.local_history is not None:
            views[True] = local_view(self.local_history, state.local_valid, seen, q_pos)
        write_rows = WRITERS[self.cache_write](fill, t, c) if write else None
        x = self.embed_tokens(tokens)
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            history = (state.local_k[i], state.local_v[i]) if block.local else None
            x, k, v = block(x, state.k[i], state.v[i], write_rows, views[block.local], state.M[i], state.z[i],
                            state.written, history)
            ks.append(k)
            vs.append(v)
        new_fill = (fill + n_valid.max()).reshape(state.fill.shape)
        return self.final_norm(x), dataclasses.replace(state, k=ks, v=vs, valid=slot_valid, fill=new_fill)

    def compress(self, state: State) -> State:
        """Fold the window (slots sink..) into memory (global layers) and empty it; fill = min(fill,
        sink); local layers roll their history forward instead.

        Like eijax, the window's k/v rows are left as they are (they are invalid now and the next
        prefill overwrites them), so compress touches only memory, history, valid, fill and written.
        """
        mem = self.memory_config
        s = mem.sink
        window_valid = state.valid[:, s:]
        M, z, written = list(state.M), list(state.z), state.written
        if mem.enabled:
            for i, block in enumerate(self.blocks):
                if block.use_memory:
                    k, v = self._memory_kv(i, state.k[i][:, s:], state.v[i][:, s:])
                    gate, decay = block.write_gate, block.memory_decay
                    M[i], z[i] = self.mem_write(M[i], z[i], k, v, window_valid, None if gate is None else gate(k, v),
                                                None if decay is None else decay())
            written = written | window_valid.any(dim=1)
        local = {}
        if self.local_history is not None:
            local_k, local_v, local_valid = self.local_history(state.local_k, state.local_v, state.k, state.v,
                                                               state.local_valid, state.valid)
            local = dict(local_k=local_k, local_v=local_v, local_valid=local_valid)
        in_window = torch.arange(mem.cache_size) >= s
        return dataclasses.replace(state, M=M, z=z, written=written, valid=state.valid & ~in_window[None, :],
                                   fill=torch.clamp(state.fill, max=s), **local)

    def _memory_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        adapter = self.blocks[layer].memory_adapter
        return (k, v) if adapter is None else (adapter(k, "k"), adapter(v, "v"))

    def step_segment(self, state: State, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """One segment of `window` tokens into the empty window, then compress."""
        start = dataclasses.replace(state, fill=torch.full_like(state.fill, self.memory_config.sink))
        hidden, state = self.prefill(start, tokens, valid)
        return hidden, self.compress(state)
