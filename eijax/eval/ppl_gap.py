"""Where the memory's beyond-window loss gap lies: per-token loss of full attention, sink + window
and the memory on one long text, split by what the predicted token continues.

Every token predicted after the first sink + window (the tokens `eijax.eval`'s beyond-window
perplexity averages) falls in one of three groups, by the bigram (current token, next token):

    in cache         the bigram occurred earlier where the cache still holds it (sink or this window):
                     sink + window can copy it as full attention does
    left the window  the bigram occurred earlier, but only in windows already folded into memory:
                     full attention can copy it, sink + window cannot; the memory has to
    new              no earlier occurrence: nothing to copy, only the gist of the past helps

Per group: how many tokens, the mean loss (nats) of each method, the group's share of the total
sink + window -> full attention gap, and the share of that gap the memory closes.

    python -m eijax.eval.ppl_gap --checkpoint smollm2-memory \
        --file eijax/data/assets/northanger_abbey.txt --tokens 4096 --windows 320,384,512,768

`--windows` also scores sink + window with wider windows on the same predictions, and says which
window the memory is worth: the exact cache that gives the memory's perplexity, to set beside what
the memory's state costs (M and z of every KV head: the keys and values of (d + 1) / 2 cached
tokens per layer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from eijax import cli

GROUPS = ("in cache", "left the window", "new")
METHODS = ("full", "streaming", "edgeinfinite")


def window_start(position: int, sink: int, window: int) -> int:
    """First non-sink position the cache holds while `position` is processed (every earlier
    position is visible until the first compress; then windows of `window` tokens after the sink)."""
    if position < sink + window:
        return sink
    return sink + window * ((position - sink) // window)


def token_groups(tokens: Sequence[int], sink: int, window: int) -> np.ndarray:
    """Group (index into GROUPS) of each prediction i = 0 .. len-2 (position i predicting
    tokens[i + 1]), by where the bigram (tokens[i], tokens[i + 1]) last occurred: an earlier
    occurrence (j, j + 1) with j + 1 <= i is visible when j + 1 is in the sink or in i's window."""
    first_seen: dict[tuple[int, int], int] = {}  # bigram -> position of its first second token
    last_seen: dict[tuple[int, int], int] = {}   # bigram -> position of its latest second token
    groups = np.empty(len(tokens) - 1, np.int8)
    for i in range(len(tokens) - 1):
        bigram = (int(tokens[i]), int(tokens[i + 1]))
        if bigram not in last_seen:
            groups[i] = 2
        elif last_seen[bigram] >= window_start(i, sink, window) or first_seen[bigram] < sink:
            groups[i] = 0
        else:
            groups[i] = 1
        # this occurrence's second token (position i + 1) is context from prediction i + 1 on
        first_seen.setdefault(bigram, i + 1)
        last_seen[bigram] = i + 1
    return groups


def gap_table(nll: dict[str, np.ndarray], groups: np.ndarray, first: int) -> list[dict]:
    """One row per group (and 'all') over predictions first.. : n, mean loss per method, the group's
    share of the summed full -> streaming gap, and the fraction of its own gap edgeinfinite closes."""
    n_pred = min(len(groups), *(len(v) for v in nll.values()))
    nll = {m: np.asarray(v[:n_pred], np.float64) for m, v in nll.items()}  # small gaps: sums must not round
    groups = groups[:n_pred]
    sel = np.arange(n_pred) >= first
    total_gap = float(np.sum((nll["streaming"] - nll["full"])[sel]))
    rows = []
    for name, mask in [(g, sel & (groups == k)) for k, g in enumerate(GROUPS)] + [("all", sel)]:
        n = int(mask.sum())
        mean = {m: float(nll[m][mask].mean()) if n else float("nan") for m in METHODS}
        gap = mean["streaming"] - mean["full"]
        rows.append(dict(group=name, n=n, share=n / int(sel.sum()), **{f"nll_{m}": mean[m] for m in METHODS},
                         gap_share=n * gap / total_gap if total_gap else float("nan"),
                         closed=(mean["streaming"] - mean["edgeinfinite"]) / gap if gap else float("nan")))
    return rows


def window_curve(model, tokens: Sequence[int], windows: Sequence[int], first: int) -> list[dict]:
    """Sink + window (no memory) at each window, mean loss over predictions first.. (the same ones
    whatever the window): [{window, nll, ppl}]."""
    from dataclasses import replace

    from eijax.generate import Generator
    from eijax.model import with_memory_config

    rows = []
    for w in windows:
        wide = with_memory_config(model, replace(model.memory_config, window=w))
        nll = np.asarray(Generator(wide, "streaming").score(tokens), np.float64)[first:]
        rows.append(dict(window=w, nll=float(nll.mean()), ppl=float(np.exp(nll.mean()))))
    return rows


