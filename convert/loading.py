"""`--checkpoint` for every convert tool: one loader for the forms an EdgeInfinite model comes in.

    base model     a registered name ("smollm2"), an HF folder or a .gguf file: gate at its initial value
    export folder  written by `python -m convert.to_torch` (HF folder + edgeinfinite.json + gate file)
    trained        a packaged memory name ("smollm2-memory"), a memory file or a training run
                   (eijax.trained; each names its base checkpoint)
"""

from __future__ import annotations

import json
from pathlib import Path

from eijax.config import MemoryConfig
from eijax.model import EdgeInfiniteLM
from eijax.trained import is_trained_source, load_trained, trained_base, trained_memory

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
    if is_trained_source(checkpoint):
        return load_trained(checkpoint, memory)
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
    if is_trained_source(checkpoint):
        return trained_base(checkpoint)
    return str(checkpoint)
