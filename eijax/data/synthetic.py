"""Synthetic long-context tasks for training and evaluation.

Tasks (`TASKS`):
  "passkey"  -- passkey retrieval as in Landmark Attention (Mohtashami & Jaggi, 2023):
                "The pass key is 71432. Remember it. 71432 is the pass key." hidden at
                a controllable depth in filler; the preamble and the question say that the
                pass key is a 5-digit number (PASSKEY_QUESTION).
  "multikey" -- multi-key needle QA (RULER-style): several needles "The special magic
                number for <key> is <7-digit number>." at random depths; the question
                asks for one key's number.
  "digitkey" -- the smallest recall task, for tiny models trained from scratch (CI's check that
                retrieval through the memory works): the fixed preamble DIGITKEY_PREAMBLE (so a
                small sink holds no needle), filler of random lowercase words, one needle "The key is
                D." (D a digit) at a random depth, question "What is the key?", answer "The key
                is D.". Digits are balanced: each block of 10 consecutive indices holds every
                digit once (in a random order), so a model that answers the same digit whatever the
                needle scores exactly chance (0.1) on 10n samples. It does not use the book.

Filler (passkey, multikey) is real English prose: Jane Austen's *Persuasion* (public domain; see
assets/README.md), split into 3,561 sentences (103k SmolLM2 tokens; mean 29, max 271
tokens a sentence). A sample's haystack is a run of consecutive sentences starting
at a random sentence, wrapping around the book (contexts longer than the book
repeat it).

Length: `context_tokens` is the target length, in tokens of the given tokenizer, of
the context text (preamble + haystack + needles). Whole sentences (words, for digitkey) are
added while they fit, so the context is at most `context_tokens` and usually within one sentence
of it (per-sentence counts are summed, so boundary merges can shift it by a few
tokens). Depth: the fraction of haystack tokens before a needle, 0 = start, 1 = end;
needles sit between sentences (words), at the boundary nearest the requested depth. `None`
draws the depth uniformly per sample. The actual depth is stored in the sample.

Seeds: sample i of seed s uses `np.random.default_rng((s, task_salt, i))`, so the same
(seed, index) always gives the same sample and every (seed, index) its own stream.

A sample is a dict: task, context, instruction, answer (the reference answer, used as
the S-SFT target), target (the passkey / number / digit as a string), and task metadata.
`score_answer(task, generated_text, sample)` says whether a generation is correct.

Each task's filler (the book's sentences or the word list, with per-tokenizer token counts)
is built once per tokenizer by `filler_for(task, tokenizer)`; samplers take it as `filler=`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ASSET = Path(__file__).parent / "assets" / "persuasion.txt"
TASKS = ("passkey", "multikey", "digitkey")
_TASK_SALT = {"passkey": 0x5A55, "multikey": 0x3D11, "digitkey": 0x71D6}

# The wording says what the pass key is (a 5-digit number): with the bare "What is the pass key?"
# SmolLM2 read "pass key" as an object half of the time ("The pass key is a small, silver-tipped
# key ..."), which made full attention's ceiling look like 0.5 at 512 tokens.
PASSKEY_PREAMBLE = ("There is a pass key, a 5-digit number, hidden inside a lot of irrelevant text. "
                    "Find it and memorize it. I will quiz you about the pass key.")
PASSKEY_QUESTION = "What is the 5-digit pass key number hidden in the text? Answer with the number."
MULTIKEY_PREAMBLE = ("Some special magic numbers are hidden within the following text. "
                     "Make sure to memorize it. I will quiz you about the numbers afterwards.")
# 31 bytes: with the byte tokenizer and its chat header, a sink of up to 32 slots never reaches the
# needle's digit, and preamble + needle + question + answer still fit in a 32 + 64 cache (the
# within-window control of tests/test_memory_learns.py).
DIGITKEY_PREAMBLE = "Find the key in the text below."
DIGITKEY_QUESTION = "What is the key?"

# Keys for the multi-key task: adjective-noun pairs, 48 x 48 = 2304 distinct keys.
_ADJECTIVES = (
    "amber ancient brave bright calm clever crimson curious damp eager early faint fancy "
    "fierce gentle golden grand hollow humble icy jolly keen lively lonely loud lucky "
    "merry misty modest narrow noble odd pale patient plain proud quiet rapid rough "
    "rusty silent silver sleepy smooth steady swift tender wise").split()
_NOUNS = (
    "anchor apple badger barrel beacon bridge candle castle cedar comet copper crane "
    "desert dragon falcon feather forest garden glacier harbor hazel island kettle "
    "lantern lemon maple meadow mirror orchard otter pebble pepper pigeon planet "
    "quarry raven river saddle shadow spruce thistle tiger tulip valley violin walnut "
    "willow zebra").split()
assert len(set(_ADJECTIVES)) == len(_ADJECTIVES) == 48 and len(set(_NOUNS)) == len(_NOUNS) == 48
# Filler words of the digitkey task: lowercase, no digits, none of them "key".
_FILLER_WORDS = tuple(_ADJECTIVES + _NOUNS)


_SENTENCE_END = re.compile(r'(?:(?<=[.!?])|(?<=[.!?]["\')]))\s+(?=["\'(]?[A-Z])')


def split_sentences(text: str) -> list[str]:
    """Sentences of the filler: split after . ! ? (and closing quotes) before a capital."""
    out = []
    for para in text.splitlines():
        out.extend(s for s in _SENTENCE_END.split(para.strip()) if s)
    return out


@functools.lru_cache(maxsize=1)
def filler_sentences() -> tuple[str, ...]:
    return tuple(split_sentences(ASSET.read_text(encoding="utf-8")))


@dataclass(frozen=True)
class Filler:
    """Filler sentences with their token counts for one tokenizer."""

    sentences: tuple[str, ...]
    counts: np.ndarray  # tokens of " " + sentence

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> "Filler":
        """Counted once per tokenizer object (counting the book's sentences takes ~0.5 s)."""
        sents = filler_sentences()
        return cls(sents, token_counts(sents, tokenizer))

    def take(self, start: int, budget: int) -> tuple[list[str], list[int]]:
        """Consecutive sentences from `start` (wrapping) while their tokens fit the budget."""
        sents, counts, used, i = [], [], 0, start
        n = len(self.sentences)
        while used + self.counts[i % n] <= budget:
            sents.append(self.sentences[i % n])
            counts.append(int(self.counts[i % n]))
            used += counts[-1]
            i += 1
            if i - start >= 100 * n:  # budget far beyond the book: it repeats, stop sanely
                break
        return sents, counts


def token_counts(texts: tuple[str, ...], tokenizer: Any) -> np.ndarray:
    """Tokens of " " + text for each text, cached per (texts, tokenizer object)."""
    try:
        return _token_counts_cached(texts, tokenizer)
    except TypeError:  # an unhashable tokenizer: count every time
        return _count_tokens(texts, tokenizer)


@functools.lru_cache(maxsize=8)
def _token_counts_cached(texts: tuple[str, ...], tokenizer: Any) -> np.ndarray:
    return _count_tokens(texts, tokenizer)


def _count_tokens(texts: tuple[str, ...], tokenizer: Any) -> np.ndarray:
    return np.array([len(tokenizer.encode(" " + t, add_special_tokens=False)) for t in texts], np.int64)


@dataclass(frozen=True)
class WordFiller:
    """The digitkey task's filler: random words of `_FILLER_WORDS` with their token counts."""

    words: tuple[str, ...]
    counts: np.ndarray  # tokens of " " + word

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> "WordFiller":
        return cls(_FILLER_WORDS, token_counts(_FILLER_WORDS, tokenizer))

    def draw(self, rng: np.random.Generator, budget: int) -> tuple[list[str], list[int]]:
        """Random words (with replacement) while their tokens fit the budget."""
        n = max(budget, 0) // int(self.counts.min()) + 1
        ids = rng.integers(len(self.words), size=n)
        k = int(np.searchsorted(np.cumsum(self.counts[ids]), budget, side="right"))
        return [self.words[i] for i in ids[:k]], [int(self.counts[i]) for i in ids[:k]]


def _rng(task: str, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng((int(seed), _TASK_SALT[task], int(index)))


def _insert_at_depths(sents: list[str], counts: list[int], needles: Sequence[str],
                      depths: Sequence[float]) -> tuple[str, list[float]]:
    """Puts each needle at the sentence boundary nearest its depth; returns the actual depths."""
    cum = np.concatenate([[0], np.cumsum(counts)])  # tokens before boundary j
    total = max(int(cum[-1]), 1)
    at: dict[int, list[str]] = {}
    actual = []
    for needle, d in zip(needles, depths):
        j = int(np.argmin(np.abs(cum - d * total)))
        at.setdefault(j, []).append(needle)
        actual.append(float(cum[j] / total))
    pieces = []
    for j in range(len(sents) + 1):
        pieces.extend(at.get(j, []))
        if j < len(sents):
            pieces.append(sents[j])
    return " ".join(pieces), actual


def _haystack(rng: np.random.Generator, filler: Filler, tokenizer: Any, fixed_text: str,
              context_tokens: int) -> tuple[list[str], list[int]]:
    budget = context_tokens - len(tokenizer.encode(fixed_text, add_special_tokens=False))
    if budget < 0:
        raise ValueError(f"context_tokens={context_tokens} is too small for the task text")
    return filler.take(int(rng.integers(len(filler.sentences))), budget)


def check_depth_range(depth_range: Sequence[float]) -> tuple[float, float]:
    """(lo, hi) of a needle depth range; ValueError unless 0 <= lo < hi <= 1."""
    r = tuple(float(x) for x in depth_range)
    if len(r) != 2 or not 0.0 <= r[0] < r[1] <= 1.0:
        raise ValueError(f"depth_range must be [lo, hi] with 0 <= lo < hi <= 1, got {list(depth_range)}")
    return r


def _random_depth(u: float, depth_range: Sequence[float]) -> float:
    """A uniform draw u in [0, 1) mapped into [lo, hi): the default (0, 1) leaves the draw (and so
    every sample of a seed) unchanged."""
    lo, hi = check_depth_range(depth_range)
    return lo + (hi - lo) * float(u)


def passkey_sample(index: int, *, seed: int, tokenizer: Any, context_tokens: int,
                   depth: float | None = None, filler: Filler | None = None,
                   depth_range: Sequence[float] = (0.0, 1.0)) -> dict[str, Any]:
    """One passkey-retrieval sample (see the module docstring)."""
    rng = _rng("passkey", seed, index)
    filler = filler or Filler.for_tokenizer(tokenizer)
    key = str(int(rng.integers(10000, 100000)))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    d = _random_depth(rng.uniform(), depth_range) if depth is None else float(depth)
    sents, counts = _haystack(rng, filler, tokenizer, f"{PASSKEY_PREAMBLE} {needle}",
                              context_tokens)
    hay, actual = _insert_at_depths(sents, counts, [needle], [d])
    return {"task": "passkey", "context": f"{PASSKEY_PREAMBLE} {hay}",
            "instruction": PASSKEY_QUESTION, "answer": f"The pass key is {key}.",
            "target": key, "needles": [needle], "depth": actual[0], "seed": seed, "index": index}


def multikey_sample(index: int, *, seed: int, tokenizer: Any, context_tokens: int,
                    num_needles: int = 4, depth: float | None = None,
                    filler: Filler | None = None,
                    depth_range: Sequence[float] = (0.0, 1.0)) -> dict[str, Any]:
    """One multi-key needle QA sample. `depth` fixes the depth of the asked needle (else drawn
    from `depth_range`); the others are always at random depths."""
    rng = _rng("multikey", seed, index)
    filler = filler or Filler.for_tokenizer(tokenizer)
    pairs = rng.choice(len(_ADJECTIVES) * len(_NOUNS), size=num_needles, replace=False)
    keys = [f"{_ADJECTIVES[p // len(_NOUNS)]}-{_NOUNS[p % len(_NOUNS)]}" for p in pairs]
    values = [str(v) for v in rng.choice(9_000_000, size=num_needles, replace=False) + 1_000_000]
    needles = [f"The special magic number for {k} is {v}." for k, v in zip(keys, values)]
    asked = int(rng.integers(num_needles))
    depths = rng.uniform(size=num_needles)
    depths[asked] = _random_depth(depths[asked], depth_range) if depth is None else depth
    sents, counts = _haystack(rng, filler, tokenizer,
                              MULTIKEY_PREAMBLE + " " + " ".join(needles), context_tokens)
    hay, actual = _insert_at_depths(sents, counts, needles, list(depths))
    key, value = keys[asked], values[asked]
    return {"task": "multikey", "context": f"{MULTIKEY_PREAMBLE} {hay}",
            "instruction": f"What is the special magic number for {key} mentioned in the "
                           f"provided text?",
            "answer": f"The special magic number for {key} mentioned in the provided text "
                      f"is {value}.",
            "target": value, "key": key, "keys": keys, "values": values, "needles": needles,
            "depth": actual[asked], "depths": actual, "seed": seed, "index": index}


def digitkey_sample(index: int, *, seed: int, tokenizer: Any, context_tokens: int,
                    depth: float | None = None, filler: WordFiller | None = None,
                    depth_range: Sequence[float] = (0.0, 1.0)) -> dict[str, Any]:
    """One digit-key sample (see the module docstring). A `filler` other than a WordFiller (e.g.
    the book's, which generic callers pass to every task) is ignored."""
    rng = _rng("digitkey", seed, index)
    if not isinstance(filler, WordFiller):
        filler = WordFiller.for_tokenizer(tokenizer)
    # balanced digits: a random permutation of 0-9 per block of 10 indices
    block = np.random.default_rng((int(seed), _TASK_SALT["digitkey"], int(index) // 10, 1))
    digit = str(int(block.permutation(10)[int(index) % 10]))
    needle = f"The key is {digit}."
    d = _random_depth(rng.uniform(), depth_range) if depth is None else float(depth)
    budget = context_tokens - len(tokenizer.encode(f"{DIGITKEY_PREAMBLE} {needle}", add_special_tokens=False))
    if budget < 0:
        raise ValueError(f"context_tokens={context_tokens} is too small for the task text")
    words, counts = filler.draw(rng, budget)
    hay, actual = _insert_at_depths(words, counts, [needle], [d])
    return {"task": "digitkey", "context": f"{DIGITKEY_PREAMBLE} {hay}",
            "instruction": DIGITKEY_QUESTION, "answer": needle,
            "target": digit, "depth": actual[0], "seed": seed, "index": index}


_SAMPLERS = {"passkey": passkey_sample, "multikey": multikey_sample, "digitkey": digitkey_sample}


def filler_for(task: str, tokenizer: Any) -> Filler | WordFiller:
    """The filler `task`'s sampler takes (cached per tokenizer)."""
    if task not in _SAMPLERS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {TASKS}")
    return (WordFiller if task == "digitkey" else Filler).for_tokenizer(tokenizer)


def make_sample(task: str, index: int, **params: Any) -> dict[str, Any]:
    if task not in _SAMPLERS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {TASKS}")
    return _SAMPLERS[task](index, **params)


class SyntheticSource:
    """A random-access sequence of `num_samples` samples of one task (a grain source).

    Samples are generated on access from (seed, index); nothing is stored.
    """

    def __init__(self, task: str, *, num_samples: int, seed: int, tokenizer: Any,
                 context_tokens: int, **task_params: Any):
        if task not in _SAMPLERS:
            raise ValueError(f"unknown synthetic task {task!r}; known: {TASKS}")
        self.task, self.num_samples = task, int(num_samples)
        self._params = dict(seed=seed, tokenizer=tokenizer, context_tokens=context_tokens,
                            filler=filler_for(task, tokenizer), **task_params)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        return _SAMPLERS[self.task](int(index), **self._params)


def score_answer(task: str, generated_text: str, sample: dict[str, Any]) -> bool:
    """True if the generation contains the target as a whole number.

    For "multikey" it must also contain no other needle's number (so listing every
    number from the context does not count as an answer). For "digitkey" the target must be the
    only number in the generation (naming every digit is not an answer).
    """
    numbers = set(re.findall(r"\d+", generated_text))
    if task == "digitkey":
        return numbers == {sample["target"]}
    if task == "passkey":
        return sample["target"] in numbers
    if task == "multikey":
        others = set(sample["values"]) - {sample["target"]}
        return sample["target"] in numbers and not (numbers & others)
    raise ValueError(f"unknown synthetic task {task!r}; known: {TASKS}")
