"""Device mesh (data, fsdp, tensor) and the one table that maps logical axis names to it.

Parameters name their logical axes in their `axes` metadata (eijax.layers); a rules table
(config `mesh.logical_axis_rules`) maps each logical name to mesh axes. A dimension that does not
divide evenly over its mesh axes is replicated instead (tiny test models, odd head counts).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
Rules = dict[str, tuple[str, ...]]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one size may be -1 (= whatever is left)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into mesh {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {len(devices)}")
    # Auto axes: the compiler propagates shardings (jax >= 0.10 defaults make_mesh to Explicit).
    if devices[0].platform == "tpu":  # follow the physical torus (ICI) layout
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(sizes, devices)
    else:
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def rules_from_config(table: Sequence[Sequence[Any]]) -> Rules:
    rules: Rules = {}
    for logical, physical in table:
        if logical in rules:
            raise ValueError(f"logical axis {logical!r} appears twice in mesh.logical_axis_rules")
        axes = () if physical is None else (physical,) if isinstance(physical, str) else tuple(physical)
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(f"logical axis {logical!r} maps to unknown mesh axes {bad}; mesh axes are {MESH_AXES}")
        rules[logical] = axes
    return rules


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
    """PartitionSpec for one array; a mesh axis is used at most once, uneven splits replicate."""
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(logical, shape):
        axes = tuple(a for a in rules.get(name, ()) if a not in used and mesh.shape[a] > 1) if name else ()
        if axes and dim % int(np.prod([mesh.shape[a] for a in axes])) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> Any:
    """`state` (an nnx.State of Variables) with each value replaced by its NamedSharding, from the
    Variables' `axes` metadata (use nnx.to_pure_dict on the result for a plain tree)."""
    def one(var):
        axes = var.get_metadata().get("axes") or (None,) * var.value.ndim
        return var.replace(NamedSharding(mesh, logical_to_spec(axes, var.value.shape, mesh, rules)))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Batch arrays [B, ...]: the batch dimension over the rule for `batch`."""
    axes = tuple(a for a in rules.get("batch", ()) if mesh.shape[a] > 1)
    return NamedSharding(mesh, P(axes if axes else None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Per-process batch slices -> global jax.Arrays (single process: just a sharded device_put)."""
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sharding) for k, v in local.items()}
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def max_over_processes(values: tuple[int, ...]) -> tuple[int, ...]:
    """Element-wise maximum of small host integers over all processes (identity with one process)."""
    if jax.process_count() == 1:
        return tuple(values)
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(values, np.int64))
    return tuple(int(v) for v in np.max(gathered.reshape(jax.process_count(), -1), axis=0))
