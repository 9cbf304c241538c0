"""Orbax checkpoints of a training run: trainable params, optimizer state, step, data iterator.

Only the trainable part (the gate) is saved; the frozen base is re-read from `model.checkpoint`,
whose path and a fingerprint are stored in the metadata, so a checkpoint that does not fit the
model fails with a message rather than loading silently. Items:

    trainable   StandardSave (plain dict of arrays)      opt_state  StandardSave
    data        grain iterator state (grain's orbax handler, one file per process)
    meta        JSON: step, base checkpoint path, fingerprints, trainable patterns

Restoring takes target shardings, so a run can resume on a different mesh.
SIGTERM (Cloud TPU preemption, or `kill`) is turned into "save now and exit" by `PreemptionGuard`.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

# Reading a run back for inference lives in eijax.trained (reachable without the trainer).
from eijax.trained import (CheckpointMismatch, arch_fingerprint, check_compatible, check_shapes,  # noqa: F401
                           weights_fingerprint)


# ------------------------------------------------------------------ manager
def make_manager(directory: str | Path, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    handlers = {"trainable": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, trainable, opt_state, data_iter, meta: dict[str, Any],
         force: bool = False) -> bool:
    items = dict(trainable=ocp.args.StandardSave(trainable), opt_state=ocp.args.StandardSave(opt_state),
                 meta=ocp.args.JsonSave({**meta, "step": int(step)}))
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore(manager: ocp.CheckpointManager, model, trainable, opt_state, shardings: dict[str, Any], data_iter,
            weights_fp: str | None, step: int | None = None):
    """Latest (or given) step onto the current mesh: returns (step, trainable, opt_state); the data
    iterator is restored in place. Fails with CheckpointMismatch for another model."""
    step = manager.latest_step() if step is None else step
    where = f"{manager.directory}/{step}"
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    check_compatible(meta, model, weights_fp, where)
    saved_meta = manager.item_metadata(step)
    tm = saved_meta["trainable"] if hasattr(saved_meta, "__getitem__") else None
    if tm is not None:
        check_shapes(tm, trainable, where)
    items = dict(trainable=ocp.args.StandardRestore(_abstract(trainable, shardings["trainable"])),
                 opt_state=ocp.args.StandardRestore(_abstract(opt_state, shardings["opt_state"])))
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = manager.restore(step, args=ocp.args.Composite(**items))
    return int(meta["step"]), out["trainable"], out["opt_state"]


# ------------------------------------------------------------------ preemption
class PreemptionGuard:
    """SIGTERM -> `requested` becomes True (on every process: multi-host agrees via an all-gather)."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self._flag = False
        self._previous = {}
        self._signals = signals

    def __enter__(self) -> "PreemptionGuard":
        for s in self._signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _handle(self, signum, frame) -> None:
        self._flag = True

    @property
    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self._flag
        from jax.experimental import multihost_utils
        return bool(np.max(multihost_utils.process_allgather(np.int32(self._flag))))


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str))
