"""eijax <-> PyTorch twin: parameters (rename + transpose, exact) and inference state.

Rule: an eijax flat path ("blocks", "q_proj", "kernel") becomes the torch name
"blocks.{i}.q_proj.weight" (one per layer: the leading [n_layers] axis is split off); every
`kernel` is a Linear kernel, renamed `weight` and transposed to [out, in], except the head_linear
gate's per-head kernel [H, 2d], which keeps its name and layout, as does every other parameter.
Nothing is computed, so the round trip is bit-exact.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from eijax.memory import Memory
from eijax.model import EdgeInfiniteLM, State as JaxState
from eijax.pretrained import build_model

from convert.torch_model import EdgeInfiniteTorch, State as TorchState


def torch_name(path: tuple[str, ...], layer: int | None, gate_kind: str) -> tuple[str, bool]:
    """(torch parameter name, transpose?) of one eijax path (`layer`: index into the stacked axis)."""
    parts = list(path)
    if layer is not None:
        parts.insert(1, str(layer))
    per_head_kernel = gate_kind == "head_linear" and path[-2:] == ("gate", "kernel")
    if parts[-1] == "kernel" and not per_head_kernel:
        return ".".join(parts[:-1] + ["weight"]), True
    return ".".join(parts), False


def _flat_params(model: EdgeInfiniteLM) -> list[tuple[tuple[str, ...], nnx.Variable]]:
    return [(tuple(str(p) for p in path), var) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def _layers(path: tuple[str, ...], var) -> list[int | None]:
    return list(range(var.shape[0])) if path[0] == "blocks" else [None]


def torch_state_dict(model: EdgeInfiniteLM, block_modules: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """eijax parameters as {torch name: float32 array} in torch layout (owned, writable arrays);
    with `block_modules`, only those per-layer modules (e.g. the gate), nothing else converted."""
    gate_kind = model.memory_config.gate
    out: dict[str, np.ndarray] = {}
    for path, var in _flat_params(model):
        if block_modules is not None and not (path[0] == "blocks" and path[1] in block_modules):
            continue
        value = np.asarray(var[...], dtype=np.float32)
        for i in _layers(path, var):
            name, transpose = torch_name(path, i, gate_kind)
            a = value if i is None else value[i]
            out[name] = np.array(a.T if transpose else a, dtype=np.float32, order="C")
    return out


def eijax_updates(model: EdgeInfiniteLM, tensors: dict[str, np.ndarray], *, partial: bool = False) -> nnx.State:
    """Torch-named tensors -> an nnx.State update for `model` (all of its params, or with
    `partial` only those present, e.g. a gate file). Every tensor given must be used."""
    gate_kind = model.memory_config.gate
    used: set[str] = set()
    updates = []
    for path, var in _flat_params(model):
        names = [torch_name(path, i, gate_kind) for i in _layers(path, var)]
        present = [n in tensors for n, _ in names]
        if not all(present):
            if partial and not any(present):
                continue
            missing = [n for (n, _), p in zip(names, present) if not p]
            raise KeyError(f"no tensor for eijax param {'.'.join(path)}: missing {missing[:3]}")
        parts = [np.asarray(tensors[n]).T if tr else np.asarray(tensors[n]) for n, tr in names]
        value = np.stack(parts) if path[0] == "blocks" else parts[0]
        if value.shape != var.shape:
            raise ValueError(f"{'.'.join(path)}: tensors give shape {value.shape}, the model expects {var.shape}")
        used.update(n for n, _ in names)
        updates.append((path, var.replace(jnp.asarray(value, dtype=var.dtype))))
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{len(unused)} tensors have no eijax counterpart, e.g. {unused[:3]}")
    return nnx.from_flat_state(updates)


def to_torch(model: EdgeInfiniteLM, memory=None, cache_write: str = "onehot") -> EdgeInfiniteTorch:
    """A float32 PyTorch twin holding exactly the eijax parameters (optionally under another
    MemoryConfig: sink/window/enabled are inference choices; the gate type must match)."""
    memory = memory or model.memory_config
    if (memory.gate, memory.rule) != (model.memory_config.gate, model.memory_config.rule):
        raise ValueError("the twin may change sink, window and enabled, not the gate type or memory rule")
    twin = EdgeInfiniteTorch(model.config, memory, cache_write=cache_write)
    tensors = torch_state_dict(model)
    expected = {n for n, _ in twin.named_parameters()}
    if set(tensors) != expected:
        raise ValueError(f"name mismatch: only in eijax {sorted(set(tensors) - expected)[:5]}, "
                         f"only in torch {sorted(expected - set(tensors))[:5]}")
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
    return twin.eval()


def to_eijax(twin: EdgeInfiniteTorch) -> EdgeInfiniteLM:
    """The inverse of `to_torch`: an eijax model with the twin's parameters (bit-exact)."""
    model = build_model(twin.config, twin.memory_config)
    nnx.update(model, eijax_updates(model, {n: p.detach().numpy() for n, p in twin.named_parameters()}))
    return model


# ------------------------------------------------------------------------------ state
def state_to_jax(state: TorchState) -> JaxState:
    """The twin's state as eijax's. A global layer keeps no local history in the twin: its rows of
    local_k / local_v are zeros here (eijax carries them along, never reads them)."""
    stack = lambda xs: jnp.asarray(np.stack([x.detach().numpy() for x in xs]))
    local = {}
    if state.local_valid is not None:
        like = next(h for h in state.local_k if h is not None)
        filled = lambda xs: stack([torch.zeros_like(like) if x is None else x for x in xs])
        local = dict(local_k=filled(state.local_k), local_v=filled(state.local_v),
                     local_valid=jnp.asarray(state.local_valid.numpy()))
    return JaxState(k=stack(state.k), v=stack(state.v), valid=jnp.asarray(state.valid.numpy()),
                    fill=jnp.asarray(int(state.fill), jnp.int32), memory=Memory(M=stack(state.M), z=stack(state.z)),
                    written=jnp.asarray(state.written.numpy()), **local)
