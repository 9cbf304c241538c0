"""Evaluation examples and their runner.

An `Example` is a tokenised (document, question) pair in the S-SFT chat layout plus a scorer on
the decoded answer. Sources: the synthetic tasks of eijax.data.synthetic (passkey, multikey) at
chosen lengths and depths, and LongBench-format JSONL (input, context, answers). Every method
runs through eijax.generate.Generator, so baselines share the code path.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Sequence

import numpy as np

from eijax.cli import InputError
from eijax.eval.metrics import METRICS, metric_for_dataset
from eijax.generate import Generator, SamplingConfig, prompt_parts, stop_ids


@dataclass
class Example:
    task: str
    length: int                  # nominal context length (synthetic) or length bucket (LongBench)
    document: list[int]
    question: list[int]
    score: Callable[[str], float]
    max_new_tokens: int
    depth: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    id: str = ""  # stable across runs of the same arguments: what `--resume` skips


def synthetic_examples(tokenizer, task: str, lengths: Sequence[int], depths: Sequence[float | None],
                       samples: int, seed: int, max_new_tokens: int = 24,
                       question_position: str = "last") -> list[Example]:
    """`samples` examples per (length, depth); index i shares its key and filler across depths."""
    from eijax.data.synthetic import filler_for, make_sample, score_answer

    filler = filler_for(task, tokenizer)
    out = []
    for length in lengths:
        for depth in depths:
            for i in range(samples):
                s = make_sample(task, i, seed=seed, tokenizer=tokenizer, context_tokens=int(length),
                                depth=depth, filler=filler)
                doc, question = prompt_parts(tokenizer, s["instruction"], s["context"], question_position)
                meta = {"target": s["target"], "needle_token": needle_token(tokenizer, doc, s["target"])}
                if "values" in s:  # multikey: every needle's value, for report.digit_table
                    meta["needles"] = list(s["values"])
                out.append(Example(task, int(length), doc, question,
                                   lambda text, s=s: float(score_answer(task, text, s)), max_new_tokens,
                                   depth if depth is not None else s.get("depth"), meta,
                                   f"{task}/{length}/{depth}/{i}"))
    return out


def needle_token(tokenizer, document: Sequence[int], target: str) -> int | None:
    """Index in `document` of the first token of the asked needle's value (None if its tokens do not
    occur as encoded alone): where in the stream, hence in which memory write, the answer sits."""
    doc = list(document)
    for text in (target, " " + target):  # bare first: BPE may fuse the space with the first digit
        ids = tokenizer.encode(text, add_special_tokens=False)
        hit = next((j for j in range(len(doc) - len(ids) + 1) if doc[j:j + len(ids)] == ids), None)
        if hit is not None:
            return hit
    return None


def length_bucket(n_tokens: int, lengths: Sequence[int]) -> int:
    """Smallest listed length >= n_tokens (the largest if none)."""
    return next((b for b in sorted(lengths) if n_tokens <= b), max(lengths))


def longbench_examples(tokenizer, path: str | Path, lengths: Sequence[int], max_samples: int | None,
                       max_new_tokens: int, metric: str = "auto") -> list[Example]:
    """LongBench JSONL (fields input, context, answers); scored with the dataset's metric."""
    path = Path(path)
    metric = metric_for_dataset(path.name) if metric == "auto" else metric
    fn = METRICS[metric]
    task = f"{path.stem}:{metric}"
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: bad JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "input" not in rec or "answers" not in rec:
                raise InputError(f"{path}:{lineno}: a LongBench record needs 'input' and 'answers'")
            doc, question = prompt_parts(tokenizer, rec["input"], rec.get("context", ""))
            answers = rec["answers"] if isinstance(rec["answers"], list) else [rec["answers"]]
            n = len(doc) + len(question)
            out.append(Example(task, length_bucket(n, lengths), doc, question,
                               lambda text, a=answers: fn(text, a), max_new_tokens, None,
                               {"tokens": n, "answers": answers}, f"{path.name}:{lineno}"))
            if max_samples and len(out) >= max_samples:
                break
    return out


def run_examples(model, tokenizer, examples: Iterable[Example], methods: Sequence[str], *,
                 max_context: int | None = None, chunk_sizes: Sequence[int] | None = None,
                 log: Callable[[str], None] = print, done: Collection[tuple[str, str]] = (),
                 on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Generate and score every example with every method; one row per (example, method), each
    passed to `on_row` as soon as it is scored. (method, example id) pairs in `done` are skipped."""
    examples = list(examples)
    stops = stop_ids(tokenizer)
    rows = []
    for method in methods:
        todo = [ex for ex in examples if (method, ex.id) not in done]
        if not todo:
            continue
        kw = {"chunk_sizes": chunk_sizes} if chunk_sizes else {}
        gen = Generator(model, method, max_context=max_context, **kw)
        t0 = time.perf_counter()
        for ex in todo:
            out = gen.generate(ex.document, SamplingConfig(ex.max_new_tokens, stop_ids=stops), question=ex.question)
            text = tokenizer.decode(out.tokens, skip_special_tokens=True)
            rows.append(dict(task=ex.task, length=ex.length, depth=ex.depth, method=method, score=ex.score(text),
                             prompt_tokens=out.prompt_tokens, route=out.route, ttft_s=out.time_to_first_token,
                             seconds=out.seconds, output=text, id=ex.id, **ex.meta))
            if on_row is not None:
                on_row(rows[-1])
            log(f"    {method} {ex.task} len={ex.length} depth={ex.depth}: score {rows[-1]['score']:.2f} "
                f"({out.prompt_tokens} tokens, {out.seconds:.1f}s) {text[:60]!r}")
        log(f"  {method:12s} {len(todo)} examples in {time.perf_counter() - t0:.1f}s")
    return rows


def perplexity_rows(model, tokens: Sequence[int], methods: Sequence[str], *, max_context: int | None = None,
                    log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Per-segment perplexity of one long token stream: segment 0 = the first sink + window tokens,
    then one row per window. `full` covers only the model's context."""
    mem = model.memory_config
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        nll = Generator(model, method, max_context=max_context).score(tokens)
        bounds = [0, mem.cache_size - 1] + list(range(mem.cache_size - 1 + mem.window, len(nll), mem.window))
        bounds = sorted(set(b for b in bounds if b < len(nll))) + [len(nll)]
        for seg, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            rows.append(dict(task="ppl", method=method, segment=seg, start=lo + 1, end=hi + 1,
                             length=hi + 1, score=float(np.exp(nll[lo:hi].mean()))))
        beyond = nll[mem.cache_size - 1:]  # tokens predicted after the first sink + window
        log(f"  {method:12s} perplexity over {len(nll) + 1} tokens in {time.perf_counter() - t0:.1f}s; beyond "
            f"sink + window ({len(beyond)} tokens): {float(np.exp(beyond.mean())) if len(beyond) else float('nan'):.3f}")
    return rows
