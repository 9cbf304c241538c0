"""Trained memory paths, for inference and conversion: one loader for every form they come in.

    packaged name   "smollm2-memory": a memory path that ships with eijax (eijax/weights/<name>.json
                    + <name>.safetensors), trained on the base model the JSON names
    memory file     <stem>.json + <stem>.safetensors written by `python -m eijax.trained RUN OUT`
    training run    an orbax run folder of `train.py` (its metadata names the base checkpoint)

`load_trained(source, memory)` returns the base model with the trained parameters in place; the
memory rule, gate type and adapter come from the source (its weights need them), sink/window from
`memory`. Everything here is read-only and needs nothing from eijax.train, so generate, eval and
convert reach it without the trainer (which imports the fingerprints from here).

A memory file is small (the memory path only, `eijax.layers.MEMORY_PATH`: ~1.2 MB gate-only, ~9 MB
with the adapter and write gate for SmolLM2) and holds float32 tensors keyed by their nnx path ("blocks.gate.kernel"); its JSON holds
the base checkpoint, the architecture fingerprint, the MemoryConfig and how it was trained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from eijax.cli import MissingInput, UserError
from eijax.config import MemoryConfig

PACKAGED_DIR = Path(__file__).parent / "weights"
MEMORY_FILE_FORMAT = "eijax-memory-path/1"
log = logging.getLogger(__name__)


def param_filter(patterns: Sequence[str]) -> nnx.filterlib.Filter:
    """Params whose path has any of `patterns` as a whole path element (e.g. "gate")."""
    return nnx.All(nnx.Param, nnx.Any(*[nnx.PathContains(p) for p in patterns]))


def set_params(model: nnx.Module, values, patterns: Sequence[str]) -> None:
    """Put values (a pure dict, on device or host) into `model`'s params matching `patterns`, in place."""
    state = nnx.state(model, param_filter(patterns))
    nnx.replace_by_pure_dict(state, jax.device_get(values))
    nnx.update(model, state)


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


class CheckpointMismatch(UserError, ValueError):
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


def check_shapes(saved: dict, expected: dict, where: str) -> None:
    flat_s = dict(jax.tree_util.tree_flatten_with_path(saved)[0])
    flat_e = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    if flat_s.keys() != flat_e.keys():
        raise CheckpointMismatch(f"checkpoint {where} holds params {sorted(map(jax.tree_util.keystr, flat_s))}, "
                                 f"the model trains {sorted(map(jax.tree_util.keystr, flat_e))}")
    for k, v in flat_e.items():
        if tuple(flat_s[k].shape) != tuple(v.shape):
            raise CheckpointMismatch(f"checkpoint {where}: {jax.tree_util.keystr(k)} has shape {tuple(flat_s[k].shape)}, "
                                     f"the model expects {tuple(v.shape)}")


def _read_only_manager(ckpt_dir: str | Path, **handlers: Any) -> ocp.CheckpointManager:
    """An orbax manager that only reads, built without orbax's four warnings that it is read-only."""
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        return ocp.CheckpointManager(Path(ckpt_dir).absolute(), item_handlers=handlers,
                                     options=ocp.CheckpointManagerOptions(read_only=True))
    finally:
        absl_log.setLevel(level)


