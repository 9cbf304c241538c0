"""Synthetic passkey / multi-key needle tasks: seeds, lengths, depths, real filler, scoring."""

import re

import numpy as np
import pytest

from eijax.data.byte_tokenizer import ByteTokenizer
from eijax.data.synthetic import (Filler, SyntheticSource, filler_sentences, make_sample,
                                  multikey_sample, passkey_sample, score_answer)

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
            assert ctx.count(needle) == 1
            assert abs(s["depth"] - depth) < 0.05
            # position of the needle in the text agrees with the reported depth
            preamble_end = ctx.index("information there.") + len("information there.")
            pos = (ctx.index(needle) - preamble_end) / (len(ctx) - preamble_end - len(needle))
            assert abs(pos - depth) < 0.06
    random_depths = [passkey_sample(i, seed=2, tokenizer=TOK, context_tokens=3000)["depth"]
                     for i in range(40)]
    assert min(random_depths) < 0.2 and max(random_depths) > 0.8


def test_multikey_needles_and_question():
    s = multikey_sample(3, seed=4, tokenizer=TOK, context_tokens=5000, num_needles=5, depth=0.3)
    assert len(set(s["keys"])) == 5 and len(set(s["values"])) == 5
    for k, v in zip(s["keys"], s["values"]):
        assert s["context"].count(f"The special magic number for {k} is {v}.") == 1
        assert re.fullmatch(r"[1-9]\d{6}", v)
    assert s["key"] in s["instruction"] and s["target"] in s["answer"]
    assert s["values"][s["keys"].index(s["key"])] == s["target"]
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
