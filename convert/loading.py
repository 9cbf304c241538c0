"""`--checkpoint` for every convert tool: one loader for the forms an EdgeInfinite model comes in.

    base model     a registered name ("smollm2"), an HF folder or a .gguf file: gate at its initial value
    export folder  written by `python -m convert.to_torch` (HF folder + edgeinfinite.json + gate file)
    training run   an eijax training checkpoint (orbax; its metadata names the base checkpoint)
"""

from __future__ import annotations

import json
from pathlib import Path

from eijax.config import MemoryConfig
from eijax.model import EdgeInfiniteLM
from eijax.train.checkpointing import load_trained, read_training_meta, trained_memory, training_checkpoint_dir

EXPORT_META = "edgeinfinite.json"
GATE_FILE = "edgeinfinite_gate.safetensors"


def is_export_folder(path: Path) -> bool:
    return path.is_dir() and (path / EXPORT_META).is_file()


def load_model(checkpoint: str | Path, memory: MemoryConfig | None = None) -> EdgeInfiniteLM:
    """An eijax model (float32) from any `--checkpoint` form.

    `memory` overrides the checkpoint's MemoryConfig (for a base model it *is* the config); the
    gate type and memory rule of an exported or trained model are kept, since its weights need them.
    """
    from eijax.pretrained import load_pretrained

    path = Path(checkpoint).expanduser()
    if is_export_folder(path):
        model = load_pretrained(path, export_memory_config(path, memory))
        _load_gate_file(model, path / GATE_FILE)
        return model
    if training_checkpoint_dir(path) is not None:
        return load_trained(path, memory)
    return load_pretrained(checkpoint, memory or MemoryConfig())


def export_memory_config(folder: Path, memory: MemoryConfig | None = None) -> MemoryConfig:
    """The export folder's MemoryConfig, with `memory`'s inference choices (sink, window, enabled)."""
    saved = MemoryConfig(**json.loads((Path(folder) / EXPORT_META).read_text())["memory_config"])
    return trained_memory(saved, memory)


def _load_gate_file(model: EdgeInfiniteLM, gate_file: Path) -> None:
    """Gate tensors (torch-twin names) -> the eijax model, through the exact rename + transpose."""
    from flax import nnx
    from safetensors.numpy import load_file

    from convert.weights import eijax_updates

    nnx.update(model, eijax_updates(model, load_file(str(gate_file)), partial=True))


def try_load_tokenizer(source: str | None):
    """The tokenizer at `source`, or None where there is none (tiny random test models)."""
    if source is None:
        return None
    from eijax.tokenizer import load_tokenizer

    try:
        return load_tokenizer(source)
    except (FileNotFoundError, ValueError, OSError, KeyError):
        return None


def tokenizer_source(checkpoint: str | Path) -> str | None:
    """Where the tokenizer of a `--checkpoint` lives (a training run points at its base model)."""
    path = Path(checkpoint).expanduser()
    if is_export_folder(path):
        return str(path)
    ckpt_dir = training_checkpoint_dir(path)
    if ckpt_dir is not None:
        return read_training_meta(ckpt_dir).get("base_checkpoint")
    return str(checkpoint)
