"""Long-context evaluation harness: EdgeInfinite vs full attention vs sink+window.

    python -m eijax.eval --model smollm2 --tasks passkey,multikey --lengths 1024,2048,4096 \
        --depths 0.1,0.5,0.9 --samples 2 --out runs/eval_smollm2
    python -m eijax.eval --model smollm2 --tasks none --longbench data/qasper.jsonl --ppl-file book.txt

Writes to --out: rows.jsonl (one row per example and method, appended as each is scored),
table.md and table.csv (task x length x method; table.md also splits the memory method's accuracy by
whether the needle sat in the first window written to memory or a later one), accuracy_vs_length.png, passkey_heatmap.png,
perplexity.png, and args.json. An interrupted run continues with the same arguments plus --resume.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from eijax import cli
from eijax.eval import report
from eijax.eval.tasks import longbench_examples, perplexity_rows, run_examples, synthetic_examples
from eijax.generate import DEFAULT_MODEL, METHODS, add_geometry_args, base_model_source, inference_memory, load_model


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _depths(text: str) -> list[float | None]:
    return [None if x == "random" else float(x) for x in text.split(",") if x]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m eijax.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help=f"registered name, HF folder or .gguf file (default: the --checkpoint run's "
                                   f"base model, else {DEFAULT_MODEL})")
    p.add_argument("--tokenizer", help="tokenizer name/path (default: --model)")
    p.add_argument("--checkpoint", help="eijax training run (trained gate; must be for --model's architecture)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    add_geometry_args(p)
    p.add_argument("--max-context", type=int, help="cap for `full` (default: the model's max_position)")
    p.add_argument("--tasks", default="passkey,multikey", help="synthetic tasks (comma list, or 'none')")
    p.add_argument("--lengths", default="1024,2048,4096", help="context lengths in tokens (also LongBench buckets)")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths in [0,1], or 'random'")
    p.add_argument("--samples", type=int, default=2, help="examples per (task, length, depth)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--question-position", default="last", choices=("last", "both"),
                   help="synthetic tasks: the question after the document only (S-SFT's default), or also before it")
    p.add_argument("--longbench", nargs="*", default=[], help="LongBench-format JSONL files")
    p.add_argument("--longbench-metric", default="auto", choices=("auto", "qa_f1", "rouge_l"))
    p.add_argument("--longbench-samples", type=int, default=20)
    p.add_argument("--longbench-max-new-tokens", type=int, default=64)
    p.add_argument("--ppl-file", help="a long text file for per-segment perplexity")
    p.add_argument("--ppl-tokens", type=int, default=4096, help="score the first N tokens of --ppl-file")
    p.add_argument("--chunks", default="", help="prefill chunk sizes, e.g. 256,64,16 (default: eijax.generate's)")
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows an interrupted run (same arguments) wrote to --out; run only the rest")
    return p.parse_args(argv)


def _run_args(a: argparse.Namespace) -> dict:
    """The arguments that decide the rows (not where they go, nor whether to resume)."""
    return {k: v for k, v in sorted(vars(a).items()) if k not in ("out", "resume")}


def _rows_to_resume(out: Path, a: argparse.Namespace) -> list[dict]:
    """The example rows an earlier run with the same arguments wrote to `out` (a line cut off by the
    interruption is dropped; perplexity, one pass per method, is computed again)."""
    if not (out / "rows.jsonl").is_file():
        return []
    try:
        before = json.loads((out / "args.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise cli.InputError(f"--resume: {out} has rows but no readable args.json; use another --out") from None
    now = json.loads(json.dumps(_run_args(a)))  # as stored: tuples become lists
    # an option added since `out` was written ran at its default there
    defaults = json.loads(json.dumps(_run_args(parse_args([]))))
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k, defaults.get(k)) != now.get(k))
    if changed:
        raise cli.InputError(f"--resume: {out} was written with other arguments "
                             f"({', '.join('--' + k.replace('_', '-') for k in changed)}); use another --out")
    rows = []
    for line in (out / "rows.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("id"):
            rows.append(row)
    return rows


@cli.main_guard
def main(argv: Sequence[str] | None = None) -> dict:
    a = parse_args(argv)
    from eijax.tokenizer import load_tokenizer

    methods = [m for m in a.methods.split(",") if m]
    bad = set(methods) - set(METHODS)
    if bad:
        raise cli.InputError(f"--methods: unknown {', '.join(sorted(bad))}; choose from {', '.join(METHODS)}")
    for path in a.longbench:
        cli.existing_file(path, "--longbench")
    if a.ppl_file:
        cli.existing_file(a.ppl_file, "--ppl-file")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    kept = _rows_to_resume(out, a) if a.resume else []
    t_start = time.perf_counter()
    source = base_model_source(a.model, a.checkpoint)
    tokenizer = load_tokenizer(a.tokenizer or source)
    memory = inference_memory(a.sink, a.window, a.checkpoint)
    model = load_model(source, memory, a.checkpoint)
    lengths = _ints(a.lengths)
    examples = []
    for task in [t for t in a.tasks.split(",") if t and t != "none"]:
        examples += synthetic_examples(tokenizer, task, lengths, _depths(a.depths), a.samples, a.seed, a.max_new_tokens,
                                        a.question_position)
    for path in a.longbench:
        examples += longbench_examples(tokenizer, path, lengths, a.longbench_samples, a.longbench_max_new_tokens,
                                       a.longbench_metric)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    log(f"{len(examples)} examples x {len(methods)} methods; sink={memory.sink} window={memory.window}")
    chunks = _ints(a.chunks) or None
    (out / "args.json").write_text(json.dumps(_run_args(a), indent=1), encoding="utf-8")
    with (out / "rows.jsonl").open("w", encoding="utf-8") as f:
        def write(row: dict) -> None:  # as each row is scored: an interruption loses at most one example
            f.write(json.dumps(row) + "\n")
            f.flush()

        for r in kept:
            write(r)
        if kept:
            log(f"resuming: {len(kept)} rows kept from {out / 'rows.jsonl'}")
        done = {(r["method"], r["id"]) for r in kept}
        rows = kept + run_examples(model, tokenizer, examples, methods, max_context=a.max_context, chunk_sizes=chunks,
                                   log=log, done=done, on_row=write)
        if a.ppl_file:
            text = Path(a.ppl_file).read_text(encoding="utf-8")
            tokens = tokenizer.encode(text, add_special_tokens=False)[: a.ppl_tokens]
            for r in perplexity_rows(model, tokens, methods, max_context=a.max_context, log=log):
                write(r)
                rows.append(r)
    table = report.markdown_table(rows)
    by_write = report.by_write_table(rows, memory.sink, memory.window)
    if by_write:  # where the memory's misses are: a needle in the first write vs later ones
        table += "\n" + by_write
    digits = report.digit_table(rows)
    if digits:  # multikey: do wrong answers blend the needles' values, or carry none of them?
        table += "\n" + digits
    (out / "table.md").write_text(table, encoding="utf-8")
    report.write_csv(report.aggregate(rows), out / "table.csv")
    plots = {name: fn(rows, out / name) for name, fn in [("accuracy_vs_length.png", report.plot_accuracy_vs_length),
                                                         ("passkey_heatmap.png", report.plot_depth_heatmap),
                                                         ("perplexity.png", report.plot_perplexity)]}
    wall = time.perf_counter() - t_start
    print(table)
    print(f"wall time {wall:.0f}s; wrote {out}/rows.jsonl, table.md, table.csv, "
          + ", ".join(n for n, ok in plots.items() if ok))
    return {"rows": rows, "table": table, "plots": [n for n, ok in plots.items() if ok], "wall_s": wall}


if __name__ == "__main__":
    main()