def restore_params(model, checkpoint_dir: str | Path, step: int | None = None) -> int:
    """Load trained memory-path params from a run's checkpoint folder into `model` in place (for inference).
    Returns the step. Fails with CheckpointMismatch if the checkpoint belongs to another model."""
    directory = Path(checkpoint_dir)
    if not (directory / "checkpoints").is_dir() and (directory.parent.name == "checkpoints"):
        step = int(directory.name) if step is None else step
        directory = directory.parent.parent
    ckpt_dir = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
    with _read_only_manager(ckpt_dir, trainable=ocp.StandardCheckpointHandler(),
                            meta=ocp.JsonCheckpointHandler()) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise MissingInput(f"no checkpoint in {ckpt_dir}")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        check_compatible(meta, model, None, f"{ckpt_dir}/{step}")
        patterns = meta.get("trainable_patterns", ["gate"])
        current = nnx.to_pure_dict(nnx.state(model, param_filter(patterns)))
        # the handler's own metadata: the manager's would warn about opt_state and data, unneeded here
        saved = ocp.StandardCheckpointHandler().metadata(ckpt_dir.absolute() / str(step) / "trainable")
        check_shapes(saved, current, f"{ckpt_dir}/{step}")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                                current)  # host arrays after a warm start from a memory file
        values = manager.restore(step, args=ocp.args.Composite(trainable=ocp.args.StandardRestore(abstract)))["trainable"]
    set_params(model, values, patterns)
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
    with _read_only_manager(ckpt_dir, meta=ocp.JsonCheckpointHandler()) as manager:
        step = manager.latest_step()
        if step is None:
            raise MissingInput(f"no checkpoint step in {ckpt_dir}")
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def trained_memory(saved: MemoryConfig, override: MemoryConfig | None) -> MemoryConfig:
    """`override` (e.g. another sink/window for inference) with what the trained weights need kept:
    gate type, adapter, write gate, prior, key convolution, decay, memory rule and eps."""
    if override is None:
        return saved
    if override.enabled and saved.enabled and (override.sink, override.window) != (saved.sink, saved.window):
        # Not an error (a user may mean it), but the memory path's weights are geometry-specific:
        # stage 3 of smollm2-memory (32 + 256) recalled a 2K passkey 0.25 (n = 20) at 64 + 512, 0.80 at its own.
        log.warning("the memory path was trained with sink %d + window %d; running it with sink %d + window %d, "
                    "which it was not trained for", saved.sink, saved.window, override.sink, override.window)
    return dataclasses.replace(override, gate=saved.gate, gate_init=saved.gate_init, adapter=saved.adapter,
                               write_gate=saved.write_gate, prior=saved.prior, key_conv=saved.key_conv,
                               decay=saved.decay, decay_keep_heads=saved.decay_keep_heads, rule=saved.rule, eps=saved.eps)


def _load_run(run: str | Path, memory: MemoryConfig | None, base: str | Path | None):
    from eijax.pretrained import load_pretrained

    ckpt_dir = training_checkpoint_dir(run)
    if ckpt_dir is None:
        raise MissingInput(f"{run} is not an eijax training run (no checkpoints/<step>/meta)")
    meta = read_training_meta(ckpt_dir)
    saved = _saved_memory(meta)
    model = load_pretrained(base or meta["base_checkpoint"], trained_memory(saved, memory))
    _init_then_restore(model, run, meta)
    return model


def _init_then_restore(model, run: str | Path, meta: dict[str, Any]) -> None:
    """A run's checkpoint holds only what it trained; a warm-started run's other memory-path params
    (e.g. a frozen gate and adapter under a newly trained write gate) are its init's."""
    if meta.get("init_memory"):
        init_from_trained(model, meta["init_memory"])
    restore_params(model, run)


def memory_patterns(source: str | Path) -> list[str]:
    """The param patterns whose values `source` determines (for a warm-started run: its init's too)."""
    return _memory_patterns(_trained_meta(source))


def _memory_patterns(meta: dict[str, Any]) -> list[str]:
    return list(meta.get("memory_patterns") or meta.get("trainable_patterns", ["gate"]))


def load_trained(source: str | Path, memory: MemoryConfig | None = None, base: str | Path | None = None):
    """The base model with trained memory-path parameters from `source` (see the module docstring).
    `base` replaces the base checkpoint the source names (same architecture, else CheckpointMismatch)."""
    stem = memory_file_stem(source)
    if stem is not None:
        return _load_memory_file(stem, memory, base)
    if training_checkpoint_dir(source) is not None:
        return _load_run(source, memory, base)
    known = ", ".join(packaged_names()) or "none installed"
    raise MissingInput(f"{str(source)!r} is neither a packaged memory name ({known}), a memory file "
                       "(<stem>.json + <stem>.safetensors) nor an eijax training run (checkpoints/<step>/meta)")


