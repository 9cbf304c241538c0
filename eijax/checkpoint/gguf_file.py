"""Read a llama.cpp GGUF file as a Hugging Face checkpoint: (config dict, {HF name: float32 array}).

Every tensor is dequantised to float32 and renamed to its Hugging Face name, in Hugging Face
layout ([out, in] for linear weights). For the `llama` architecture llama.cpp's converter
interleaves the rows of q and k (the two rotary halves of each head); that permutation is undone
here so that the arrays equal the original Hugging Face ones. qwen2, qwen3 and gemma3 are stored
unpermuted. For gemma3 llama.cpp stores every RMSNorm weight as 1 + w (its norm multiplies by the
weight; Gemma's by 1 + w): 1 is subtracted back, and the settings llama.cpp hard-codes for the
architecture rather than storing (local RoPE base 10000, every 6th layer global, query scale
1/sqrt(head_dim)) are written into the config, as transformers' GGUF loader does.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from eijax.cli import InputError, MissingInput
from eijax.config import HF_ARCHITECTURE_CLASS, HF_MODEL_TYPE, SUPPORTED_FAMILIES as SUPPORTED_ARCHITECTURES

# GGUF names outside the blocks -> Hugging Face module names.
_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# GGUF `blk.N.<part>` -> Hugging Face `model.layers.N.<module>`; shared by all three architectures.
_BLOCK_PART_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# gemma3 has four norms per layer; llama.cpp's ffn_norm is the pre-feedforward one.
_GEMMA3_BLOCK_PART_NAMES = {
    **_BLOCK_PART_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# What llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA3) fixes for gemma3 instead of reading the file.
_GEMMA3_LOCAL_ROPE_THETA = 10000.0
_GEMMA3_SLIDING_WINDOW_PATTERN = 6

_DEFAULT_ROPE_THETA = 10000.0


def read_gguf(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Return (Hugging Face config dict, {Hugging Face tensor name: float32 array}) for a GGUF file.

    Raises InputError (a ValueError) for a truncated or corrupt file, an architecture other than
    llama/qwen2/qwen3/gemma3, a tensor this reader cannot name, and a split (multi-file) GGUF.
    """
    path = Path(path)
    check_gguf(path)
    try:
        reader = GGUFReader(path)
    except ValueError as e:  # what numpy says when the header and the bytes disagree
        raise InputError(f"{path} could not be read as a GGUF file ({e}); it looks truncated or corrupt") from e
    architecture = _read_field(reader, "general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise InputError(f"GGUF architecture {architecture!r} in {path} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if (_read_field(reader, "split.count", 1) or 1) > 1:
        raise InputError(f"{path} is one part of a split GGUF; merge the parts into one file first "
                         "(llama.cpp's `llama-gguf-split --merge`).")
    gguf_shapes = {t.name: _numpy_shape(t) for t in reader.tensors}
    if "rope_freqs.weight" in gguf_shapes:
        # llama.cpp bakes Llama-3-style RoPE scaling into this tensor and drops its parameters,
        # so the Hugging Face rope_scaling cannot be rebuilt from the file.
        raise InputError(f"{path} carries rope_freqs (Llama 3 RoPE scaling), which eijax cannot map "
                         "back to a Hugging Face rope_scaling config.")
    config = gguf_hf_config(reader, architecture, gguf_shapes)
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        hf_name = hf_tensor_name(tensor.name, architecture)
        weights = _dequantized_float32(tensor)
        if architecture == "llama":
            weights = _unpermute_llama_qk(tensor.name, weights, config)
        if architecture == "gemma3" and hf_name.endswith("norm.weight"):
            weights = weights - np.float32(1.0)  # llama.cpp stored 1 + w
        tensors[hf_name] = weights
    return config, tensors


def hf_tensor_name(gguf_name: str, architecture: str = "llama") -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`, and so on."""
    parts_table = _GEMMA3_BLOCK_PART_NAMES if architecture == "gemma3" else _BLOCK_PART_NAMES
    stem, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        raise InputError(f"GGUF tensor {gguf_name!r} has no .weight/.bias suffix")
    if stem in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in parts_table:
        return f"model.layers.{int(parts[1])}.{parts_table[parts[2]]}.{suffix}"
    raise InputError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart known to eijax")


def _numpy_shape(tensor: Any) -> tuple[int, ...]:
    # GGUF lists dimensions fastest-varying first; NumPy (and Hugging Face) the other way round.
    return tuple(int(d) for d in reversed(tensor.shape))


def _dequantized_float32(tensor: Any) -> np.ndarray:
    weights = dequantize(tensor.data, GGMLQuantizationType(tensor.tensor_type))
    if np.may_share_memory(weights, tensor.data):
        weights = weights.copy()  # unquantised data is a view of the memory-mapped file
    return weights.reshape(_numpy_shape(tensor)).astype(np.float32, copy=False)


def _unpermute_llama_qk(gguf_name: str, weights: np.ndarray, config: dict) -> np.ndarray:
    """Undo llama.cpp's q/k row interleave (weights and biases alike).

    llama.cpp reorders each head's rows from [first half ; second half] (Hugging Face's rotate-half
    RoPE) to pairs (GPT-J style): reshape (heads, 2, d/2) -> swap -> (heads, d/2, 2). The inverse
    reads the rows as (heads, d/2, 2) and swaps back.
    """
    part = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
    if part == "attn_q":
        heads = config["num_attention_heads"]
    elif part == "attn_k":
        heads = config["num_key_value_heads"]
    else:
        return weights
    rows = weights.shape[0]
    interleaved = weights.reshape(heads, rows // heads // 2, 2, *weights.shape[1:])
    return np.ascontiguousarray(interleaved.swapaxes(1, 2)).reshape(weights.shape)


def gguf_hf_config(reader: GGUFReader, architecture: str, gguf_shapes: dict[str, tuple]) -> dict:
    """Build the Hugging Face config dict from GGUF metadata, checked against the tensor shapes."""
    def arch_field(key: str, default: Any = None) -> Any:
        return _read_field(reader, f"{architecture}.{key}", default)

    num_heads = _single_value(arch_field("attention.head_count"), "attention.head_count")
    num_kv_heads = _single_value(arch_field("attention.head_count_kv", num_heads),
                                 "attention.head_count_kv")
    hidden_size = int(arch_field("embedding_length"))
    head_dim = int(arch_field("attention.key_length")
                   or arch_field("rope.dimension_count")
                   or hidden_size // num_heads)
    q_rows = gguf_shapes["blk.0.attn_q.weight"][0]
    if q_rows != num_heads * head_dim:
        raise InputError(f"GGUF metadata says {num_heads} heads of {head_dim}, but attn_q has "
                         f"{q_rows} rows")
    rope_theta = _float32_decimal(arch_field("rope.freq_base", _DEFAULT_ROPE_THETA))
    rope_scaling = _rope_scaling(arch_field)

    config: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURE_CLASS[architecture]],
        "model_type": HF_MODEL_TYPE.get(architecture, architecture),
        "hidden_size": hidden_size,
        "intermediate_size": _single_value(arch_field("feed_forward_length"), "feed_forward_length"),
        "num_hidden_layers": int(arch_field("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float32_decimal(arch_field("attention.layer_norm_rms_epsilon")),
        # The embedding's row count is what the weights need, whatever the metadata claims.
        "vocab_size": gguf_shapes["token_embd.weight"][0],
        "max_position_embeddings": int(arch_field("context_length")),
        "tie_word_embeddings": "output.weight" not in gguf_shapes,
        "rope_theta": rope_theta,
        # transformers >= 5 reads RoPE settings from `rope_parameters`; older configs (and
        # hub config.json files) use rope_theta / rope_scaling. Both are given.
        "rope_parameters": {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta},
    }
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    if architecture in ("llama", "qwen3"):  # qwen2 has q/k/v biases unconditionally
        config["attention_bias"] = "blk.0.attn_q.bias" in gguf_shapes
    if architecture == "llama":
        config["mlp_bias"] = "blk.0.ffn_up.bias" in gguf_shapes
    if architecture == "gemma3":
        config.update(_gemma3_config(arch_field, config, rope_scaling))
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        token_id = _read_field(reader, f"tokenizer.ggml.{gguf_key}")
        if token_id is not None:
            config[hf_key] = int(token_id)
    return config


def _gemma3_config(arch_field: Any, config: dict, rope_scaling: dict | None) -> dict:
    """The gemma3_text entries, read as llama.cpp reads the file (llama-model.cpp, LLM_ARCH_GEMMA3)."""
    n_layers = config["num_hidden_layers"]
    pattern = arch_field("attention.sliding_window_pattern", _GEMMA3_SLIDING_WINDOW_PATTERN)
    if isinstance(pattern, list):  # newer files: one flag per layer, True = sliding window
        if len(pattern) != n_layers:
            raise InputError(f"GGUF gemma3.attention.sliding_window_pattern has {len(pattern)} entries "
                             f"for {n_layers} layers")
        layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:  # every `pattern`-th layer is global
        layer_types = ["sliding_attention" if (i + 1) % int(pattern) else "full_attention" for i in range(n_layers)]
    # llama.cpp: 1/sqrt(head_dim), except the 62-layer (27B) model, 1/sqrt(d_model / n_heads)
    scalar = (config["hidden_size"] // config["num_attention_heads"] if n_layers == 62 else config["head_dim"])
    final_softcap = _float32_decimal(arch_field("final_logit_softcapping"))
    out = {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window": _single_value(arch_field("attention.sliding_window"), "attention.sliding_window"),
        "layer_types": layer_types,
        "rope_local_base_freq": _GEMMA3_LOCAL_ROPE_THETA,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", **(rope_scaling or {}), "rope_theta": config["rope_theta"]},
            "sliding_attention": {"rope_type": "default", "rope_theta": _GEMMA3_LOCAL_ROPE_THETA},
        },
        "final_logit_softcapping": final_softcap,
        "attn_logit_softcapping": _float32_decimal(arch_field("attn_logit_softcapping")),
        "use_bidirectional_attention": False,
    }
    del config["hidden_act"]
    return out


def _rope_scaling(arch_field: Any) -> dict | None:
    scaling_type = arch_field("rope.scaling.type")
    if scaling_type in (None, "none"):
        return None
    factor = _float32_decimal(arch_field("rope.scaling.factor", 1.0))
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": factor}
    if scaling_type == "yarn":
        scaling = {"rope_type": "yarn", "factor": factor}
        optional = {"original_max_position_embeddings": "rope.scaling.original_context_length",
                    "attention_factor": "rope.scaling.attn_factor",
                    "beta_fast": "rope.scaling.yarn_beta_fast",
                    "beta_slow": "rope.scaling.yarn_beta_slow"}
        for hf_key, gguf_key in optional.items():
            value = arch_field(gguf_key)
            if value is not None:
                scaling[hf_key] = int(value) if hf_key.startswith("original") else _float32_decimal(value)
        return scaling
    raise InputError(f"GGUF RoPE scaling type {scaling_type!r} is not supported (linear, yarn are)")


def _read_field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _single_value(value: Any, key: str) -> int:
    """Some GGUFs store a per-layer list; these architectures need one value for all layers."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise InputError(f"GGUF {key} varies per layer ({value}); eijax needs one value")
        value = value[0]
    return int(value)


def _float32_decimal(value: Any) -> float | None:
    """GGUF stores float32: 1e-5 comes back as 9.9999997e-06. The shortest decimal that rounds to
    the same float32 recovers the value the original config.json had."""
    if value is None:
        return None
    return float(str(np.float32(value)))


# GGUF metadata value types: fixed-size scalars by struct format; 8 is a string, 9 an array.
_GGUF_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                        10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str | Path, keys: Iterable[str]) -> dict[str, Any]:
    """The values of `keys` in a GGUF file's metadata (absent keys are left out).

    Scans the header only as far as the last wanted key. GGUFReader instead parses every
    metadata value, including ~100k tokenizer strings, which costs seconds.
    """
    wanted = set(keys)
    found: dict[str, Any] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise InputError(f"{path} is not a GGUF file")
        version, _, kv_count = struct.unpack_from("<IQQ", data, 4)
        if version < 2:
            raise InputError(f"{path} is GGUF v{version}; only v2 and later are read")
        pos = 24
        for _ in range(kv_count):
            if wanted <= found.keys():
                break
            key, pos = _gguf_string(data, pos)
            (value_type,) = struct.unpack_from("<I", data, pos)
            value, pos = _gguf_value(data, pos + 4, value_type, decode=key in wanted)
            if key in wanted:
                found[key] = value
    return found


def check_gguf(path: str | Path) -> None:
    """Fail, naming the file, unless `path` is a whole GGUF file: the header parses and every tensor's
    bytes lie inside the file (a cut-off download or copy is the usual culprit). Reads the header
    only, without decoding the tokenizer strings, so it is cheap enough to run before every load.
    MissingInput for no file; InputError (a ValueError) for a truncated or corrupt one."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"No GGUF file at {path}")
    size = path.stat().st_size
    if size < 24:
        raise InputError(f"{path} is {size} bytes, too short for a GGUF header; it looks truncated or corrupt")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise InputError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
        try:
            needed = _gguf_bytes_needed(data)
        except (struct.error, UnicodeDecodeError, ValueError, KeyError, OverflowError) as e:
            raise InputError(f"{path}: the GGUF header is cut short or garbled ({e}); "
                             "the file looks truncated or corrupt") from None
    if needed > size:
        raise InputError(f"{path} is truncated: its header describes {needed:,} bytes but the file has "
                         f"{size:,} (an interrupted download or copy?)")


def _gguf_bytes_needed(data: mmap.mmap) -> int:
    """End of the last tensor's data, from the header: metadata, tensor infos, aligned data section."""
    version, n_tensors, kv_count = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise ValueError(f"GGUF v{version}; only v2 and later are read")
    pos, alignment = 24, 32
    for _ in range(kv_count):
        key, pos = _gguf_string(data, pos)
        (value_type,) = struct.unpack_from("<I", data, pos)
        value, pos = _gguf_value(data, pos + 4, value_type, decode=key == "general.alignment")
        if key == "general.alignment":
            alignment = int(value)
    end = 0
    for _ in range(n_tensors):
        _, pos = _gguf_string(data, pos)
        (n_dims,) = struct.unpack_from("<I", data, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", data, pos + 4)
        tensor_type, offset = struct.unpack_from("<IQ", data, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(tensor_type)]
        end = max(end, offset + math.prod(dims) // block * block_bytes)
    if pos > len(data):
        raise ValueError("the tensor list runs past the end of the file")
    return -(-pos // alignment) * alignment + end


def _gguf_string(data: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", data, pos)
    end = pos + 8 + length
    return data[pos + 8 : end].decode("utf-8"), end


def _gguf_value(data: mmap.mmap, pos: int, value_type: int, decode: bool) -> tuple[Any, int]:
    if value_type == _GGUF_STRING:
        return _gguf_string(data, pos)
    if value_type in _GGUF_SCALAR_FORMATS:
        fmt = _GGUF_SCALAR_FORMATS[value_type]
        return struct.unpack_from(fmt, data, pos)[0], pos + struct.calcsize(fmt)
    if value_type != _GGUF_ARRAY:
        raise ValueError(f"unknown GGUF metadata value type {value_type}")
    item_type, count = struct.unpack_from("<IQ", data, pos)
    pos += 12
    if item_type in _GGUF_SCALAR_FORMATS and not decode:  # skip without reading the items
        return None, pos + count * struct.calcsize(_GGUF_SCALAR_FORMATS[item_type])
    items = []
    for _ in range(count):
        item, pos = _gguf_value(data, pos, item_type, decode)
        items.append(item)
    return (items if decode else None), pos
