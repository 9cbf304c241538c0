"""Synthetic passkey / multi-key / digit-key needle tasks: seeds, lengths, depths, filler, scoring."""

import re

import numpy as np
import pytest

from eijax.data.byte_tokenizer import ByteTokenizer
from eijax.data.synthetic import (DIGITKEY_PREAMBLE, PASSKEY_PREAMBLE, Filler, SyntheticSource,
                                  digitkey_sample, filler_sentences, make_sample, multikey_sample,
                                  passkey_sample, score_answer)

TOK = ByteTokenizer()


def n_tokens(text):
    return len(TOK.encode(text))


@pytest.mark.parametrize("task", ["passkey", "multikey"])
def test_same_seed_same_samples_and_no_two_alike(task):
    a = SyntheticSource(task, num_samples=150, seed=7, tokenizer=TOK, context_tokens=800)
    b = SyntheticSource(task, num_samples=150, seed=7, tokenizer=TOK, context_tokens=800)
    c = SyntheticSource(task, num_samples=150, seed=8, tokenizer=TOK, context_tokens=800)
    assert [a[i] for i in range(150)] == [b[i] for i in range(150)]
    contexts = [s[i]["context"] for s in (a, c) for i in range(150)]
    assert len(set(contexts)) == len(contexts)
    # the task's answer itself varies too, not just the filler
    assert len({a[i]["target"] for i in range(150)}) > 140


@pytest.mark.parametrize("task", ["passkey", "multikey"])
def test_context_length_is_controlled(task):
    longest_sentence = max(Filler.for_tokenizer(TOK).counts)
    for target in (500, 3000, 20000):
        for i in range(5):
            s = make_sample(task, i, seed=0, tokenizer=TOK, context_tokens=target)
            assert target - longest_sentence <= n_tokens(s["context"]) <= target


def test_passkey_depth_is_controlled():
    for depth in (0.0, 0.25, 0.5, 0.9, 1.0):
        for i in range(5):
            s = passkey_sample(i, seed=1, tokenizer=TOK, context_tokens=6000, depth=depth)
            ctx = s["context"]
            needle = f"The pass key is {s['target']}. Remember it."
            assert ctx.count(needle) == 1 and ctx.count(s["needles"][0]) == 1 and needle in s["needles"][0]
            assert abs(s["depth"] - depth) < 0.05
            # position of the needle in the text agrees with the reported depth
            preamble_end = len(PASSKEY_PREAMBLE)  # the context starts with it
            pos = (ctx.index(needle) - preamble_end) / (len(ctx) - preamble_end - len(needle))
            assert abs(pos - depth) < 0.06
    random_depths = [passkey_sample(i, seed=2, tokenizer=TOK, context_tokens=3000)["depth"]
                     for i in range(40)]
    assert min(random_depths) < 0.2 and max(random_depths) > 0.8


@pytest.mark.parametrize("sampler", [passkey_sample, multikey_sample, digitkey_sample])
def test_depth_range_draws_inside_it_and_the_default_changes_nothing(sampler):
    kw = dict(seed=3, tokenizer=TOK, context_tokens=3000)
    early = [sampler(i, depth_range=(0.0, 0.12), **kw)["depth"] for i in range(20)]
    assert max(early) < 0.17 and len(set(early)) > 10  # sentence boundaries shift it a little
    # (0, 1) is the plain uniform draw: the samples of a seed are those made before the option
    assert [sampler(i, depth_range=(0.0, 1.0), **kw) for i in range(5)] == [sampler(i, **kw) for i in range(5)]
    with pytest.raises(ValueError, match="depth_range"):
        sampler(0, depth_range=(0.5, 0.2), **kw)


def test_multikey_needles_and_question():
    s = multikey_sample(3, seed=4, tokenizer=TOK, context_tokens=5000, num_needles=5, depth=0.3)
    assert len(set(s["keys"])) == 5 and len(set(s["values"])) == 5
    for k, v in zip(s["keys"], s["values"]):
        assert s["context"].count(f"The special magic number for {k} is {v}.") == 1
        assert re.fullmatch(r"[1-9]\d{6}", v)
    assert s["key"] in s["instruction"] and s["target"] in s["answer"]
    assert s["values"][s["keys"].index(s["key"])] == s["target"]
    assert [s["context"].count(t) for t in s["needles"]] == [1] * 5  # the sentences as written, for probes
    assert abs(s["depth"] - 0.3) < 0.05


def test_filler_is_real_prose_not_repetition():
    sents = filler_sentences()
    assert len(sents) > 3000 and len(set(sents)) > 0.95 * len(sents)
    s = passkey_sample(0, seed=0, tokenizer=TOK, context_tokens=4000)
    words = re.findall(r"[a-z]+", s["context"].lower())
    assert len(set(words)) > 0.3 * len(words) ** 0.9  # a real vocabulary, not a looped line


