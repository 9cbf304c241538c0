"""Held-out evaluation: greedy-decode accuracy on synthetic passkey / multi-key needle tasks at
given context lengths, through eijax.generate (the deployment path: constant-memory streaming
with the question-last layout used in training)."""

from __future__ import annotations

import time
from typing import Any, Sequence

from eijax.data.records import as_record, render_parts
from eijax.data.synthetic import SyntheticSource, score_answer
from eijax.generate import Generator, SamplingConfig, stop_ids


def eval_samples(tasks: Sequence[str], lengths: Sequence[int], examples: int, seed: int,
                 tokenizer: Any) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Samples per (task, context length); the seed keeps them apart from the training stream."""
    return {(t, n): [s for s in SyntheticSource(t, num_samples=examples, seed=seed, tokenizer=tokenizer,
                                                 context_tokens=n)]
            for t in tasks for n in lengths}


class Evaluator:
    """Built once (engines compile once); call after updating the model's params."""

    def __init__(self, model, tokenizer, samples: dict[tuple[str, int], list[dict[str, Any]]],
                 max_new_tokens: int, question_position: str = "last"):
        self.model, self.tokenizer, self.samples = model, tokenizer, samples
        # a memory-off run is scored as it was trained: sink + window ("edgeinfinite" forces memory on)
        self.generator = Generator(model, "edgeinfinite" if model.memory_config.enabled else "streaming")
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, stop_ids=stop_ids(tokenizer))
        self.parts = {key: [render_parts(as_record(s), tokenizer, question_position) for s in group]
                      for key, group in samples.items()}

    def __call__(self, log=print) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Returns ({"acc/<task>/<len>": accuracy, ...}, per-example rows)."""
        self.generator.refresh_params()  # engines hold the params they were built with
        metrics: dict[str, float] = {}
        rows = []
        t0 = time.perf_counter()
        for (task, length), group in self.samples.items():
            correct = 0
            for sample, parts in zip(group, self.parts[(task, length)]):
                out = self.generator.generate(parts.ctx, self.sampling, question=parts.query)
                text = self.tokenizer.decode(out.tokens, skip_special_tokens=True)
                ok = score_answer(task, text, sample)
                correct += ok
                rows.append(dict(task=task, length=length, prompt_tokens=out.prompt_tokens, depth=sample.get("depth"),
                                 target=sample["target"], output=text, correct=bool(ok)))
            metrics[f"acc/{task}/{length}"] = correct / max(len(group), 1)
            log(f"  eval {task:8s} {length:6d} tokens: {correct}/{len(group)} correct")
        metrics["eval_seconds"] = time.perf_counter() - t0
        return metrics, rows


def compare_source(source: str, base_checkpoint: str, memory, tokenizer, samples, max_new_tokens: int,
                   question_position: str, log=print) -> dict[str, float] | None:
    """Scores the trained memory path `source` (e.g. the shipped "smollm2-memory") on the run's own
    eval samples, with the run's sink and window; None (and a log line) when it was trained on
    another base model than this run's."""
    from eijax.trained import load_trained, trained_base

    trained_on = trained_base(source)
    if trained_on != base_checkpoint:
        log(f"  eval.compare={source!r} was trained on {trained_on!r}, this run on "
            f"{base_checkpoint!r}: not compared")
        return None
    log(f"evaluating {source} (eval.compare) on the same samples:")
    model = load_trained(source, memory)
    metrics, _ = Evaluator(model, tokenizer, samples, max_new_tokens, question_position)(log)
    return metrics
