"""`--checkpoint` for every convert tool: one loader for the forms an EdgeInfinite model comes in.

    base model     a registered name ("smollm2"), an HF folder or a .gguf file: gate at its initial value
    export folder  written by `python -m convert.to_torch` (HF folder + edgeinfinite.json + gate file)
    training run   an eijax training checkpoint (orbax; its metadata names the base checkpoint)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


from eijax.config import MemoryConfig
from eijax.model import EdgeInfiniteLM

EXPORT_META = "edgeinfinite.json"
GATE_FILE = "edgeinfinite_gate.safetensors"


def is_export_folder(path: Path) -> bool:
    return path.is_dir() and (path / EXPORT_META).is_file()


def training_checkpoint_dir(path: Path) -> Path | None:
    """The orbax manager folder of a training run (run dir, its checkpoints/ or one step), else None."""
    if not path.is_dir():
        return None
    for candidate in (path / "checkpoints", path, path.parent):
        if candidate.is_dir() and any(p.is_dir() and p.name.isdigit() and (p / "meta").exists() for p in candidate.iterdir()):
            return candidate
    return None


def read_training_meta(ckpt_dir: Path) -> dict:
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(ckpt_dir.absolute(), item_handlers={"meta": ocp.JsonCheckpointHandler()},
                               options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint step in {ckpt_dir}")
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def load_model(checkpoint: str | Path, memory: MemoryConfig | None = None) -> EdgeInfiniteLM:
    """An eijax model (float32) from any `--checkpoint` form.

    `memory` overrides the checkpoint's MemoryConfig (for a base model it *is* the config); the
    gate type and memory rule of an exported or trained model are kept, since its weights need them.
    """
    from eijax.pretrained import load_pretrained

    path = Path(checkpoint).expanduser()
    if is_export_folder(path):
        meta = json.loads((path / EXPORT_META).read_text())
        saved = MemoryConfig(**meta["memory_config"])
        model = load_pretrained(path, _keep_trained(saved, memory))
        _load_gate_file(model, path / GATE_FILE)
        return model
    ckpt_dir = training_checkpoint_dir(path)
    if ckpt_dir is not None:
        from eijax.train.checkpointing import restore_params

        meta = read_training_meta(ckpt_dir)
        saved = MemoryConfig(**meta["memory"]) if "memory" in meta else MemoryConfig()
        model = load_pretrained(meta["base_checkpoint"], _keep_trained(saved, memory))
        restore_params(model, path)
        return model
    return load_pretrained(checkpoint, memory or MemoryConfig())


def _keep_trained(saved: MemoryConfig, override: MemoryConfig | None) -> MemoryConfig:
    if override is None:
        return saved
    return dataclasses.replace(override, gate=saved.gate, gate_init=saved.gate_init, rule=saved.rule, eps=saved.eps)


def _load_gate_file(model: EdgeInfiniteLM, gate_file: Path) -> None:
    """Gate tensors (torch-twin names) -> the eijax model, through the exact rename + transpose."""
    from flax import nnx
    from safetensors.numpy import load_file

    from convert.weights import eijax_state_from_torch_names

    gate = load_file(str(gate_file))
    updates = eijax_state_from_torch_names(model, gate)
    nnx.update(model, updates)


def tokenizer_source(checkpoint: str | Path) -> str | None:
    """Where the tokenizer of a `--checkpoint` lives (a training run points at its base model)."""
    path = Path(checkpoint).expanduser()
    if is_export_folder(path):
        return str(path)
    ckpt_dir = training_checkpoint_dir(path)
    if ckpt_dir is not None:
        return read_training_meta(ckpt_dir).get("base_checkpoint")
    return str(checkpoint)
