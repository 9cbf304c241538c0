"""A short Markdown report of a run: what ran, how fast, and accuracy before/after."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def _acc_table(summary: dict[str, Any], compare: str) -> list[str]:
    columns = [("before", summary.get("eval_before", {})), ("after", summary.get("eval_after", {}))]
    if "eval_compare" in summary:
        columns.append((f"`{compare}`", summary["eval_compare"]))
    keys = sorted({k for _, d in columns for k in d if k.startswith("acc/")},
                  key=lambda k: (k.split("/")[1], int(k.split("/")[2])))
    if not keys:
        return []
    lines = ["| task | context tokens | " + " | ".join(name for name, _ in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    fmt = lambda d, k: f"{d[k]:.2f}" if k in d else "-"
    for k in keys:
        _, task, length = k.split("/")
        lines.append(f"| {task} | {length} | " + " | ".join(fmt(d, k) for _, d in columns) + " |")
    return lines


def write_report(path: Path, config, summary: dict[str, Any]) -> None:
    losses = summary.get("losses", [])
    head = losses[: max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10):]
    lines = [
        f"# S-SFT run `{config.run.name}`", "",
        f"Command: `python train.py {' '.join(sys.argv[1:])}`".rstrip(), "",
        f"- model: {config.model_name} ({config.model.checkpoint or 'random init'}), "
        f"training {summary.get('trainable_params', 0):,} of {summary.get('total_params', 0):,} params "
        f"({', '.join(config.optim.trainable)})",
        f"- memory: sink {config.memory.sink}, window {config.memory.window}, rule {config.memory.rule}, "
        f"gate {config.memory.gate}; data: {config.data.source} {config.data.tasks} at {config.data.context_lengths} "
        f"context tokens, batch {config.data.batch_size} x grad_accum {config.optim.grad_accum}",
        f"- optimizer: lr {config.optim.learning_rate} (warmup {config.optim.warmup_steps}, cosine), "
        f"clip {config.optim.clip_norm}, weight decay {config.optim.weight_decay}",
        f"- steps: {summary.get('steps')}{' (preempted)' if summary.get('preempted') else ''}; "
        f"wall time {summary.get('wall_seconds', 0):.0f} s (training {summary.get('train_seconds', 0):.0f} s); "
        f"{summary.get('tokens_per_s', 0):.0f} tokens/s",
    ]
    if summary.get("peak_flops"):
        mfu = summary.get("tokens_per_s", 0) * summary.get("flops_per_token", 0) / summary["peak_flops"]
        lines.append(f"- model-FLOPs utilisation {100 * mfu:.1f}% of the measured matmul peak "
                     f"({summary['peak_flops'] / 1e12:.3f} TFLOP/s)")
    if losses:
        lines.append(f"- loss: first {len(head)} steps mean {sum(head) / len(head):.4f}, "
                     f"last {len(tail)} steps mean {sum(tail) / len(tail):.4f}")
    for tag in ("eval_before", "eval_after"):
        if tag in summary:
            lines.append(f"- {tag.replace('_', ' ')} took {summary[tag].get('eval_seconds', 0):.0f} s")
    table = _acc_table(summary, config.eval.compare)
    if table:
        lines += ["", "Greedy-decode accuracy on held-out synthetic samples "
                      f"({config.eval.examples} per task and length; the question starts a fresh window, so the "
                      "answer is only reachable through the memory):", "", *table]
        if "eval_compare" in summary:
            lines += ["", f"`{config.eval.compare}` is the memory path that ships with eijax, scored on the same "
                          "samples with this run's sink and window."]
    Path(path).write_text("\n".join(lines) + "\n")
