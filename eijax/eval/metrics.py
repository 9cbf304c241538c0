"""Answer metrics: QA-F1 as in LongBench, ROUGE-L F1 with an iterative (bit-parallel) LCS.

QA-F1 (LongBench `qa_f1_score`, itself SQuAD's): lower-case, drop punctuation and the articles
a/an/the, split on whitespace, then the F1 of the bag-of-tokens overlap. Max over references.
ROUGE-L (Lin 2004, F-measure with beta = 1, the rouge-score `rougeL` convention): lower-case,
non-alphanumerics become spaces, split on whitespace; P = LCS/|prediction|, R = LCS/|reference|.
The LCS length uses the Allison-Dix / Hyyro bit-vector recurrence on Python integers: no
recursion and O(|a|*|b|/64) word operations, so long summaries score quickly.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Hashable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    common = Counter(prediction) & Counter(reference)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, references: str | Sequence[str]) -> float:
    """LongBench QA-F1 of a prediction against one reference or the best of several."""
    refs = [references] if isinstance(references, str) else list(references)
    pred = normalize_answer(prediction).split()
    return max((token_f1(pred, normalize_answer(r).split()) for r in refs), default=0.0)


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence, iteratively (bit-parallel over a)."""
    if not a or not b:
        return 0
    masks: dict[Hashable, int] = {}
    for i, sym in enumerate(a):
        masks[sym] = masks.get(sym, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full  # zero bits of v count the LCS so far
    for sym in b:
        u = v & masks.get(sym, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_tokens(text: str) -> list[str]:
    return _NON_ALNUM.sub(" ", text.lower()).split()


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F1 of a prediction against one reference or the best of several."""
    refs = [references] if isinstance(references, str) else list(references)
    pred = rouge_tokens(prediction)
    best = 0.0
    for ref in refs:
        r = rouge_tokens(ref)
        lcs = lcs_length(pred, r)
        if lcs:
            p, rec = lcs / len(pred), lcs / len(r)
            best = max(best, 2 * p * rec / (p + rec))
    return best


METRICS = {"qa_f1": qa_f1, "rouge_l": rouge_l}

# LongBench's metric per dataset (English sets; others default to QA-F1).
LONGBENCH_METRIC = {
    **{name: "qa_f1" for name in ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa",
                                   "musique", "triviaqa")},
    **{name: "rouge_l" for name in ("gov_report", "qmsum", "multi_news", "samsum", "vcsum")},
}


def metric_for_dataset(name: str) -> str:
    """LongBench's metric for a dataset (or file) name, matched on its stem; QA-F1 otherwise."""
    stem = name.rsplit("/", 1)[-1].split(".")[0].lower()
    stem = stem[:-2] if stem.endswith("_e") else stem  # LongBench-E file names
    return LONGBENCH_METRIC.get(stem, "qa_f1")
