"""eijax: EdgeInfinite-Instruct in JAX/Flax (compressive memory over segments, S-SFT, LiteRT export)."""

from eijax.config import MemoryConfig, ModelConfig, RopeConfig, model_config_from_hf
from eijax.memory import Memory
from eijax.model import (EdgeInfiniteLM, State, jit_forward, jit_prefill, layout_length, pad_to_layout,
                          with_memory_config)
from eijax.pretrained import build_model, load_pretrained, params_from_hf

__all__ = [
    "EdgeInfiniteLM", "Memory", "MemoryConfig", "ModelConfig", "RopeConfig", "State", "build_model",
    "jit_forward", "jit_prefill", "layout_length", "load_pretrained", "model_config_from_hf", "pad_to_layout",
    "params_from_hf", "with_memory_config",
]
