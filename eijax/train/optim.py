"""Gate-only optimizer: the trainable subset gets its own AdamW (no weight decay by default),
warmup + cosine schedule, global-norm clipping and gradient accumulation (optax.MultiSteps).

Frozen parameters are split off before the optimizer is built, so they have no optimizer state.
"""

from __future__ import annotations

from typing import Any, Sequence

import optax
from flax import nnx

from eijax.layers import MEMORY_PATH
from eijax.train.config_schema import OptimSection
from eijax.trained import param_filter




def split_trainable(model: nnx.Module, patterns: Sequence[str]) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable state, frozen state)."""
    graphdef, trainable, frozen = nnx.split(model, param_filter(patterns), ...)  # whole path elements ("gate")
    if not nnx.to_flat_state(trainable):
        raise ValueError(f"optim.trainable={list(patterns)} matches no parameter; gate params live under "
                         "'blocks.gate' (see eijax/layers.py)")
    return graphdef, trainable, frozen


def memory_path_only(trainable: nnx.State) -> bool:
    """True when every trainable parameter belongs to the memory path: the local path is frozen."""
    return all(any(str(k) in MEMORY_PATH for k in path) for path, _ in nnx.to_flat_state(trainable))


def learning_rate_schedule(cfg: OptimSection, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.end_lr_ratio)


def make_optimizer(cfg: OptimSection, total_steps: int) -> optax.GradientTransformation:
    """`total_steps` counts optimizer updates; with grad_accum=k the step function is called k times each."""
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                             weight_decay=cfg.weight_decay))
    tx = optax.chain(*parts)
    return optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum) if cfg.grad_accum > 1 else tx


def count_params(tree: Any) -> int:
    import jax
    return sum(int(x.size) for x in jax.tree.leaves(tree))
