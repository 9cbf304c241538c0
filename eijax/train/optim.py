"""Gate-only optimizer: the trainable subset gets its own AdamW (no weight decay by default),
warmup + cosine schedule, global-norm clipping and gradient accumulation (optax.MultiSteps).

Frozen parameters are split off before the optimizer is built, so they have no optimizer state.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
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


def _names(path) -> set[str]:
    return {str(getattr(k, "key", getattr(k, "name", k))) for k in path}


def scale_by_module(scales: dict[str, float]) -> optax.GradientTransformation:
    """Multiply the updates of params whose path holds a module name of `scales` by its factor
    (optim.lr_scale; `check_lr_scale` says whether each name matches a trainable param)."""

    def update(updates, state, params=None):
        factor = lambda path: next((f for name, f in scales.items() if name in _names(path)), 1.0)
        return jax.tree_util.tree_map_with_path(lambda p, u: u * factor(p), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def check_lr_scale(cfg: OptimSection, trainable: Any) -> None:
    """A module of optim.lr_scale that no trainable parameter lies under is an error."""
    found = set().union(*(_names(path) for path, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]))
    missing = sorted({str(name) for name, _ in cfg.lr_scale} - found)
    if missing:
        raise ValueError(f"optim.lr_scale names {missing}, which no trainable parameter lies under "
                         f"(optim.trainable={list(cfg.trainable)})")


def make_optimizer(cfg: OptimSection, total_steps: int) -> optax.GradientTransformation:
    """`total_steps` counts optimizer updates; with grad_accum=k the step function is called k times each."""
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                             weight_decay=cfg.weight_decay))
    if cfg.lr_scale:
        parts.append(scale_by_module({str(name): float(f) for name, f in cfg.lr_scale}))
    tx = optax.chain(*parts)
    return optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum) if cfg.grad_accum > 1 else tx


def count_params(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