def is_trained_source(source: str | Path) -> bool:
    return memory_file_stem(source) is not None or training_checkpoint_dir(source) is not None


def trained_base(source: str | Path) -> str:
    """The base checkpoint a trained source was trained on (where its tokenizer lives)."""
    return _trained_meta(source)["base_checkpoint"]


def trained_geometry(source: str | Path) -> tuple[int, int]:
    """(sink, window) a trained source was trained with: the inference default for it, since a
    memory path does not transfer to another window (see `trained_memory`)."""
    saved = _saved_memory(_trained_meta(source))
    return saved.sink, saved.window


def _saved_memory(meta: dict[str, Any]) -> MemoryConfig:
    """The MemoryConfig a source's metadata records (runs from before it was recorded: the defaults).
    Options this eijax lacks (a source saved by another version, e.g. a reverted experiment) are a
    CheckpointMismatch that names them, not a TypeError."""
    if "memory" not in meta:
        return MemoryConfig()
    unknown = sorted(set(meta["memory"]) - {f.name for f in dataclasses.fields(MemoryConfig)})
    if unknown:
        raise CheckpointMismatch(f"a memory path trained on {meta.get('base_checkpoint')!r} was saved with memory options "
                                 f"this eijax does not have: {', '.join(unknown)} (load it with the eijax version that trained it)")
    return MemoryConfig(**meta["memory"])


def _trained_meta(source: str | Path) -> dict[str, Any]:
    stem = memory_file_stem(source)
    if stem is not None:
        return _read_memory_meta(stem)
    ckpt_dir = training_checkpoint_dir(source)
    if ckpt_dir is None:
        raise MissingInput(f"{str(source)!r} is neither a packaged memory name, a memory file nor a training run")
    return read_training_meta(ckpt_dir)


# ------------------------------------------------------------------ memory files
def packaged_names() -> list[str]:
    return sorted(p.stem for p in PACKAGED_DIR.glob("*.json"))


def memory_file_stem(source: str | Path) -> Path | None:
    """The <stem> of a packaged name or a memory file (<stem>, <stem>.json or <stem>.safetensors), else None."""
    name = str(source)
    if "/" not in name and (PACKAGED_DIR / f"{name}.json").is_file():
        return PACKAGED_DIR / name
    path = Path(name).expanduser()
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    if stem.with_suffix(".json").is_file() and stem.with_suffix(".safetensors").is_file():
        return stem
    return None


def _read_memory_meta(stem: Path) -> dict[str, Any]:
    meta = json.loads(stem.with_suffix(".json").read_text())
    if meta.get("format") != MEMORY_FILE_FORMAT:
        raise UserError(f"{stem.with_suffix('.json')} is not an eijax memory file (format {meta.get('format')!r})")
    return meta


def _load_memory_file(stem: Path, memory: MemoryConfig | None, base: str | Path | None):
    from eijax.pretrained import load_pretrained

    meta = _read_memory_meta(stem)
    model = load_pretrained(base or meta["base_checkpoint"], trained_memory(_saved_memory(meta), memory))
    _set_from_memory_file(model, stem, meta)
    return model


def _set_from_memory_file(model, stem: Path, meta: dict[str, Any]) -> list[str]:
    from safetensors.numpy import load_file

    where = str(stem.with_suffix(".safetensors"))
    check_compatible(meta, model, None, where)
    patterns = meta["trainable_patterns"]
    tensors = load_file(where)
    if not model.memory_config.prior:  # a warm start that does not use the source's prior leaves it out
        patterns = [p for p in patterns if p != "memory_prior"]
        tensors = {k: v for k, v in tensors.items() if ".memory_prior." not in f".{k}."}
    current = nnx.to_pure_dict(nnx.state(model, param_filter(patterns)))
    values = traverse_util.unflatten_dict(tensors, sep=".")
    check_shapes(values, current, where)
    set_params(model, values, patterns)
    return patterns


