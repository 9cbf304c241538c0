"""Read a Hugging Face model folder: config.json plus safetensors weights, as NumPy.

The safetensors file format is parsed here directly (an 8-byte header length, a JSON header,
then raw little-endian bytes) because `safetensors.numpy` cannot represent bfloat16, and loading
through torch or flax would pull a framework into what is only a file reader.
Pickled weights (`pytorch_model.bin`, `*.pt`) are refused: unpickling can run arbitrary code.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from eijax.cli import InputError, MissingInput

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# safetensors dtype name -> NumPy dtype of the stored bytes (all little-endian).
_STORED_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widened to float32 below
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # a sane bound; real headers are kilobytes


def read_hf_folder(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Return (config.json as a dict, {tensor name: array}) for a Hugging Face model folder.

    Weights come from `model.safetensors`, or from the shards named by
    `model.safetensors.index.json`. Arrays keep the Hugging Face layout ([out, in] for linear
    weights). bfloat16 and float16 tensors come out as float32 (both widen exactly); every other
    dtype is kept.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise MissingInput(f"Not a model folder: {folder}")
    config = read_config(folder)
    return config, read_folder_tensors(folder)


def read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        hint = ""
        gguf_files = sorted(p.name for p in folder.glob("*.gguf"))
        if gguf_files:
            hint = f" It holds GGUF file(s) {gguf_files}: pass the .gguf file itself instead."
        raise MissingInput(f"No config.json in {folder}.{hint}")
    with config_path.open(encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{config_path} is not valid JSON ({e})") from None


def read_folder_tensors(folder: Path) -> dict[str, np.ndarray]:
    single = folder / SINGLE_FILE_NAME
    index = folder / INDEX_FILE_NAME
    if single.is_file():
        return read_safetensors_file(single)
    if index.is_file():
        return _read_sharded(folder, index)
    raise MissingInput(_no_weights_message(folder))


def _no_weights_message(folder: Path) -> str:
    message = f"No {SINGLE_FILE_NAME} or {INDEX_FILE_NAME} in {folder}."
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        message += (
            f" Found pickled weights {pickles}: these are refused on purpose, because loading a"
            " pickle can run arbitrary code. Convert them to safetensors first."
        )
    return message


def _read_sharded(folder: Path, index_path: Path) -> dict[str, np.ndarray]:
    with index_path.open(encoding="utf-8") as f:
        weight_map: dict[str, str] = json.load(f)["weight_map"]
    shard_names = sorted(set(weight_map.values()))
    missing = [name for name in shard_names if not (folder / name).is_file()]
    if missing:
        raise MissingInput(f"{index_path} names shard file(s) that do not exist: {missing}")
    tensors: dict[str, np.ndarray] = {}
    for shard_name in shard_names:
        for name, array in read_safetensors_file(folder / shard_name).items():
            # The index is the authority: a shard holding a tensor the index puts elsewhere is
            # a broken checkpoint, not something to guess about.
            if weight_map.get(name) != shard_name:
                raise InputError(f"{shard_name} holds {name!r}, which {index_path.name} places in "
                                 f"{weight_map.get(name)!r}")
            tensors[name] = array
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise InputError(f"{index_path.name} lists tensors no shard holds: {absent[:10]}")
    return tensors


def read_safetensors_file(path: str | Path) -> dict[str, np.ndarray]:
    """Read every tensor of one .safetensors file into memory (bf16/f16 widened to float32)."""
    path = Path(path)
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InputError(f"{path} is too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        file_size = path.stat().st_size
        if header_len > min(_MAX_HEADER_BYTES, file_size - 8):
            raise InputError(f"{path}: header length {header_len} is not valid")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: the header is not valid JSON ({e}); is the file corrupt?") from None
    header.pop("__metadata__", None)
    # Memory-map rather than read: each tensor is copied out once, so peak memory stays near
    # the size of the result instead of twice it.
    data_start = 8 + header_len
    if file_size > data_start:
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start)
    else:  # NumPy cannot map zero bytes; a file of only empty tensors is still valid
        data = np.zeros(0, dtype=np.uint8)
    return {name: _decode_tensor(path, name, entry, data) for name, entry in header.items()}


def _decode_tensor(path: Path, name: str, entry: dict, data: np.ndarray) -> np.ndarray:
    dtype_name = entry["dtype"]
    if dtype_name not in _STORED_DTYPES:
        raise InputError(f"{path}: tensor {name!r} has dtype {dtype_name}, which eijax cannot read "
                         f"(supported: {sorted(_STORED_DTYPES)})")
    stored = _STORED_DTYPES[dtype_name]
    shape = tuple(int(d) for d in entry["shape"])
    begin, end = (int(o) for o in entry["data_offsets"])
    expected_bytes = int(np.prod(shape, dtype=np.int64)) * stored.itemsize
    if not 0 <= begin <= end <= len(data) or end - begin != expected_bytes:
        raise InputError(f"{path}: tensor {name!r} has offsets {begin}..{end}, which do not fit "
                         f"shape {shape} of {dtype_name} in {len(data)} data bytes")
    # Copy out of the file buffer so arrays are writable and own their memory.
    array = np.array(data[begin:end]).view(stored).reshape(shape)
    if dtype_name == "BF16":
        return bfloat16_bits_to_float32(array)
    if dtype_name == "F16":
        return array.astype(np.float32)
    return array.astype(stored.newbyteorder("="), copy=False)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shift the 16 stored bits up, reinterpret."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
