"""PyTorch twin of `eijax.model.EdgeInfiniteLM`, written for torch.export / LiteRT.

Same semantics as eijax (DESIGN §1): a cache of `sink + window` slots where slot i sits at RoPE
position i, pre-RoPE keys, a [B, C] slot-valid mask, a fill pointer, float32 memory (M, z) per
layer and a `written` flag that bypasses the gate while memory is empty.

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

from eijax.config import MemoryConfig, ModelConfig
from eijax.rope import inverse_frequencies, rope_table


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


pytree.register_dataclass(State)


def sigma(x: torch.Tensor) -> torch.Tensor:
    """ELU + 1 feature map (float32)."""
    return F.elu(x.float()) + 1.0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + self.eps)
        return self.scale.to(x.dtype) * normed.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MemoryGate(nn.Module):
    """The memory gate g = sigmoid(W [A_mem ; A_local] + b) per token and head (DESIGN §1.2), in
    float32, and the mix of the two attention outputs that it controls."""

    def __init__(self, cfg: ModelConfig, mem: MemoryConfig):
        super().__init__()
        h, d = cfg.n_heads, cfg.head_dim
        bias0 = math.log(mem.gate_init / (1.0 - mem.gate_init))
        self.kind = mem.gate
        if mem.gate == "linear":
            self.weight = nn.Parameter(torch.zeros(h, 2 * h * d))
            self.bias = nn.Parameter(torch.full((h,), bias0))
        elif mem.gate == "head_linear":
            self.kernel = nn.Parameter(torch.zeros(h, 2 * d))
            self.bias = nn.Parameter(torch.full((h,), bias0))
        else:
            self.beta = nn.Parameter(torch.full((h,), bias0))

    def forward(self, a_mem: torch.Tensor, a_local: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
        """Mixed attention output [B, T, H, d]: g A_mem + (1 - g) A_local, or exactly A_local where
        memory is empty (written [B] False). The mixing lives here, not in Block, so every op of it
        carries this module's name and the recipes keep it float by one regex."""
        g = self.values(a_mem, a_local)
        mixed = (g * a_mem + (1.0 - g) * a_local.float()).to(a_local.dtype)
        return torch.where(written[:, None, None, None], mixed, a_local)

    def values(self, a_mem: torch.Tensor, a_local: torch.Tensor) -> torch.Tensor:
        """a_mem, a_local: [B, T, H, d] -> gate [B, T, H, 1]."""
        b, t, h, d = a_local.shape
        if self.kind == "scalar":
            return torch.sigmoid(self.beta)[None, None, :, None].expand(b, t, h, 1)
        if self.kind == "linear":
            both = torch.cat([a_mem.reshape(b, t, h * d), a_local.float().reshape(b, t, h * d)], dim=-1)
            logits = F.linear(both, self.weight, self.bias)
        else:
            both = torch.cat([a_mem, a_local.float()], dim=-1)
            logits = (both * self.kernel).sum(-1) + self.bias
        return torch.sigmoid(logits)[..., None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face rotate_half RoPE. x [B, T, heads, d]; cos/sin [T, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


# The three parameter-free modules below exist so their ops carry a module name in the LiteRT
# graph: quantisation recipes keep them float (or skip them) by regex (DESIGN §1.6, recipes/).
class LocalAttention(nn.Module):
    """Softmax attention, interleaved GQA. q [B,T,H,d]; k, v [B,C,Hkv,d]; mask [B,T,C] bool."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, h, d = q.shape
        hkv = k.shape[2]
        g = h // hkv
        # A query group's G*T rows share one kv head: fold them into the matmul's rows so k and v
        # are used per kv head as they are (broadcasting them over G lowers to a BROADCAST_TO of
        # the whole cache per layer, the slowest op of a CPU decode step).
        qg = q.reshape(b, t, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * t, d)  # [B, Hkv, G*T, d]
        scores = torch.matmul(qg, k.permute(0, 2, 3, 1)) / math.sqrt(d)       # [B, Hkv, G*T, C]
        scores = scores.reshape(b, hkv, g, t, -1)
        # A finite floor (not -inf) keeps fully masked rows NaN-free, exactly as eijax; a select
        # (not an additive mask) so integer-activation recipes do not see a huge constant.
        floor = torch.finfo(torch.float32).min
        scores = torch.where(mask[:, None, None], scores, torch.full_like(scores, floor))
        probs = torch.softmax(scores, dim=-1).reshape(b, hkv, g * t, -1)
        out = torch.matmul(probs, v.permute(0, 2, 1, 3))                       # [B, Hkv, G*T, d]
        return out.reshape(b, hkv, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, h, d)


class MemoryRead(nn.Module):
    """A_mem = σ(q) M_g / (σ(q)·z_g + eps). M [B,Hkv,d,d], z [B,Hkv,d], q [B,T,H,d] pre-RoPE."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, M: torch.Tensor, z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        b, t, h, d = q.shape
        hkv = M.shape[1]
        g = h // hkv
        sq = sigma(q).reshape(b, t, hkv, g, d).permute(0, 2, 1, 3, 4).reshape(b, hkv, t * g, d)
        num = torch.matmul(sq, M)                                              # [B, Hkv, T*G, d]
        den = torch.matmul(sq, z[..., None]) + self.eps                        # [B, Hkv, T*G, 1]
        return (num / den).reshape(b, hkv, t, g, d).permute(0, 2, 1, 3, 4).reshape(b, t, h, d)


class MemoryWrite(nn.Module):
    """Fold tokens into memory (linear or delta rule); padding (valid False) writes nothing."""

    def __init__(self, rule: str, eps: float):
        super().__init__()
        if rule not in ("linear", "delta"):
            raise ValueError(f"unknown memory rule {rule!r}")
        self.rule, self.eps = rule, eps

    def forward(self, M: torch.Tensor, z: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B,T,Hkv,d] pre-RoPE; valid [B,T] bool. Returns the new (M, z)."""
        mask = valid.float()[:, :, None, None]
        sk = (sigma(k) * mask).permute(0, 2, 1, 3)                             # [B, Hkv, T, d]
        vv = (v.float() * mask).permute(0, 2, 1, 3)
        if self.rule == "delta":  # subtract what memory already retrieves for these keys
            vv = vv - torch.matmul(sk, M) / (torch.matmul(sk, z[..., None]) + self.eps)
        return M + torch.matmul(sk.transpose(-1, -2), vv), z + sk.sum(dim=2)


class MemoryAdapter(nn.Module):
    """eijax's optional memory-path maps (MemoryConfig.adapter): per-head d x d on the q that reads
    memory and the k/v written to it; the local path never sees them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q = nn.Parameter(torch.eye(d).repeat(h, 1, 1))
        self.k = nn.Parameter(torch.eye(d).repeat(hkv, 1, 1))
        self.v = nn.Parameter(torch.eye(d).repeat(hkv, 1, 1))

    def forward(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """x [B, T, heads, d] @ the `which` ("q", "k" or "v") maps [heads, d, d], per head. A module
        call (not a bare function) so the ops carry this module's name for the recipes' regexes."""
        return torch.einsum("bthd,hde->bthe", x, getattr(self, which).to(x.dtype))


class Block(nn.Module):
    """One decoder layer with EdgeInfinite attention; names match eijax's stacked Block."""

    def __init__(self, cfg: ModelConfig, mem: MemoryConfig):
        super().__init__()
        h, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.q_proj = nn.Linear(cfg.d_model, h * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, hkv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, hkv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * d, cfg.d_model, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.norm_eps)
            self.k_norm = RMSNorm(d, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.local_attn = LocalAttention()
        self.mem_read = MemoryRead(mem.eps)
        self.gate = MemoryGate(cfg, mem)
        self.memory_adapter = MemoryAdapter(cfg) if mem.adapter else None
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.shape = (h, hkv, d)
        self.use_memory = mem.enabled

    def forward(self, x, k_cache, v_cache, mask, write_rows, q_cos, q_sin, k_cos, k_sin, M, z, written):
        """T new tokens; `write_rows(cache, new)` puts them at slots fill..fill+T-1; mask [B, T, C]
        says which slots each query sees. Returns (x, k_cache, v_cache)."""
        b, t, _ = x.shape
        h, hkv, d = self.shape
        xn = self.attn_norm(x)
        q = self.q_proj(xn).reshape(b, t, h, d)
        k = self.k_proj(xn).reshape(b, t, hkv, d)
        v = self.v_proj(xn).reshape(b, t, hkv, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        k_cache, v_cache = write_rows(k_cache, k), write_rows(v_cache, v)
        out = self.local_attn(rotate(q, q_cos, q_sin), rotate(k_cache, k_cos, k_sin), v_cache, mask)
        if self.use_memory:
            a_mem = self.mem_read(M, z, q if self.memory_adapter is None else self.memory_adapter(q, "q"))
            out = self.gate(a_mem, out, written)
        x = x + self.o_proj(out.reshape(b, t, h * d))
        return x + self.mlp(self.mlp_norm(x)), k_cache, v_cache


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
        if config.gemma:
            from eijax.cli import InputError

            raise InputError("the gemma3 family has no PyTorch twin yet (convert/: Gemma's norms and its "
                             "sliding-window layers with their own window are not re-authored); "
                             "convert.to_torch / convert.to_litert support llama, qwen2 and qwen3")
        self.config, self.memory_config = config, memory
        self.cache_write = cache_write
        self.embed = nn.Parameter(torch.zeros(config.vocab_size, config.d_model))
        self.blocks = nn.ModuleList([Block(config, memory) for _ in range(config.n_layers)])
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.mem_write = MemoryWrite(memory.rule, memory.eps)
        # Keys are rotated over the whole cache with constant tables (slot == position); queries
        # compute their angles in the graph (a table lookup by position would become an
        # EMBEDDING_LOOKUP that quantisers mistake for a weight).
        cos, sin = rope_table(config.rope, config.head_dim, memory.cache_size)  # the same float32 tables as eijax
        inv = inverse_frequencies(config.rope, config.head_dim)
        self.register_buffer("rope_cos", torch.from_numpy(cos), persistent=False)
        self.register_buffer("rope_sin", torch.from_numpy(sin), persistent=False)
        self.register_buffer("inv_freq", torch.from_numpy(np.concatenate([inv, inv])), persistent=False)

    def init_state(self, batch: int) -> State:
        cfg, c = self.config, self.memory_config.cache_size
        hkv, d, n = cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
        zeros = lambda *s: [torch.zeros(s) for _ in range(n)]
        return State(k=zeros(batch, c, hkv, d), v=zeros(batch, c, hkv, d), M=zeros(batch, hkv, d, d),
                     z=zeros(batch, hkv, d), valid=torch.zeros(batch, c, dtype=torch.bool),
                     fill=torch.zeros((), dtype=torch.int32), written=torch.zeros(batch, dtype=torch.bool))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.embed if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, w).float()

    def prefill(self, state: State, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """T tokens into slots fill..fill+T-1; returns (final-normed hidden [B, T, D], new state).

        `valid` [B, T] must be a right-padded prefix; fill advances by the longest row's count.
        The caller keeps fill + T <= sink + window (outside export the check is done here).
        """
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
        mask = slot_valid[:, None, :] & (slots[None, None, :] <= q_pos[None, :, None])
        angles = q_pos.float()[:, None] * self.inv_freq[None, :]
        q_cos, q_sin = torch.cos(angles), torch.sin(angles)
        write_rows = WRITERS[self.cache_write](fill, t, c)
        x = F.embedding(tokens, self.embed)
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, state.k[i], state.v[i], mask, write_rows, q_cos, q_sin, self.rope_cos, self.rope_sin,
                            state.M[i], state.z[i], state.written)
            ks.append(k)
            vs.append(v)
        new_fill = (fill + n_valid.max()).reshape(state.fill.shape)
        return self.final_norm(x), dataclasses.replace(state, k=ks, v=vs, valid=slot_valid, fill=new_fill)

    def compress(self, state: State) -> State:
        """Fold the window (slots sink..) into memory and empty it; fill = min(fill, sink).

        Like eijax, the window's k/v rows are left as they are (they are invalid now and the next
        prefill overwrites them), so compress touches only memory, valid, fill and written.
        """
        mem = self.memory_config
        s = mem.sink
        window_valid = state.valid[:, s:]
        M, z, written = state.M, state.z, state.written
        if mem.enabled:
            pairs = [self.mem_write(M[i], z[i], *self._memory_kv(i, state.k[i][:, s:], state.v[i][:, s:]), window_valid)
                     for i in range(self.config.n_layers)]
            M, z = [p[0] for p in pairs], [p[1] for p in pairs]
            written = written | window_valid.any(dim=1)
        in_window = torch.arange(mem.cache_size) >= s
        return dataclasses.replace(state, M=M, z=z, written=written, valid=state.valid & ~in_window[None, :],
                                   fill=torch.clamp(state.fill, max=s))

    def _memory_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        adapter = self.blocks[layer].memory_adapter
        return (k, v) if adapter is None else (adapter(k, "k"), adapter(v, "v"))

    def step_segment(self, state: State, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """One segment of `window` tokens into the empty window, then compress."""
        start = dataclasses.replace(state, fill=torch.full_like(state.fill, self.memory_config.sink))
        hidden, state = self.prefill(start, tokens, valid)
        return hidden, self.compress(state)