def init_from_trained(model, source: str | Path) -> list[str]:
    """Warm start: put the trained memory-path params of `source` into `model` in place (the model's
    memory rule, gate and adapter must be the ones they were trained with; a write gate the source lacks
    starts at β = 1; a prior it lacks stays as the model has it, one the model lacks is left out).
    Returns their patterns."""
    stem = memory_file_stem(source)
    meta = _trained_meta(source)
    saved = _saved_memory(meta)
    have = model.memory_config
    diff = [f"{k}: {getattr(saved, k)!r} vs {getattr(have, k)!r}" for k in ("rule", "gate", "adapter")
            if getattr(saved, k) != getattr(have, k)]
    if saved.write_gate and not have.write_gate:  # the other way round is a warm start: β starts at 1
        diff.append("write_gate: True vs False")
    if saved.key_conv and saved.key_conv != have.key_conv:  # none saved: a warm start from the tokens' own keys
        diff.append(f"key_conv: {saved.key_conv} vs {have.key_conv}")
    if saved.decays and not have.decays:  # none saved: a warm start from the run's decay
        diff.append(f"decay: {saved.decay} vs {have.decay}")
    if saved.decays and have.decays and saved.decay_keep_heads != have.decay_keep_heads:  # another logit shape
        diff.append(f"decay_keep_heads: {saved.decay_keep_heads} vs {have.decay_keep_heads}")
    if diff:
        raise CheckpointMismatch(f"{source} was trained with another memory path than this run's "
                                 f"(trained vs run: {', '.join(diff)})")
    if stem is not None:
        return _set_from_memory_file(model, stem, meta)
    _init_then_restore(model, source, meta)
    return _memory_patterns(meta)


def save_memory_file(model, patterns: Sequence[str], stem: str | Path, base_checkpoint: str,
                     provenance: dict[str, Any] | None = None) -> Path:
    """Write `model`'s params matching `patterns` as <stem>.safetensors + <stem>.json."""
    from safetensors.numpy import save_file

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    values = {k: np.ascontiguousarray(np.asarray(jax.device_get(v), np.float32)) for k, v in
              traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, param_filter(patterns))), sep=".").items()}
    save_file(values, str(stem.with_suffix(".safetensors")))
    meta = dict(format=MEMORY_FILE_FORMAT, base_checkpoint=base_checkpoint, arch=arch_fingerprint(model),
                memory=dataclasses.asdict(model.memory_config), trainable_patterns=list(patterns),
                params=int(sum(v.size for v in values.values())), provenance=provenance or {})
    stem.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return stem


def main(argv: Sequence[str] | None = None) -> None:
    from eijax import cli

    p = cli.ArgumentParser(prog="python -m eijax.trained",
                           description="Export a training run's memory path (gate, adapter, write gate) as a small "
                                       "safetensors + JSON pair that --checkpoint accepts anywhere.")
    p.add_argument("run", help="train.py output folder (or its checkpoints/ or one step)")
    p.add_argument("out", help="output stem: writes <out>.safetensors and <out>.json")
    p.add_argument("--note", default="", help="free text stored in the JSON's provenance")
    a = p.parse_args(argv)
    with cli.user_errors():
        ckpt_dir = training_checkpoint_dir(a.run)
        if ckpt_dir is None:
            raise MissingInput(f"{a.run} is not an eijax training run (no checkpoints/<step>/meta)")
        meta = read_training_meta(ckpt_dir)
        model = _load_run(a.run, None, None)
        run_dir = ckpt_dir.parent
        provenance = dict(run=str(run_dir), step=meta.get("step"), note=a.note)
        for name in ("config.json", "summary.json"):
            if (run_dir / name).is_file():
                data = json.loads((run_dir / name).read_text())
                provenance[name.split(".")[0]] = {k: v for k, v in data.items() if k != "losses"}
        stem = save_memory_file(model, _memory_patterns(meta), a.out, meta["base_checkpoint"], provenance)
    print(f"wrote {stem}.safetensors and {stem}.json")


if __name__ == "__main__":
    main()
