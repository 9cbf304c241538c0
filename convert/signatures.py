"""LiteRT signatures of one scenario (DESIGN §1.6): prefill_T, decode, compress.

State crosses the graph boundary as named tensors (inputs and outputs share names, so a runner
feeds outputs straight back in):
    k_cache_{i}, v_cache_{i}  float32 [B, C, Hkv, d]  pre-RoPE keys / values of layer i
    mem_M_{i}, mem_z_{i}      float32 [B, Hkv, d, d] / [B, Hkv, d]   (only when memory is on)
    valid                     bool [B, C]     slot holds a real token
    fill                      int32 [1]       next free slot
    written                   bool [B]        memory holds something (else the gate is bypassed)
prefill_T(tokens int32 [B, T], n_valid int32 [B], **state) -> logits [B, V] of each row's last
valid token + the new state; decode(tokens [B, 1], **state) -> the same; compress(**state) ->
only what compress changes (memory, valid, fill, written), so the caches are not copied.
The caller keeps fill + T <= C: the cache write is a DYNAMIC_UPDATE_SLICE, which clamps.
"""

from __future__ import annotations

import torch
from torch import nn

from convert.torch_model import EdgeInfiniteTorch, State


def state_names(n_layers: int, memory: bool) -> list[str]:
    names = [f"{kind}_{i}" for i in range(n_layers) for kind in ("k_cache", "v_cache")]
    if memory:
        names += [f"{kind}_{i}" for i in range(n_layers) for kind in ("mem_M", "mem_z")]
    return names + ["valid", "fill", "written"]


def flatten_state(state: State, memory: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i in range(len(state.k)):
        out[f"k_cache_{i}"], out[f"v_cache_{i}"] = state.k[i], state.v[i]
        if memory:
            out[f"mem_M_{i}"], out[f"mem_z_{i}"] = state.M[i], state.z[i]
    out.update(valid=state.valid, fill=state.fill.reshape(1), written=state.written)
    return out


def unflatten_state(flat: dict, model: EdgeInfiniteTorch) -> State:
    """Named tensors -> State. Without memory, M and z are zeros that nothing reads."""
    n, memory = model.config.n_layers, model.memory_config.enabled
    b = flat["valid"].shape[0]
    if memory:
        M = [flat[f"mem_M_{i}"] for i in range(n)]
        z = [flat[f"mem_z_{i}"] for i in range(n)]
    else:
        empty = model.init_state(b)
        M, z = empty.M, empty.z
    return State(k=[flat[f"k_cache_{i}"] for i in range(n)], v=[flat[f"v_cache_{i}"] for i in range(n)],
                 M=M, z=z, valid=flat["valid"], fill=flat["fill"].reshape(()), written=flat["written"])


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
        return {"logits": last_valid_logits(m, hidden, n_valid), **flatten_state(new, m.memory_config.enabled)}


class Decode(nn.Module):
    def __init__(self, model: EdgeInfiniteTorch):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, **state: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.model
        hidden, new = m.prefill(unflatten_state(state, m), tokens)
        return {"logits": m.logits(hidden[:, 0]), **flatten_state(new, m.memory_config.enabled)}


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
