"""Tables (Markdown, CSV) and plots (PNG, matplotlib Agg) of evaluation rows."""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def aggregate(rows: Sequence[dict[str, Any]], keys: Sequence[str] = ("task", "length", "method")) -> list[dict[str, Any]]:
    """Mean score (and count, mean seconds) per key tuple, in first-seen order."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(k) for k in keys)].append(r)
    out = []
    for key, group in groups.items():
        secs = [g["seconds"] for g in group if "seconds" in g]
        scores = [g["score"] for g in group]
        out.append({**dict(zip(keys, key)), "score": float(np.mean(scores)), "n": len(group),
                    "binary": all(x in (0, 1) for x in scores), "seconds": float(np.mean(secs)) if secs else None})
    return out


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sound at 0/n and n/n, unlike mean ± 2se)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _cell(a: dict[str, Any]) -> str:
    """Mean score, with its 95% Wilson interval when every score is 0 or 1 (accuracy)."""
    if a.get("binary"):
        lo, hi = wilson_interval(a["score"] * a["n"], a["n"])
        return f"{a['score']:.2f} [{lo:.2f}, {hi:.2f}]"
    return f"{a['score']:.3f}"


def write_index(needle_token: int, sink: int, window: int) -> int | None:
    """Which memory write holds a needle at this prompt position: 0 = the first window folded into
    memory, None = in the sink (never written)."""
    return None if needle_token < sink else (needle_token - sink) // window


def by_write_table(rows: Sequence[dict[str, Any]], sink: int, window: int,
                   methods: Sequence[str] = ("edgeinfinite",)) -> str:
    """Accuracy of the memory methods split by where the needle was written: in the first write
    (the first window folded into memory: an empty one unless the model has a memory prior) or a
    later one. Rows without `needle_token` are skipped."""
    split = []
    for r in rows:
        if r.get("method") in methods and r.get("needle_token") is not None:
            w = write_index(r["needle_token"], sink, window)
            where = "sink" if w is None else "first write" if w == 0 else "later writes"
            split.append({**r, "where": where})
    if not split:
        return ""
    lines = ["| task | length | method | needle in | n | accuracy |", "|---|---|---|---|---|---|"]
    for a in aggregate(split, ("task", "length", "method", "where")):
        lines.append(f"| {a['task']} | {a['length']} | {a['method']} | {a['where']} | {a['n']} | {_cell(a)} |")
    return "\n".join(lines) + "\n"


def answer_digits(output: str) -> str:
    """The number an answer gives: its last run of digits ("" when it has none)."""
    numbers = re.findall(r"\d+", output)
    return numbers[-1] if numbers else ""


def digit_shares(answer: str, target: str, needles: Sequence[str]) -> tuple[float, float]:
    """(share of the target's places where `answer` has the target's digit, share where it has the
    digit some needle has there): a wrong answer made of the needles' digits in place is a blend of
    their values, one made of other digits carries nothing from them."""
    places = range(len(target))
    at = lambda i: answer[i] if i < len(answer) else None
    own = sum(at(i) == target[i] for i in places) / len(target)
    some = sum(any(i < len(n) and at(i) == n[i] for n in needles) for i in places) / len(target)
    return own, some


def digit_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per (task, length, method) of rows that list every needle (multikey): the mean share of answer
    digits equal to the asked needle's at the same place and to any needle's, i.e. how much of the
    needles' values a wrong answer still carries, and whether it is the asked one's."""
    cells: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if r.get("needles") and r.get("target"):
            answer = answer_digits(r.get("output", ""))
            cells[r["task"], r["length"], r["method"]].append(digit_shares(answer, r["target"], r["needles"]))
    if not cells:
        return ""
    lines = ["| task | length | method | n | digits of the asked needle, in place | digits of any needle, in place |",
             "|---|---|---|---|---|---|"]
    for (task, length, method), v in sorted(cells.items()):
        own, some = (sum(x) / len(v) for x in zip(*v))
        lines.append(f"| {task} | {length} | {method} | {len(v)} | {own:.2f} | {some:.2f} |")
    return "\n".join(lines) + "\n"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """task x length rows, one column per method (mean score [95% interval] for accuracies;
    perplexity for task 'ppl')."""
    agg = aggregate([r for r in rows if r["task"] != "ppl"])
    agg += aggregate([r for r in rows if r["task"] == "ppl"], ("task", "length", "method"))
    methods = list(dict.fromkeys(a["method"] for a in agg))
    cells: dict[tuple, dict[str, str]] = defaultdict(dict)
    counts: dict[tuple, int] = {}
    for a in agg:
        cells[(a["task"], a["length"])][a["method"]] = _cell(a)
        counts[(a["task"], a["length"])] = a["n"]
    lines = ["| task | length | n | " + " | ".join(methods) + " |", "|" + "---|" * (3 + len(methods))]
    for (task, length), by_method in cells.items():
        lines.append(f"| {task} | {length} | {counts[(task, length)]} | "
                     + " | ".join(by_method.get(m, "-") for m in methods) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _method_lines(ax, series: dict[str, list[tuple[float, float]]], marker: str, xlabel: str, ylabel: str) -> None:
    """One line per method, labelled axes, grid and legend."""
    for method, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=method)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(plt, fig, path: Path, tight: bool = True) -> bool:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_accuracy_vs_length(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """One panel per task, one line per method. Returns False when there is nothing to plot."""
    agg = aggregate([r for r in rows if r["task"] != "ppl"])
    tasks = list(dict.fromkeys(a["task"] for a in agg))
    if not tasks:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        series = {m: sorted((a["length"], a["score"]) for a in agg if a["task"] == task and a["method"] == m)
                  for m in dict.fromkeys(a["method"] for a in agg if a["task"] == task)}
        _method_lines(ax, series, "o", "input tokens", "score")
        ax.set_xscale("log", base=2)
        ax.set_title(task)
        ax.set_ylim(-0.05, 1.05)
    return _save(plt, fig, path)


def plot_depth_heatmap(rows: Sequence[dict[str, Any]], path: Path, task: str = "passkey") -> bool:
    """Depth x length accuracy, one panel per method."""
    sel = [r for r in rows if r["task"] == task and r.get("depth") is not None]
    if not sel:
        return False
    agg = aggregate(sel, ("method", "depth", "length"))
    methods = list(dict.fromkeys(a["method"] for a in agg))
    depths = sorted({a["depth"] for a in agg})
    lengths = sorted({a["length"] for a in agg})
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 3.2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for a in agg:
            if a["method"] == method:
                grid[depths.index(a["depth"]), lengths.index(a["length"])] = a["score"]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_xlabel("input tokens")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{task}: {method}")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    return _save(plt, fig, path, tight=False)  # tight_layout fights the shared colorbar


def plot_perplexity(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    sel = [r for r in rows if r["task"] == "ppl"]
    if not sel:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    series = {m: [(r["end"], r["score"]) for r in sel if r["method"] == m] for m in dict.fromkeys(r["method"] for r in sel)}
    _method_lines(ax, series, ".", "position (end of segment)", "perplexity")
    return _save(plt, fig, path)
