"""Layers of the PyTorch twin (`convert.torch_model`), one module per piece of eijax's layer.

Each piece that the quantisation recipes must find (attention, memory read/write, gate, adapter)
is its own nn.Module, so its ops carry the module's name in the LiteRT graph. Gemma 3's layer
(README "Gemma 3") is the same Block with its extras switched on by the config: (1 + w) norms,
norms after attention and the MLP, GeGLU (tanh), the query_pre_attn_scalar score scale, and for
a local (sliding-window) layer keys that start with the layer's own history and no memory.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from eijax.config import MemoryConfig, ModelConfig


def sigma(x: torch.Tensor) -> torch.Tensor:
    """ELU + 1 feature map (float32)."""
    return F.elu(x.float()) + 1.0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        # offset (Gemma): the stored weight w scales by (1 + w), so it starts at 0 instead of 1
        self.scale = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma's order: scale by (1 + w) in float32, then cast back
            return (normed * (1.0 + self.scale.float())).to(x.dtype)
        return self.scale.to(x.dtype) * normed.to(x.dtype)  # Llama's: cast back, then scale


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.gelu = cfg.gemma  # GeGLU with tanh-approximate GELU instead of SwiGLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        g = F.gelu(g, approximate="tanh") if self.gelu else F.silu(g)
        return self.down_proj(g * self.up_proj(x))


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
    """Softmax attention, interleaved GQA. q [B,T,H,d]; k, v [B,C,Hkv,d]; mask [B,T,C] bool.
    Scores are divided by sqrt(d), or multiplied by `scale` when given (Gemma), then soft-capped
    when `softcap` is set, exactly as eijax.layers.local_attention."""

    def __init__(self, scale: float | None = None, softcap: float = 0.0):
        super().__init__()
        self.scale, self.softcap = scale, softcap

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                new: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`new` (decode): the token's own (rotated k, v) [B, 1, Hkv, d], attended after the keys
        `k` and seen by every query, so that the cache need not be rebuilt to hold it."""
        b, t, h, d = q.shape
        hkv = k.shape[2]
        g = h // hkv
        # A query group's G*T rows share one kv head: fold them into the matmul's rows so k and v
        # are used per kv head as they are (broadcasting them over G lowers to a BROADCAST_TO of
        # the whole cache per layer, the slowest op of a CPU decode step).
        qg = q.reshape(b, t, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * t, d)  # [B, Hkv, G*T, d]
        scores = self._scores(qg, k, d)                                        # [B, Hkv, G*T, C]
        n_keys = scores.shape[-1]
        if new is not None:
            assert t == 1, "a new key beside the cache is for decode: one query per row"
            scores = torch.cat([scores, self._scores(qg, new[0], d)], dim=-1)
            mask = torch.cat([mask, torch.ones_like(mask[..., :1])], dim=-1)
        scores = scores.reshape(b, hkv, g, t, -1)
        # A finite floor (not -inf) keeps fully masked rows NaN-free, exactly as eijax; a select
        # (not an additive mask) so integer-activation recipes do not see a huge constant.
        floor = torch.finfo(torch.float32).min
        scores = torch.where(mask[:, None, None], scores, torch.full_like(scores, floor))
        probs = torch.softmax(scores, dim=-1).reshape(b, hkv, g * t, -1)
        out = torch.matmul(probs[..., :n_keys], v.permute(0, 2, 1, 3))         # [B, Hkv, G*T, d]
        if new is not None:
            out = out + probs[..., n_keys:] * new[1].permute(0, 2, 1, 3)        # [B, Hkv, 1, d] broadcast
        return out.reshape(b, hkv, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, h, d)

    def _scores(self, qg: torch.Tensor, k: torch.Tensor, d: int) -> torch.Tensor:
        scores = torch.matmul(qg, k.permute(0, 2, 3, 1))
        scores = scores / math.sqrt(d) if self.scale is None else scores * self.scale
        return torch.tanh(scores / self.softcap) * self.softcap if self.softcap else scores


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
                valid: torch.Tensor, strength: torch.Tensor | None = None,
                retain: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B,T,Hkv,d] pre-RoPE; valid [B,T] bool; strength β [B,T,Hkv] or None; retain γ [Hkv] or None
        (M, z scaled by it first where the window holds a valid token). Returns the new (M, z)."""
        if retain is not None:
            g = torch.where(valid.any(dim=1)[:, None], retain[None, :], torch.ones_like(retain)[None, :])  # [B, Hkv]
            M, z = M * g[..., None, None], z * g[..., None]
        mask = valid.float()[:, :, None, None]
        sk = (sigma(k) * mask).permute(0, 2, 1, 3)                             # [B, Hkv, T, d]
        vv = (v.float() * mask).permute(0, 2, 1, 3)
        if self.rule == "delta":  # subtract what memory already retrieves for these keys
            vv = vv - torch.matmul(sk, M) / (torch.matmul(sk, z[..., None]) + self.eps)
        if strength is not None:  # only the write is scaled, not the delta rule's retrieval
            sk = sk * strength.permute(0, 2, 1)[..., None]
        return M + torch.matmul(sk.transpose(-1, -2), vv), z + sk.sum(dim=2)


class MemoryWriteGate(nn.Module):
    """eijax's learned write strength (MemoryConfig.write_gate): β = 2σ([k; v]·w_h + b_h) per KV head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(cfg.n_kv_heads, 2 * cfg.head_dim))
        self.b = nn.Parameter(torch.zeros(cfg.n_kv_heads))

    def forward(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """k, v [B, T, Hkv, d] (the memory path's) -> β [B, T, Hkv] float32."""
        kv = torch.cat([k, v], dim=-1).float()
        return 2.0 * torch.sigmoid((kv * self.w).sum(dim=-1) + self.b)


class MemoryDecay(nn.Module):
    """eijax's memory retention per fold (MemoryConfig.decay): γ = σ(logit) per KV head, the first
    `decay_keep_heads` fixed at 1."""

    def __init__(self, cfg: ModelConfig, mem: MemoryConfig):
        super().__init__()
        self.keep = mem.decay_keep_heads
        self.logit = nn.Parameter(torch.zeros(cfg.n_kv_heads - self.keep))

    def forward(self) -> torch.Tensor:
        gamma = torch.sigmoid(self.logit.float())
        return torch.cat([gamma.new_ones(self.keep), gamma])


class MemoryPrior(nn.Module):
    """eijax's memory prior (MemoryConfig.prior): the memory a long prompt starts from, per layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.M = nn.Parameter(torch.zeros(cfg.n_kv_heads, cfg.head_dim, cfg.head_dim))
        self.z = nn.Parameter(torch.zeros(cfg.n_kv_heads, cfg.head_dim))


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


class AttentionView(NamedTuple):
    """What one kind of layer attends with in one call: which keys each query sees and the RoPE
    angles of the queries and of the keys (for a local layer: its history, then the cache slots)."""

    mask: torch.Tensor    # [B, T, keys] bool
    q_cos: torch.Tensor   # [T, d]
    q_sin: torch.Tensor
    k_cos: torch.Tensor   # [keys, d]
    k_sin: torch.Tensor


class Block(nn.Module):
    """One decoder layer with EdgeInfinite attention; names match eijax's stacked Block. A local
    (sliding-window) layer has the same parameters (its gate exists, as in eijax) but never reads
    memory: it attends over its own history and the cache instead (README "Gemma 3")."""

    def __init__(self, cfg: ModelConfig, mem: MemoryConfig, local: bool = False):
        super().__init__()
        h, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        norm = lambda dim: RMSNorm(dim, cfg.norm_eps, offset=cfg.gemma)
        self.attn_norm = norm(cfg.d_model)
        self.q_proj = nn.Linear(cfg.d_model, h * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, hkv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, hkv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * d, cfg.d_model, bias=cfg.o_bias)
        self.q_norm, self.k_norm = (norm(d), norm(d)) if cfg.qk_norm else (None, None)
        scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None
        self.local_attn = LocalAttention(scale, cfg.attn_softcap)
        self.mem_read = MemoryRead(mem.eps)
        self.gate = MemoryGate(cfg, mem)
        self.memory_adapter = MemoryAdapter(cfg) if mem.adapter else None
        self.write_gate = MemoryWriteGate(cfg) if mem.write_gate else None
        self.memory_decay = MemoryDecay(cfg, mem) if mem.decays else None
        self.memory_prior = MemoryPrior(cfg) if mem.prior else None  # read by the model's prime, not here
        self.mlp_norm = norm(cfg.d_model)
        self.mlp = MLP(cfg)
        # Gemma normalises the attention and MLP outputs too, before the residual add
        self.post_attn_norm, self.post_mlp_norm = (norm(cfg.d_model), norm(cfg.d_model)) if cfg.gemma else (None, None)
        self.shape = (h, hkv, d)
        self.local = local
        self.use_memory = mem.enabled and not local

    def forward(self, x, k_cache, v_cache, write_rows, view: AttentionView, M, z, written, history=None):
        """T new tokens; `write_rows(cache, new)` puts them at slots fill..fill+T-1; `view` says which
        keys each query sees; `history` (local layers only): this layer's (k, v) of the tokens
        before the cache window, attended before the cache slots. Returns (x, k_cache, v_cache).

        `write_rows` None (decode, one token): the cache is left as it is and the token's own k, v
        are attended beside it (`view.mask` then must hide the slot it will take); the returned
        "caches" are just its rows [B, 1, Hkv, d], for the caller to write at slot fill."""
        b, t, _ = x.shape
        h, hkv, d = self.shape
        xn = self.attn_norm(x)
        q = self.q_proj(xn).reshape(b, t, h, d)
        k = self.k_proj(xn).reshape(b, t, hkv, d)
        v = self.v_proj(xn).reshape(b, t, hkv, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        new = None
        if write_rows is None:
            new = (rotate(k, view.q_cos, view.q_sin), v)  # at the query's own position
        else:
            k_cache, v_cache = write_rows(k_cache, k), write_rows(v_cache, v)
        keys, values = k_cache, v_cache
        if history is not None:
            keys, values = torch.cat([history[0], k_cache], dim=1), torch.cat([history[1], v_cache], dim=1)
        out = self.local_attn(rotate(q, view.q_cos, view.q_sin), rotate(keys, view.k_cos, view.k_sin), values,
                              view.mask, new)
        if write_rows is None:
            k_cache, v_cache = k, v
        if self.use_memory:
            a_mem = self.mem_read(M, z, q if self.memory_adapter is None else self.memory_adapter(q, "q"))
            out = self.gate(a_mem, out, written)
        x = x + _post_norm(self.post_attn_norm, self.o_proj(out.reshape(b, t, h * d)))
        return x + _post_norm(self.post_mlp_norm, self.mlp(self.mlp_norm(x))), k_cache, v_cache


def _post_norm(norm: RMSNorm | None, y: torch.Tensor) -> torch.Tensor:
    """Gemma's norm of a sublayer's output before the residual add; other families have none."""
    return y if norm is None else norm(y)
