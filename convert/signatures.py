"""LiteRT signatures of one scenario (DESIGN §1.6): prefill_T, decode, compress.

State crosses the graph boundary as named tensors (inputs and outputs share names, so a runner
feeds outputs straight back in):
    k_cache_{i}, v_cache_{i}  float32 [B, C, Hkv, d]  pre-RoPE keys / values of layer i
    mem_M_{i}, mem_z_{i}      float32 [B, Hkv, d, d] / [B, Hkv, d]   (only when memory is on)
    valid                     bool [B, C]     slot holds a real token
    fill                      int32 [1]       next free slot
    written                   bool [B]        memory holds something (else the gate is bypassed)
  models with local (sliding-window) layers (Gemma 3) only:
    local_k_{i}, local_v_{i}  float32 [B, Hn, Hkv, d]  local layer i's history (Hn = sliding_window - 1)
    local_valid               bool [B, Hn]
  and mem_M_{i}, mem_z_{i} only for their global layers (a local layer has no memory).
prefill_T(tokens int32 [B, T], n_valid int32 [B], **state) -> logits [B, V] of each row's last
valid token + the new state, less the local history (which only compress changes); decode(tokens
[B, 1], **state) -> logits, valid, fill and the token's own rows
    k_row_{i}, v_row_{i}      float32 [B, 1, Hkv, d]  to be written at slot `fill` (the input's) of
                              k_cache_{i}, v_cache_{i}
so that no cache is copied per token (the graph attends the row beside the cache); compress(**state)
-> only what compress changes (memory, history, valid, fill, written), so the caches are not
copied. A runner keeps the state tensors a signature does not return (convert.litert_runtime
merges outputs into the state it holds; the graph's .json says `"decode_returns": "rows"`).
The caller keeps fill + T <= C: the cache write is a DYNAMIC_UPDATE_SLICE, which clamps.
"""

from __future__ import annotations

import torch
from torch import nn

from convert.torch_model import EdgeInfiniteTorch, State


def flatten_state(state: State, memory: bool) -> dict[str, torch.Tensor]:
    """State -> named tensors. Memory only for layers that have it (memory on, no local history)."""
    out: dict[str, torch.Tensor] = {}
    history = state.local_k or [None] * len(state.k)
    for i in range(len(state.k)):
        out[f"k_cache_{i}"], out[f"v_cache_{i}"] = state.k[i], state.v[i]
        if memory and history[i] is None:
            out[f"mem_M_{i}"], out[f"mem_z_{i}"] = state.M[i], state.z[i]
        if history[i] is not None:
            out[f"local_k_{i}"], out[f"local_v_{i}"] = state.local_k[i], state.local_v[i]
    out.update(valid=state.valid, fill=state.fill.reshape(1), written=state.written)
    if state.local_valid is not None:
        out["local_valid"] = state.local_valid
    return out


def unflatten_state(flat: dict, model: EdgeInfiniteTorch) -> State:
    """Named tensors -> State. Memory a layer does not have is zeros that nothing reads."""
    cfg, b = model.config, flat["valid"].shape[0]
    n, hkv, d = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
    M = [flat[f"mem_M_{i}"] if f"mem_M_{i}" in flat else torch.zeros(b, hkv, d, d) for i in range(n)]
    z = [flat[f"mem_z_{i}"] if f"mem_z_{i}" in flat else torch.zeros(b, hkv, d) for i in range(n)]
    local = {}
    if "local_valid" in flat:
        local = dict(local_k=[flat.get(f"local_k_{i}") for i in range(n)],
                     local_v=[flat.get(f"local_v_{i}") for i in range(n)], local_valid=flat["local_valid"])
    return State(k=[flat[f"k_cache_{i}"] for i in range(n)], v=[flat[f"v_cache_{i}"] for i in range(n)],
                 M=M, z=z, valid=flat["valid"], fill=flat["fill"].reshape(()), written=flat["written"], **local)


def _without_history(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prefill and decode leave the local history as it is: not returned, so not copied."""
    return {k: v for k, v in flat.items() if not k.startswith(("local_k_", "local_v_", "local_valid"))}


def last_valid_logits(model: EdgeInfiniteTorch, hidden: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
    """Logits [B, V] at each row's last valid position (a one-hot pick: static shapes)."""
    t = hidden.shape[1]
    pick = (torch.arange(t, dtype=torch.int32)[None, :] == (n_valid - 1)[:, None]).float()  # [B, T]
    return model.logits(torch.matmul(pick[:, None, :], hidden)[:, 0])


class Prefill(nn.Module):
    def __init__(self, model: EdgeInfiniteTorch):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, n_valid: torch.Tensor, **state: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.model
        valid = torch.arange(tokens.shape[1], dtype=torch.int32)[None, :] < n_valid[:, None]
        hidden, new = m.prefill(unflatten_state(state, m), tokens, valid)
        return {"logits": last_valid_logits(m, hidden, n_valid),
                **_without_history(flatten_state(new, m.memory_config.enabled))}


class Decode(nn.Module):
    def __init__(self, model: EdgeInfiniteTorch):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, **state: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.model
        hidden, k_rows, v_rows, new = m.decode(unflatten_state(state, m), tokens)
        rows = {f"{kind}_row_{i}": r for kind, rs in (("k", k_rows), ("v", v_rows)) for i, r in enumerate(rs)}
        return {"logits": m.logits(hidden[:, 0]), **rows, "valid": new.valid, "fill": new.fill.reshape(1)}


class Compress(nn.Module):
    def __init__(self, model: EdgeInfiniteTorch):
        super().__init__()
        self.model = model

    def forward(self, **state: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.model
        flat = flatten_state(m.compress(unflatten_state(state, m)), m.memory_config.enabled)
        return {k: v for k, v in flat.items() if not k.startswith(("k_cache_", "v_cache_"))}


def signatures(model: EdgeInfiniteTorch, chunks: tuple[int, ...], batch: int) -> dict[str, tuple[nn.Module, dict]]:
    """{signature name: (wrapper module in eval mode, sample kwargs)} for export."""
    flat = flatten_state(model.init_state(batch), model.memory_config.enabled)
    sigs: dict[str, tuple[nn.Module, dict]] = {}
    for t in chunks:
        sigs[f"prefill_{t}"] = (Prefill(model).eval(), {"tokens": torch.zeros(batch, t, dtype=torch.int32),
                                                       "n_valid": torch.full((batch,), t, dtype=torch.int32), **flat})
    sigs["decode"] = (Decode(model).eval(), {"tokens": torch.zeros(batch, 1, dtype=torch.int32), **flat})
    sigs["compress"] = (Compress(model).eval(), dict(flat))
    return sigs
