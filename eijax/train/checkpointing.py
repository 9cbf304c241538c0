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

import dataclasses
import hashlib
import json
import signal
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from eijax.config import MemoryConfig


# ------------------------------------------------------------------ fingerprints
def arch_fingerprint(model) -> dict[str, Any]:
    """What a saved gate depends on: the base architecture and the gate type."""
    c, m = model.config, model.memory_config
    arch = dict(family=c.family, vocab_size=c.vocab_size, d_model=c.d_model, n_layers=c.n_layers, n_heads=c.n_heads,
                n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, d_ff=c.d_ff, gate=m.gate)
    return arch


def weights_fingerprint(frozen: dict) -> str:
    """A cheap hash of the frozen base weights (a few sums per tensor), to catch a different base."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(frozen)[0], key=lambda pv: jax.tree_util.keystr(pv[0])):
        a = np.asarray(jax.device_get(leaf), np.float64)
        h.update(f"{jax.tree_util.keystr(path)}:{a.shape}:{a.sum():.6e}:{np.abs(a).sum():.6e}".encode())
    return h.hexdigest()[:16]


class CheckpointMismatch(ValueError):
    """A checkpoint made for another model."""


def check_compatible(meta: dict[str, Any], model, weights_fp: str | None, where: str) -> None:
    arch = arch_fingerprint(model)
    saved = meta.get("arch", {})
    diff = {k: (saved.get(k), v) for k, v in arch.items() if saved.get(k) != v}
    if diff:
        raise CheckpointMismatch(f"checkpoint {where} was trained for another model: "
                                 + ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
                                 + f" (its base model was {meta.get('base_checkpoint')!r})")
    if weights_fp is not None and meta.get("weights_fingerprint") not in (None, weights_fp):
        raise CheckpointMismatch(f"checkpoint {where} was trained on other base weights ({meta.get('base_checkpoint')!r}, "
                                 f"fingerprint {meta.get('weights_fingerprint')}) than the loaded model ({weights_fp})")


def _check_shapes(saved: dict, expected: dict, where: str) -> None:
    flat_s = dict(jax.tree_util.tree_flatten_with_path(saved)[0])
    flat_e = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    if flat_s.keys() != flat_e.keys():
        raise CheckpointMismatch(f"checkpoint {where} holds params {sorted(map(jax.tree_util.keystr, flat_s))}, "
                                 f"the model trains {sorted(map(jax.tree_util.keystr, flat_e))}")
    for k, v in flat_e.items():
        if tuple(flat_s[k].shape) != tuple(v.shape):
            raise CheckpointMismatch(f"checkpoint {where}: {jax.tree_util.keystr(k)} has shape {tuple(flat_s[k].shape)}, "
                                     f"the model expects {tuple(v.shape)}")


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
        _check_shapes(tm, trainable, where)
    items = dict(trainable=ocp.args.StandardRestore(_abstract(trainable, shardings["trainable"])),
                 opt_state=ocp.args.StandardRestore(_abstract(opt_state, shardings["opt_state"])))
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = manager.restore(step, args=ocp.args.Composite(**items))
    return int(meta["step"]), out["trainable"], out["opt_state"]


def restore_params(model, checkpoint_dir: str | Path, step: int | None = None) -> int:
    """Load trained gate params from a run's checkpoint folder into `model` in place (for inference).
    Returns the step. Fails with CheckpointMismatch if the checkpoint belongs to another model."""
    directory = Path(checkpoint_dir)
    if not (directory / "checkpoints").is_dir() and (directory.parent.name == "checkpoints"):
        step = int(directory.name) if step is None else step
        directory = directory.parent.parent
    ckpt_dir = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
    with ocp.CheckpointManager(ckpt_dir.absolute(), item_handlers={
            "trainable": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        check_compatible(meta, model, None, f"{ckpt_dir}/{step}")
        patterns = meta.get("trainable_patterns", ["gate"])
        from eijax.train.optim import set_trainable, trainable_filter
        current = nnx.to_pure_dict(nnx.state(model, trainable_filter(patterns)))
        _check_shapes(manager.item_metadata(step)["trainable"], current, f"{ckpt_dir}/{step}")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), current)
        values = manager.restore(step, args=ocp.args.Composite(trainable=ocp.args.StandardRestore(abstract)))["trainable"]
    set_trainable(model, values, patterns)
    return int(step)


def training_checkpoint_dir(path: str | Path) -> Path | None:
    """The orbax manager folder of a training run (run dir, its checkpoints/ or one step), else None."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    for candidate in (path / "checkpoints", path, path.parent):
        if candidate.is_dir() and any(p.is_dir() and p.name.isdigit() and (p / "meta").exists() for p in candidate.iterdir()):
            return candidate
    return None


def read_training_meta(ckpt_dir: Path) -> dict[str, Any]:
    with ocp.CheckpointManager(Path(ckpt_dir).absolute(), item_handlers={"meta": ocp.JsonCheckpointHandler()},
                               options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint step in {ckpt_dir}")
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def trained_memory(saved: MemoryConfig, override: MemoryConfig | None) -> MemoryConfig:
    """`override` (e.g. another sink/window for inference) with what the trained weights need kept:
    gate type, adapter, memory rule and eps."""
    if override is None:
        return saved
    return dataclasses.replace(override, gate=saved.gate, gate_init=saved.gate_init, adapter=saved.adapter,
                               rule=saved.rule, eps=saved.eps)


def load_trained(run: str | Path, memory: MemoryConfig | None = None):
    """The base model named in a training run's metadata, with the run's trained parameters."""
    from eijax.pretrained import load_pretrained

    ckpt_dir = training_checkpoint_dir(run)
    if ckpt_dir is None:
        raise FileNotFoundError(f"{run} is not an eijax training run (no checkpoints/<step>/meta)")
    meta = read_training_meta(ckpt_dir)
    saved = MemoryConfig(**meta["memory"]) if "memory" in meta else MemoryConfig()
    model = load_pretrained(meta["base_checkpoint"], trained_memory(saved, memory))
    restore_params(model, run)
    return model


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
