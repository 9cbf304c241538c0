"""Progress bar, JSONL log and TensorBoard events (process 0 writes; the others stay quiet)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np


class MetricsWriter:
    """`write(step, {name: number})` -> one JSON line and one TensorBoard scalar per name."""

    def __init__(self, output_dir: str | Path, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = self._tb = None
        if self.enabled:
            out = Path(output_dir)
            out.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(out / "metrics.jsonl", "a", buffering=1)
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # TensorBoard is optional; the JSONL log is the record
                self._tb = None

    def write(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: float(np.asarray(v)) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"kind": kind, "step": int(step), "time": time.time(), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """tqdm bar over optimizer steps showing loss, tokens/s and (tqdm's) ETA."""

    def __init__(self, total: int, initial: int = 0, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._bar = None
        if self.enabled:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, n: int, loss: float, tokens_per_s: float, lr: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}", lr=f"{lr:.2e}", refresh=False)
            self._bar.update(n)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        elif self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def gate_stats(trainable: dict) -> dict[str, float]:
    """Per-layer gate at zero input, sigmoid(bias) (or sigmoid(beta); the joint gate's weight where the
    memory's mass equals the window's), averaged over heads, and the kernel's norm: where each layer's
    gate sits and how much it reacts to its inputs."""
    gate = trainable.get("blocks", {}).get("gate", {})
    out: dict[str, float] = {}
    prior = gate.get("bias", gate.get("beta"))
    if prior is not None:
        g = 1 / (1 + np.exp(-np.asarray(jax.device_get(prior), np.float64)))
        for i, v in enumerate(g.mean(axis=-1)):
            out[f"gate_mean/layer_{i:02d}"] = float(v)
        out["gate_mean/all"] = float(g.mean())
    if "kernel" in gate:
        k = np.asarray(jax.device_get(gate["kernel"]), np.float64)
        out["gate_kernel_norm"] = float(np.sqrt((k ** 2).sum()))
    write_gate = trainable.get("blocks", {}).get("write_gate", {})
    if write_gate:  # β at zero input (its level, which the normalised read cancels) and how much β reacts to k, v
        b = np.asarray(jax.device_get(write_gate["b"]), np.float64)
        out["write_strength_at_zero/all"] = float((2 / (1 + np.exp(-b))).mean())
        out["write_gate_w_norm"] = float(np.sqrt((np.asarray(jax.device_get(write_gate["w"]), np.float64) ** 2).sum()))
    decay = trainable.get("blocks", {}).get("memory_decay", {})
    if decay:  # the retention per fold of the learned heads (kept ones are 1): its range, and the mean
        g = 1 / (1 + np.exp(-np.asarray(jax.device_get(decay["logit"]), np.float64)))
        out.update({"retain/min": float(g.min()), "retain/mean": float(g.mean()), "retain/max": float(g.max())})
    return out