def window_worth(curve: list[dict], nll: float) -> float | None:
    """The window whose sink + window loss equals `nll`, linear between measured windows; None outside."""
    pts = sorted((r["window"], r["nll"]) for r in curve)
    for (w0, l0), (w1, l1) in zip(pts, pts[1:]):
        if min(l0, l1) <= nll <= max(l0, l1) and l0 != l1:
            return w0 + (w1 - w0) * (l0 - nll) / (l0 - l1)
    return None


def markdown(rows: list[dict]) -> str:
    lines = ["| next token | n | share of tokens | full attention | sink + window | memory | share of the gap | "
             "gap closed by memory |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['group']} | {r['n']} | {r['share']:.2f} | {r['nll_full']:.3f} | {r['nll_streaming']:.3f} | "
                     f"{r['nll_edgeinfinite']:.3f} | {r['gap_share']:.2f} | {r['closed']:.2f} |")
    return "\n".join(lines) + "\n\nloss in nats per token (perplexity of 'all': " + ", ".join(
        f"{name} {np.exp(rows[-1][f'nll_{m}']):.1f}" for m, name in
        zip(METHODS, ("full attention", "sink + window", "memory"))) + ")\n"


@cli.main_guard
def main(argv: Sequence[str] | None = None) -> list[dict]:
    from eijax.generate import add_model_args, load_for_cli

    p = cli.ArgumentParser(prog="python -m eijax.eval.ppl_gap", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--file", required=True, help="a long UTF-8 text (not one the memory was trained on)")
    p.add_argument("--tokens", type=int, default=4096, help="score its first N tokens (full attention: up to "
                                                            "the model's context)")
    p.add_argument("--windows", default="", help="comma-separated wider windows: also score sink + window "
                                                 "with each on the same predictions (e.g. 320,384,512,768)")
    p.add_argument("--out", help="also write the rows as JSON here")
    a = p.parse_args(argv)
    try:
        windows = [int(x) for x in a.windows.split(",") if x]
    except ValueError:
        raise cli.InputError(f"--windows {a.windows!r}: expected comma-separated token counts, e.g. 384,512") from None
    if any(w < 1 for w in windows):
        raise cli.InputError(f"--windows {a.windows!r}: every window must be at least 1 token")
    path = cli.existing_file(a.file, "--file")
    if a.tokens < 2:
        raise cli.InputError(f"--tokens {a.tokens}: need at least 2")
    from eijax.generate import Generator

    model, tok = load_for_cli(a)
    mem = model.memory_config
    tokens = tok.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)[: a.tokens]
    tokens = tokens[: model.config.max_position]  # one token stream for all three methods
    if len(tokens) <= mem.cache_size:
        raise cli.InputError(f"--file {a.file}: {len(tokens)} tokens do not reach beyond sink + window "
                             f"({mem.cache_size})")
    nll = {m: Generator(model, m).score(tokens) for m in METHODS}
    rows = gap_table(nll, token_groups(tokens, mem.sink, mem.window), mem.cache_size - 1)
    print(f"{len(tokens)} tokens of {path.name}; sink {mem.sink} + window {mem.window}; "
          f"{rows[-1]['n']} predictions beyond the first sink + window")
    print(markdown(rows))
    if windows:
        first = mem.cache_size - 1
        curve = window_curve(model, tokens, [mem.window, *windows], first)
        worth = window_worth(curve, rows[-1]["nll_edgeinfinite"])
        print("| window (sink + window, no memory) | perplexity |\n|---|---|\n" + "\n".join(
            f"| {r['window']} | {r['ppl']:.2f} |" for r in curve))
        d, hkv, n_layers = model.config.head_dim, model.config.n_kv_heads, model.config.n_layers
        print(f"\nthe memory's perplexity {np.exp(rows[-1]['nll_edgeinfinite']):.2f} is sink + window at window "
              + (f"{worth:.0f}" if worth is not None else "outside the measured windows")
              + f"; its state per layer ({hkv} x ({d} x {d} + {d}) floats) is what {(d + 1) / 2:g} cached tokens hold "
              f"({hkv} x 2 x {d})")
        rows.append(dict(group="windows", curve=curve, memory_worth_window=worth, n_layers=n_layers))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
