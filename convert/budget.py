"""On-device memory budget of one scenario (DESIGN §1.4): weights, cache, memory state, activations.

Everything is fixed by the scenario, whatever the input length: the cache holds sink + window
slots and the memory is Hkv·(d·d + d) float32 per layer with memory. Models with local
(sliding-window) layers (Gemma 3) keep memory in their global layers only, and each local layer
also keeps its own history of sliding_window - 1 tokens (counted with the kv cache).
"""

from __future__ import annotations

import dataclasses

from eijax.config import ModelConfig

from convert.scenarios import Scenario

F32 = 4


@dataclasses.dataclass(frozen=True)
class Budget:
    weights: int        # bytes of the .tflite file (or float32 parameters when no file is given)
    kv_cache: int       # k and v, all layers (+ the local layers' history), float32
    memory_state: int   # M and z, the layers with memory, float32 (0 when memory is off)
    activations: int    # largest live intermediate set of one call (attention scores + logits), an estimate

    @property
    def total(self) -> int:
        return self.weights + 2 * (self.kv_cache + self.memory_state) + self.activations


def parameter_count(cfg: ModelConfig, with_gate: bool = True) -> int:
    h, hkv, d, dm = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    attn = dm * (h + 2 * hkv) * d + h * d * dm
    layer = attn + 3 * dm * cfg.d_ff + (4 if cfg.gemma else 2) * dm + (2 * d if cfg.qk_norm else 0)
    gate = 2 * h * d * h + h if with_gate else 0
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * dm
    return cfg.vocab_size * dm + cfg.n_layers * (layer + gate) + dm + head


def budget(cfg: ModelConfig, scenario: Scenario, weight_bytes: int | None = None) -> Budget:
    b, c, nl = scenario.decode_batch, scenario.cache_size, cfg.n_layers
    hkv, d, h = cfg.n_kv_heads, cfg.head_dim, cfg.n_heads
    n_local, hn = sum(cfg.local_layers), cfg.local_history
    kv = 2 * (nl * c + n_local * hn) * b * hkv * d * F32
    mem = (nl - n_local) * b * hkv * (d * d + d) * F32 if scenario.memory else 0
    t = max(scenario.chunks or (1,))
    # attention probabilities [B, H, T, keys] twice (scores, probs), the MLP hidden, the logits row
    act = (2 * b * h * t * (c + hn) + 2 * b * t * cfg.d_ff + 4 * b * t * cfg.d_model + b * cfg.vocab_size) * F32
    weights = weight_bytes if weight_bytes is not None else parameter_count(cfg) * F32
    return Budget(weights=weights, kv_cache=kv, memory_state=mem, activations=act)
