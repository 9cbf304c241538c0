"""A cache of dequantised GGUF weights, so that the second load of a GGUF skips parsing and dequantising.

Reading a GGUF costs seconds: gguf's GGUFReader decodes every metadata value in Python (SmolLM2's
49K tokenizer strings) and its NumPy dequantisation is slow. The cache keeps exactly what
`read_gguf` returns (the Hugging Face config and the float32 tensors) in one safetensors file
(never pickle), named by the GGUF's sha256 and `FORMAT` (bumped whenever the reader's output
changes), so a changed file can never be served stale weights.

Hashing the whole file on every start would itself cost 0.3-1 s (98 MB), so a small JSON stamp per
source path records (size, mtime_ns, sha256): while size and mtime are unchanged the stored hash is
trusted; when either changes the file is hashed again. A file that is only touched or reinstalled
keeps its weights; changed content gets new ones and the old cache file of that path is removed.

Location: $EIJAX_WEIGHT_CACHE, else `registry.cache_dir()/weights`; EIJAX_WEIGHT_CACHE="" turns it off.
A cache that cannot be written or read only costs time: the GGUF is read as without it.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from eijax.checkpoint import gguf_file

FORMAT = "eijax-gguf-f32-v1"  # bump when read_gguf's output (names, layout, config) changes
_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I32": "<i4", "I64": "<i8"}  # safetensors names


def read_gguf_cached(path: str | Path, folder: Path | None) -> tuple[dict, dict[str, np.ndarray]]:
    """`read_gguf(path)`, served from (and written to) the cache in `folder` (None: no cache)."""
    path = Path(path)
    if folder is None:
        return gguf_file.read_gguf(path)
    digest = source_sha256(path, folder)
    target = weights_path(folder, digest)
    hit = _load(target, digest)
    if hit is not None:
        return hit
    config, tensors = gguf_file.read_gguf(path)
    _save(target, config, tensors, digest, path)
    return config, tensors


def weights_path(folder: Path, digest: str) -> Path:
    return folder / f"{digest[:32]}-{FORMAT}.safetensors"


def source_sha256(path: Path, folder: Path) -> str:
    """sha256 of the file at `path`, from its stamp while size and mtime are unchanged (else hashed
    again, the stamp rewritten and the previous content's cached weights removed)."""
    st = path.stat()
    stamp_file = _stamp_path(path, folder)
    try:
        stamp = json.loads(stamp_file.read_text())
        if (stamp["size"], stamp["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
            return str(stamp["sha256"])
        old = str(stamp["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        old = None
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    stamp = dict(path=str(path.resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=digest)
    _atomic_write(stamp_file, lambda name: Path(name).write_text(json.dumps(stamp)))
    if old and old != digest:
        try:
            weights_path(folder, old).unlink(missing_ok=True)  # that path's previous content
        except OSError:
            pass
    return digest


def _stamp_path(path: Path, folder: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return folder / "sources" / f"{path.stem}-{key}.json"


def _load(target: Path, digest: str) -> tuple[dict, dict[str, np.ndarray]] | None:
    """The cached (config, tensors), or None when absent, of another version or damaged. The tensors
    are read-only views of the memory-mapped file (no copy: the model copies them into its own
    parameters anyway), read straight from the safetensors layout: 8-byte header size, JSON header,
    data."""
    try:
        with open(target, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        (n,) = struct.unpack_from("<Q", data, 0)
        header = json.loads(bytes(data[8:8 + n]))
        meta = header.pop("__metadata__", {}) or {}
        if meta.get("format") != FORMAT or meta.get("source_sha256") != digest:
            return None
        config = json.loads(meta["config"])
        tensors = {}
        for name, info in header.items():
            start, end = info["data_offsets"]
            dtype = np.dtype(_DTYPES[info["dtype"]])
            count = (end - start) // dtype.itemsize
            tensors[name] = np.frombuffer(data, dtype, count, 8 + n + start).reshape(info["shape"])
    except (OSError, ValueError, KeyError, TypeError, struct.error):  # absent or damaged: read the GGUF
        return None
    return config, tensors


def _save(target: Path, config: dict, tensors: dict[str, np.ndarray], digest: str, source: Path) -> None:
    from safetensors.numpy import save_file

    meta = dict(format=FORMAT, source_sha256=digest, source=str(source.resolve()), config=json.dumps(config))
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    _atomic_write(target, lambda name: save_file(arrays, name, metadata=meta))


def _atomic_write(target: Path, write) -> None:
    """Write via a temporary file and rename: a concurrent reader sees all of it or nothing."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        os.close(fd)
        try:
            write(name)
            os.chmod(name, 0o644)
            os.replace(name, target)
        except BaseException:
            os.unlink(name)
            raise
    except OSError:
        pass  # read-only or full disk: the cache only saves time