def test_score_answer():
    p = passkey_sample(0, seed=0, tokenizer=TOK, context_tokens=500)
    key = p["target"]
    assert score_answer("passkey", f"The pass key is {key}.", p)
    assert score_answer("passkey", f"{key}", p)
    assert not score_answer("passkey", f"The pass key is {key}1.", p)  # not a whole-number match
    assert not score_answer("passkey", "I do not know.", p)
    m = multikey_sample(0, seed=0, tokenizer=TOK, context_tokens=800, num_needles=3)
    other = next(v for v in m["values"] if v != m["target"])
    assert score_answer("multikey", f"It is {m['target']}.", m)
    assert not score_answer("multikey", f"It is {other}.", m)
    assert not score_answer("multikey", " ".join(m["values"]), m)  # listing all is not an answer


def test_source_bounds_and_unknown_task():
    src = SyntheticSource("passkey", num_samples=3, seed=0, tokenizer=TOK, context_tokens=300)
    assert len(src) == 3
    with pytest.raises(IndexError):
        src[3]
    with pytest.raises(ValueError):
        SyntheticSource("nope", num_samples=1, seed=0, tokenizer=TOK, context_tokens=300)
    with pytest.raises(ValueError):
        passkey_sample(0, seed=0, tokenizer=TOK, context_tokens=50)  # shorter than the task text


def test_samples_are_valid_records():
    from eijax.data.records import QARecord, as_record

    s = passkey_sample(5, seed=0, tokenizer=TOK, context_tokens=400)
    assert as_record(s) == QARecord(s["context"], s["instruction"], s["answer"])
    assert np.isfinite(s["depth"])


def test_digitkey_samples():
    src = SyntheticSource("digitkey", num_samples=40, seed=3, tokenizer=TOK, context_tokens=120)
    again = SyntheticSource("digitkey", num_samples=40, seed=3, tokenizer=TOK, context_tokens=120)
    samples = [src[i] for i in range(40)]
    assert samples == [again[i] for i in range(40)]  # deterministic per (seed, index)
    assert samples != [digitkey_sample(i, seed=4, tokenizer=TOK, context_tokens=120) for i in range(40)]
    for i, s in enumerate(samples):
        ctx, d = s["context"], s["target"]
        assert re.fullmatch(r"\d", d) and s["answer"] == f"The key is {d}." and s["instruction"] == "What is the key?"
        assert ctx.startswith(DIGITKEY_PREAMBLE + " ") and ctx.count("key") == 2  # preamble + the needle once
        assert ctx.count(s["answer"]) == 1 and re.findall(r"\d", ctx) == [d]
        assert re.fullmatch(r"[a-z ]*", ctx[len(DIGITKEY_PREAMBLE):].replace(s["answer"], ""))
        assert 120 - 10 <= n_tokens(ctx) <= 120
    # each block of 10 indices holds every digit once: a constant answer scores exactly chance
    assert all(sorted(s["target"] for s in samples[k:k + 10]) == list("0123456789") for k in range(0, 40, 10))
    depths = [s["depth"] for s in samples]
    assert min(depths) < 0.2 and max(depths) > 0.8
    s = digitkey_sample(0, seed=0, tokenizer=TOK, context_tokens=400, depth=0.5)
    assert abs(s["depth"] - 0.5) < 0.05
    with pytest.raises(ValueError):
        digitkey_sample(0, seed=0, tokenizer=TOK, context_tokens=30)  # shorter than the task text


def test_digitkey_scoring_and_real_tokenizer():
    s = digitkey_sample(1, seed=0, tokenizer=TOK, context_tokens=100)
    d, other = s["target"], str((int(s["target"]) + 1) % 10)
    assert score_answer("digitkey", f"The key is {d}.", s) and score_answer("digitkey", d, s)
    assert not score_answer("digitkey", f"The key is {other}.", s)
    assert not score_answer("digitkey", f"The key is {d}{d}.", s)  # a whole-number match only
    assert not score_answer("digitkey", "0 1 2 3 4 5 6 7 8 9", s)  # naming every digit is not an answer
    assert not score_answer("digitkey", "I do not know.", s)
    # lengths are in tokens of the given tokenizer (one whose tokens span several bytes); the book
    # filler that generic callers pass to every task is ignored
    tok = _TinyBPE()
    t = digitkey_sample(1, seed=0, tokenizer=tok, context_tokens=60, filler=Filler.for_tokenizer(TOK))
    assert n_tokens(t["context"]) > 80  # multi-byte tokens
    assert 60 - 8 <= len(tok.encode(t["context"])) <= 60 + 2  # summed word counts: merges may shift it a little
    assert t["context"].count(t["answer"]) == 1


class _TinyBPE:
    """A real merging tokenizer: byte-level BPE trained on the spot (loading SmolLM2's takes ~10 s)."""

    def __init__(self):
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        from eijax.data.synthetic import _FILLER_WORDS

        self._tk = Tokenizer(models.BPE())
        self._tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tk.train_from_iterator([" ".join(_FILLER_WORDS)], trainers.BpeTrainer(
            vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))

    def encode(self, text, add_special_tokens=False):
        return self._tk.encode(text, add_special_tokens=False).ids
