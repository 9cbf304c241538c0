"""Checkpoint readers: files on disk -> (Hugging Face config dict, {HF tensor name: NumPy array})."""

from eijax.checkpoint.gguf_file import (SUPPORTED_ARCHITECTURES, hf_tensor_name, read_gguf,
                                        read_gguf_metadata)
from eijax.checkpoint.hf_folder import read_hf_folder, read_safetensors_file
from eijax.checkpoint.registry import KNOWN_MODELS, read_checkpoint, resolve_model

__all__ = [
    "KNOWN_MODELS",
    "SUPPORTED_ARCHITECTURES",
    "hf_tensor_name",
    "read_checkpoint",
    "read_gguf",
    "read_gguf_metadata",
    "read_hf_folder",
    "read_safetensors_file",
    "resolve_model",
]
