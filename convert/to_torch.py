"""eijax -> PyTorch: a Hugging Face folder of the base model plus the EdgeInfinite gate.

    python -m convert.to_torch --checkpoint smollm2 --out exports/smollm2_hf [--sink 64 --window 512]

The folder holds
    config.json, model.safetensors     the base model: `AutoModelForCausalLM.from_pretrained(folder)`
                                       loads it offline with no custom code
    edgeinfinite_gate.safetensors      gate (and memory-adapter) parameters under the twin's names
    edgeinfinite.json                  MemoryConfig and provenance
    tokenizer files                    when the source has a tokenizer
`load_torch(folder)` builds `convert.torch_model.EdgeInfiniteTorch` from it; `convert.loading.
load_model(folder)` goes back to eijax. Both directions are exact (float32).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from eijax import cli
from eijax.config import MemoryConfig, model_config_from_hf
from eijax.layers import MEMORY_PATH
from eijax.model import EdgeInfiniteLM

from convert.loading import (EXPORT_META, GATE_FILE, export_memory_config, load_model, tokenizer_source,
                             try_load_tokenizer)

FORMAT_VERSION = 1


def hf_tensors(model: EdgeInfiniteLM) -> dict[str, np.ndarray]:
    """The base parameters under Hugging Face names and layout (inverse of eijax.pretrained.params_from_hf)."""
    from flax import nnx

    from eijax.pretrained import hf_tensor_names

    block_names, top_names = hf_tensor_names(model.config.family)
    out: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(str(p) for p in path)
        value = np.asarray(var[...], dtype=np.float32)
        if path[0] == "blocks" and path[1:] in block_names:
            pattern, transpose = block_names[path[1:]]
            for i in range(value.shape[0]):
                out[pattern.format(i=i)] = np.ascontiguousarray(value[i].T if transpose else value[i])
        elif path in top_names:
            name, transpose = top_names[path]
            out[name] = np.ascontiguousarray(value.T if transpose else value)
    return out


def extra_tensors(model: EdgeInfiniteLM) -> dict[str, np.ndarray]:
    """Parameters that are not part of the base model (gate, memory adapter, write gate), under the twin's names."""
    from convert.weights import torch_state_dict

    return torch_state_dict(model, block_modules=MEMORY_PATH)


def export_folder(model: EdgeInfiniteLM, out: str | Path, *, source: str | None = None) -> Path:
    """Write the HF folder + gate file + metadata (+ tokenizer when `source` has one)."""
    from safetensors.numpy import save_file

    from eijax.pretrained import hf_config_of

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {**hf_config_of(model), "torch_dtype": "float32", "dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(hf_tensors(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    save_file(extra_tensors(model), str(out / GATE_FILE), metadata={"format": "pt"})
    meta = dict(format_version=FORMAT_VERSION, memory_config=dataclasses.asdict(model.memory_config),
                gate_file=GATE_FILE, gate_names="convert.torch_model.EdgeInfiniteTorch parameter names",
                source=str(source) if source else None)
    (out / EXPORT_META).write_text(json.dumps(meta, indent=2))
    if source is not None:
        tokenizer = try_load_tokenizer(tokenizer_source(source))
        if tokenizer is not None:  # a source without one (tiny random test models): the weights are the export
            tokenizer.save_pretrained(str(out))
    return out


def load_torch(folder: str | Path, memory: MemoryConfig | None = None, cache_write: str = "onehot"):
    """An `EdgeInfiniteTorch` from an export folder, read with safetensors only (no JAX arrays made).

    `memory` may change sink/window/enabled (inference choices); the gate type and rule are kept.
    """
    from safetensors.numpy import load_file
    import torch

    from eijax.pretrained import hf_tensor_names
    from convert.torch_model import EdgeInfiniteTorch

    folder = Path(folder)
    config = model_config_from_hf(json.loads((folder / "config.json").read_text()))
    twin = EdgeInfiniteTorch(config, export_memory_config(folder, memory), cache_write=cache_write)
    hf = load_file(str(folder / "model.safetensors"))
    block_names, top_names = hf_tensor_names(config.family)
    tensors = dict(load_file(str(folder / GATE_FILE)))
    for (sub, (pattern, transpose)) in block_names.items():
        for i in range(config.n_layers):
            name = pattern.format(i=i)
            if name in hf:
                tensors[_twin_name(("blocks", *sub), i)] = hf[name]  # HF [out, in] == torch layout
    for path, (name, _) in top_names.items():
        if name in hf and not (config.tie_embeddings and name == "lm_head.weight"):
            tensors[_twin_name(path, None)] = hf[name]
    twin.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in tensors.items()}, strict=True)
    return twin.eval()


def _twin_name(path: tuple[str, ...], layer: int | None) -> str:
    from convert.weights import torch_name

    return torch_name(path, layer, gate_kind="linear")[0]  # base params: kernel -> weight everywhere


@cli.main_guard
def main(argv: Sequence[str] | None = None) -> None:
    p = cli.ArgumentParser(prog="python -m convert.to_torch", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="base model (name, HF folder, .gguf), export folder, or eijax training checkpoint dir")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sink", type=int, help="override the checkpoint's sink (default: its own, or 64)")
    p.add_argument("--window", type=int, help="override the checkpoint's window (default: its own, or 512)")
    p.add_argument("--gate", default="linear", choices=("linear", "head_linear", "scalar"),
                   help="gate type for a base model (a trained checkpoint keeps its own)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    base = MemoryConfig(gate=a.gate)
    memory = dataclasses.replace(base, **{k: v for k, v in (("sink", a.sink), ("window", a.window)) if v is not None})
    model = load_model(a.checkpoint, memory)
    out = export_folder(model, a.out, source=a.checkpoint)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
