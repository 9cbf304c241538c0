"""Evaluation harness: metrics against hand-computed values, and the CLI end to end on a tiny model."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from eijax.eval.metrics import lcs_length, metric_for_dataset, qa_f1, rouge_l


def _lcs_table(a, b):  # textbook O(n*m) dynamic programme, the reference
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_qa_f1_hand_computed():
    # normalised: "cat sat on mat" vs "cat on mat": 3 shared, P = 3/4, R = 1 -> F1 = 6/7
    assert qa_f1("The cat sat on the mat.", "a cat on a mat") == pytest.approx(6 / 7)
    assert qa_f1("Paris", ["London", "paris!"]) == 1.0          # best reference, case/punct-free
    assert qa_f1("blue", "red") == 0.0
    assert qa_f1("", "red") == 0.0
    # repeated tokens count once per occurrence: "a a b" -> [b] (article removed) vs "b b": 1 shared
    assert qa_f1("x x y", "x y y") == pytest.approx(2 / 3)


def test_rouge_l_hand_computed():
    # Lin (2004): LCS("police killed the gunman", "police kill the gunman") = 3 -> P = R = F = 3/4
    assert rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(0.75)
    # "the gunman kill police" vs "police killed the gunman": LCS = "the gunman" = 2 -> 1/2
    assert rouge_l("the gunman kill police", "police killed the gunman") == pytest.approx(0.5)
    # unequal lengths: pred 2 tokens, ref 4, LCS 2 -> P = 1, R = 1/2, F = 2/3
    assert rouge_l("Police, gunman!", "police killed the gunman") == pytest.approx(2 / 3)
    assert rouge_l("nothing shared", ["zzz", "police"]) == 0.0


def test_lcs_matches_dynamic_programme_and_has_no_recursion_limit():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randint(0, 5) for _ in range(rng.randint(0, 40))]
        b = [rng.randint(0, 5) for _ in range(rng.randint(0, 40))]
        assert lcs_length(a, b) == _lcs_table(a, b)
    long = [rng.randint(0, 30) for _ in range(20000)]
    assert lcs_length(long, long) == 20000
    assert lcs_length(long, ["absent"] * 5000) == 0


def test_longbench_metric_choice():
    assert metric_for_dataset("data/gov_report.jsonl") == "rouge_l"
    assert metric_for_dataset("hotpotqa_e.jsonl") == "qa_f1"
    assert metric_for_dataset("my_set.jsonl") == "qa_f1"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 1-layer random Llama with SmolLM2's tokenizer (so the real synthetic tasks and template apply)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from eijax.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("tiny_smol")
    tok = load_tokenizer("smollm2")
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                      intermediate_size=48, vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_harness_end_to_end_on_tiny_model(tiny_model_dir, tmp_path):
    from eijax.eval.__main__ import main

    lb = tmp_path / "qasper.jsonl"
    with lb.open("w") as f:
        for i in range(2):
            f.write(json.dumps({"input": f"Question {i}?", "context": "Some context. " * (40 + 60 * i),
                                "answers": ["an answer"]}) + "\n")
    text = tmp_path / "book.txt"
    text.write_text("It was a bright cold day in April, and the clocks were striking thirteen. " * 60)
    out = tmp_path / "out"
    res = main(["--model", str(tiny_model_dir), "--sink", "16", "--window", "112", "--lengths", "256,600",
                "--depths", "0.2,0.8", "--samples", "1", "--max-new-tokens", "3", "--longbench", str(lb),
                "--longbench-max-new-tokens", "3", "--ppl-file", str(text), "--ppl-tokens", "400",
                "--chunks", "64,16", "--out", str(out)])
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    qa = [r for r in rows if r["task"] != "ppl"]
    assert len(qa) == 3 * (2 * 2 * 2 + 2)  # methods x (tasks x lengths x depths + longbench records)
    assert {r["method"] for r in rows} == {"edgeinfinite", "streaming", "full"}
    assert all(0.0 <= r["score"] <= 1.0 for r in qa)
    long_rows = [r for r in qa if r["length"] == 600 and r["task"] == "passkey"]
    assert {r["route"] for r in long_rows if r["method"] != "full"} == {"stream"}
    ppl = [r for r in rows if r["task"] == "ppl"]
    assert {r["segment"] for r in ppl if r["method"] == "edgeinfinite"} == {0, 1, 2, 3}  # 128, +112, +112, rest
    assert all(r["score"] > 1.0 for r in ppl)
    table = (out / "table.md").read_text()
    assert "| passkey | 600 |" in table and "qasper:qa_f1" in table
    # every synthetic row says where its needle sits; a deeper needle sits later in the stream
    synth = {(r["task"], r["length"], r["depth"]): r["needle_token"] for r in qa
             if r["method"] == "edgeinfinite" and r["task"] in ("passkey", "multikey")}
    assert all(v is not None for v in synth.values())
    assert synth[("passkey", 600, 0.2)] < synth[("passkey", 600, 0.8)]
    assert "| needle in |" in table
    for name in ("accuracy_vs_length.png", "passkey_heatmap.png", "perplexity.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert res["plots"] == ["accuracy_vs_length.png", "passkey_heatmap.png", "perplexity.png"]


def test_interrupted_run_resumes_with_only_the_missing_examples(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Rows reach rows.jsonl as they are scored; `--resume` keeps them (dropping a line the
    interruption cut off), generates only the rest and ends with the rows of an uninterrupted run."""
    from eijax.eval.__main__ import main
    from eijax.generate import Generator

    out = tmp_path / "out"
    args = ["--model", str(tiny_model_dir), "--sink", "16", "--window", "112", "--methods", "streaming,edgeinfinite",
            "--tasks", "passkey", "--lengths", "256", "--depths", "0.5", "--samples", "3", "--max-new-tokens", "3",
            "--chunks", "64,16", "--out", str(out)]
    main(args)
    whole = (out / "rows.jsonl").read_text().splitlines()
    assert len(whole) == 6 and len({json.loads(r)["id"] for r in whole}) == 3

    (out / "rows.jsonl").write_text("\n".join(whole[:2]) + "\n" + whole[2][:25])  # killed while writing row 3
    calls = []
    real = Generator.generate
    monkeypatch.setattr(Generator, "generate", lambda self, *a, **k: calls.append(self.method) or real(self, *a, **k))
    main(args + ["--resume"])
    assert calls == ["streaming"] + ["edgeinfinite"] * 3  # streaming's third row and all of edgeinfinite
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k not in ("seconds", "ttft_s")}
    resumed = (out / "rows.jsonl").read_text().splitlines()
    key = lambda r: (r["method"], r["id"])
    assert sorted(map(strip, resumed), key=key) == sorted(map(strip, whole), key=key)

    with pytest.raises(SystemExit) as e:
        main([*args[:-2], "--samples", "4", "--out", str(out), "--resume"])
    assert e.value.code == 2 and "--samples" in capsys.readouterr().err

    # a folder written before --question-position existed ran at its default: resumable, but not as "both"
    stored = json.loads((out / "args.json").read_text())
    del stored["question_position"]
    (out / "args.json").write_text(json.dumps(stored))
    with pytest.raises(SystemExit) as e:
        main(args + ["--question-position", "both", "--resume"])
    assert e.value.code == 2 and "--question-position" in capsys.readouterr().err
    calls.clear()
    main(args + ["--resume"])
    assert calls == []


def test_question_both_puts_the_question_before_the_document_too():
    """`--question-position both` (S-SFT's question-both): the same sample, the question also at
    the document's start, the question part unchanged, the needle found where it moved to."""
    from eijax.eval.tasks import synthetic_examples
    from eijax.tokenizer import load_tokenizer

    tok = load_tokenizer("smollm2")
    kw = dict(lengths=[400], depths=[0.5], samples=1, seed=3)
    (last,), (both,) = (synthetic_examples(tok, "multikey", **kw, question_position=p) for p in ("last", "both"))
    asked = tok.decode(last.question).split("?")[0].split("for ")[-1]  # the asked needle's name
    assert both.question == last.question and asked in tok.decode(last.question)
    head = lambda ex: tok.decode(ex.document[:60])
    assert asked in head(both) and asked not in head(last)
    assert len(both.document) > len(last.document)
    shift = both.meta["needle_token"] - last.meta["needle_token"]
    assert both.document[both.meta["needle_token"]:][:3] == last.document[last.meta["needle_token"]:][:3]
    assert 10 < shift == len(both.document) - len(last.document)
    with pytest.raises(ValueError, match="question_position"):
        synthetic_examples(tok, "multikey", **kw, question_position="first")


class _CharTokenizer:  # one id per character: needle positions are easy to check by hand
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_needle_token_finds_the_value_and_write_index_places_it():
    from eijax.eval.report import write_index
    from eijax.eval.tasks import needle_token

    doc = _CharTokenizer().encode("filler filler The key is 4711. more filler")
    at = needle_token(_CharTokenizer(), doc, "4711")
    assert doc[at:at + 4] == [ord(c) for c in "4711"] and at == doc.index(ord("4"))
    assert needle_token(_CharTokenizer(), doc, "9999") is None
    # sink 8, window 16: positions 0-7 never written, 8-23 the first write, 24-39 the second
    assert [write_index(p, 8, 16) for p in (7, 8, 23, 24, 40)] == [None, 0, 0, 1, 2]


def test_by_write_table_splits_the_memory_method_only():
    from eijax.eval.report import by_write_table

    rows = [dict(task="passkey", length=1024, method="edgeinfinite", score=s, needle_token=p)
            for s, p in [(0.0, 40), (0.0, 100), (1.0, 300), (1.0, 500), (0.0, 600)]]
    rows += [dict(task="passkey", length=1024, method="full", score=1.0, needle_token=40),
             dict(task="passkey", length=1024, method="edgeinfinite", score=1.0, needle_token=None)]
    table = by_write_table(rows, sink=32, window=256)
    assert "| passkey | 1024 | edgeinfinite | first write | 2 | 0.00 [" in table
    assert "| passkey | 1024 | edgeinfinite | later writes | 3 | 0.67 [" in table
    assert "full" not in table
    assert by_write_table(rows[-2:-1], sink=32, window=256) == ""


def test_digit_table_tells_a_blend_of_needles_from_digits_they_do_not_hold():
    from eijax.eval.report import answer_digits, digit_shares, digit_table

    needles = ["1234567", "7654321", "5555555", "9081796"]
    assert answer_digits("The number for x is 1234. Or 7654321.") == "7654321"
    assert digit_shares("1234567", "1234567", needles) == (1.0, 1.0)
    # first three places from needle 0, the rest from needles 1 and 2: a blend, none of it the asked one's
    own, some = digit_shares("1235521", "9081796", needles)
    assert (own, some) == (0.0, 1.0)
    assert digit_shares("33", "9081796", needles) == (0.0, 0.0)   # short and foreign: nothing carried
    rows = [dict(task="multikey", length=2048, method="edgeinfinite", target="9081796", needles=needles, output=o)
            for o in ("It is 1235521.", "It is 9081000.")]
    rows.append(dict(task="passkey", length=2048, method="edgeinfinite", target="12345", output="12345"))
    table = digit_table(rows)
    # own and any needle: (0 + 4/7) / 2 and (1 + 4/7) / 2 ("9081" from the asked one, "000" from none)
    assert "| multikey | 2048 | edgeinfinite | 2 | 0.29 | 0.79 |" in table
    assert "passkey" not in table and digit_table(rows[-1:]) == ""


def test_ppl_gap_groups_each_prediction_by_where_its_bigram_was_seen():
    from eijax.eval.ppl_gap import token_groups, window_start

    sink, window = 2, 4  # windows start at 2 (until the first compress: everything), 6, 10, 14
    assert [window_start(i, sink, window) for i in (0, 5, 6, 9, 10, 14)] == [2, 2, 6, 6, 10, 14]
    #          sink    | window 0       | window 1       | window 2        | window 3
    tokens = [20, 21, 3, 4, 12, 13, 14, 15, 3, 4, 3, 4, 3, 4, 20, 21, 16]
    groups = token_groups(tokens, sink, window)
    assert len(groups) == len(tokens) - 1
    assert groups[0] == groups[2] == 2           # first (20, 21), first (3, 4): new
    assert groups[8] == 1                         # (3, 4) seen at 2-3 only: folded into memory at i = 8
    assert groups[10] == 1                        # latest (3, 4) ends at 9: window 1, gone at i = 10
    assert groups[12] == 0                        # (3, 4) at 10-11 is in window 2 with i = 12
    assert groups[14] == 0                        # (20, 21) sits in the sink: always visible
    assert groups[15] == 2                        # (21, 16) never seen


def test_ppl_gap_table_splits_the_gap_and_reproduces_the_beyond_window_mean(tiny_model_dir, tmp_path):
    from eijax.eval.ppl_gap import GROUPS, main

    text = tmp_path / "book.txt"
    rng = random.Random(0)  # random words (new bigrams) with a sentence that recurs (copies)
    words = [f"w{rng.randrange(10**6)}" for _ in range(300)]
    text.write_text(" ".join(rng.choice(words) if rng.random() < 0.8 else "the clocks were striking thirteen"
                             for _ in range(400)))
    out = tmp_path / "gap.json"
    rows = main(["--model", str(tiny_model_dir), "--sink", "16", "--window", "112", "--file", str(text),
                 "--tokens", "500", "--out", str(out)])
    assert [r["group"] for r in rows] == [*GROUPS, "all"]
    assert [r["n"] for r in json.loads(out.read_text())] == [r["n"] for r in rows]
    groups, total = rows[:3], rows[3]
    assert all(r["n"] > 0 for r in groups)
    assert sum(r["n"] for r in groups) == total["n"] == 500 - 1 - (16 + 112 - 1)
    assert sum(r["share"] for r in groups) == pytest.approx(1.0)
    assert sum(r["gap_share"] for r in groups) == pytest.approx(1.0)
    for m in ("full", "streaming", "edgeinfinite"):  # 'all' is the mean of the groups, weighted by n
        assert total[f"nll_{m}"] == pytest.approx(sum(r["n"] * r[f"nll_{m}"] for r in groups) / total["n"])


def test_ppl_gap_window_curve_scores_the_same_predictions_at_each_window(tiny_model_dir, tmp_path):
    """`--windows`: sink + window at the run's own window reproduces the table's sink + window loss
    (same predictions), a window holding the whole text matches full attention, and the memory's
    worth in window tokens is interpolated between measured windows."""
    from eijax.eval.ppl_gap import main, window_worth

    text = tmp_path / "book.txt"
    rng = random.Random(1)
    text.write_text(" ".join(f"w{rng.randrange(500)}" for _ in range(400)))
    rows = main(["--model", str(tiny_model_dir), "--sink", "16", "--window", "112", "--file", str(text),
                 "--tokens", "500", "--windows", "240,496"])
    total, extra = rows[3], rows[4]
    curve = extra["curve"]
    assert [r["window"] for r in curve] == [112, 240, 496]
    assert curve[0]["nll"] == pytest.approx(total["nll_streaming"], rel=1e-5)
    assert curve[2]["nll"] == pytest.approx(total["nll_full"], rel=1e-4)  # 16 + 496 slots hold all 500 tokens
    assert window_worth(curve, curve[1]["nll"]) == pytest.approx(240)
    assert window_worth(curve, 2 * max(r["nll"] for r in curve)) is None
    with pytest.raises(SystemExit):
        main(["--model", str(tiny_model_dir), "--file", str(text), "--windows", "384,x"])


def test_memory_probe_cli_reports_binding_for_multikey(tiny_model_dir, capsys):
    """`python -m eijax.eval.memory_probe --task multikey`: each of the four needles is found in the
    stream (question before the document too), and the binding table and its summary are printed."""
    from eijax.eval.memory_probe import main

    main(["--model", str(tiny_model_dir), "--task", "multikey", "--question-position", "both", "--length", "600",
          "--sink", "16", "--window", "112", "--samples", "2", "--temperatures", "", "--favor", "64"])
    out = capsys.readouterr().out
    assert "binding per layer" in out and "best head binding: memory read" in out and "64 random features" in out


def test_key_fit_cli_collects_resumably_and_fits(tiny_model_dir, tmp_path, capsys):
    """`python -m eijax.eval.key_fit collect` writes one file per sample (a second run adds only the
    missing ones), every needle's value is found in the memory's tokens, and `fit` prints its table."""
    from eijax.eval.key_fit import load_traces, main

    args = ["collect", "--model", str(tiny_model_dir), "--length", "600", "--sink", "16", "--window", "112",
            "--filler-keep", "32", "--out", str(tmp_path)]
    main(args + ["--samples", "2"])
    first = (tmp_path / "sample_0000.npz").stat().st_mtime_ns
    main(args + ["--samples", "3"])
    assert (tmp_path / "sample_0000.npz").stat().st_mtime_ns == first
    traces = load_traces(tmp_path)
    assert len(traces) == 3
    for tr in traces:
        assert (tr["value_tokens"] > 0).all() and tr["values"].shape == (4, tr["weight"].size)
        assert tr["weight"].sum() == pytest.approx(tr["written"])      # kept filler weighted back to its count
        assert tr["keys_ctx"].shape == (tr["keys"].shape[0], tr["weight"].size, tr["keys"][0, 0].size)
    main(["fit", str(tmp_path), "--train", "2", "--steps", "3", "--sources", "hidden,context,head0,heads_context"])
    out = capsys.readouterr().out
    assert "| 0 |" in out and "fit: hidden" in out and "fit: context" in out and "fit: head0" in out
    assert "fit: heads_context" in out
    main(["fit", str(tmp_path), "--train", "2", "--steps", "3", "--sources", "context", "--tied",
          "--kernel", "softmax_then_memory"])
    assert "fit: context" in capsys.readouterr().out


@pytest.mark.parametrize("sink", [0, 16])
def test_read_fit_collect_splits_full_attention_into_folded_and_window_parts(tiny_model_dir, tmp_path, sink):
    """`read_fit collect`: per layer, full attention over the streamed q, k, v is λ a_E + (1 - λ) a_L
    (exactly with no sink; with a sink only the sink's positions differ), the model's own output is
    its window attention until the first fold, and `fit` scores the memory's share of that gap."""
    from eijax.eval.read_fit import _load, gap_closed, main

    rng = random.Random(3)
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(" ".join(f"w{rng.randrange(300)}" for _ in range(400)))
        main(["collect", "--model", str(tiny_model_dir), "--sink", str(sink), "--window", "64",
              "--file", str(tmp_path / f"{name}.txt"), "--tokens", "300", "--out", str(tmp_path / name)])
    data = _load(tmp_path / "a", 0)
    assert data["q"].shape[0] == 300 - sink and int(data["window"].max()) == (300 - sink - 1) // 64
    first = data["window"] == 0
    np.testing.assert_allclose(data["own"][first], data["a_local"][first], atol=2e-3)  # nothing folded yet
    assert float(data["lam"][first].max()) == 0.0 and float(data["lam"][~first].min()) > 0.0
    oracle = data["lam"][..., None] * data["a_e"] + (1 - data["lam"][..., None]) * data["a_local"]
    assert gap_closed(oracle, data) > (0.999 if sink == 0 else 0.98)
    assert gap_closed(data["a_local"], data) == pytest.approx(0.0, abs=1e-6)
    if sink == 0:
        return
    rows = main(["fit", str(tmp_path / "a"), str(tmp_path / "b"), "--steps", "20", "--lr", "1e-2"])
    assert [r["layer"] for r in rows] == [0] and rows[0]["oracle"] > 0.98
    assert -1.0 < rows[0]["own"] < 1.0 and all(0.0 < rows[0][k] <= 1.0 for k in ("sigma", "hedgehog"))
    with pytest.raises(SystemExit):
        main(["fit", str(tmp_path / "a"), str(tmp_path / "b"), "--kernels", "sigma,cosine"])


def test_read_fit_linear_read_is_the_kernel_average_over_earlier_windows():
    """The fitted memory's read for a query in window w weighs every token of windows < w by φ(q)·φ(k)."""
    import jax.numpy as jnp

    from eijax.eval.read_fit import KERNELS, linear_read

    rng = np.random.default_rng(0)
    t, h, hkv, d = 11, 2, 1, 4
    window = np.repeat(np.arange(3), 4)[:t]   # the last window is short
    data = {"q": rng.standard_normal((t, h, d)), "k": rng.standard_normal((t, hkv, d)),
            "v": rng.standard_normal((t, hkv, d)), "window": window}
    data = {n: jnp.asarray(x) for n, x in data.items()}
    params = {"wq": jnp.asarray(rng.standard_normal((h, d, d))),
              "wk": jnp.asarray(rng.standard_normal((hkv, d, d)))}
    for kernel, phi in KERNELS.items():
        r, log_den = linear_read(params, data, kernel, (3, 4))
        for i in (5, 10):
            for head in range(h):
                fq = np.asarray(phi(data["q"][i, head] @ params["wq"][head]))
                w = np.array([fq @ np.asarray(phi(data["k"][j, 0] @ params["wk"][0])) if window[j] < window[i] else 0.0
                              for j in range(t)])
                np.testing.assert_allclose(r[i, head], w @ np.asarray(data["v"][:, 0]) / (w.sum() + 1e-6), rtol=1e-4)
                np.testing.assert_allclose(log_den[i, head], np.log(w.sum() + 1e-6), rtol=1e-5)


def test_joint_gate_model_computes_what_read_fit_fits(tiny_model_dir, tmp_path):
    """A model with gate "joint" (linear rule, adapter) outputs exactly read_fit's `mixed` with the same
    maps and constants: (Z_L a_L + c σ(q)ᵀM) / (Z_L + c σ(q)ᵀz) per head; with no sink the window's
    positions are the absolute ones the fit uses. `export` writes a fit into a checkpoint that loads."""
    import jax.numpy as jnp

    from eijax.config import MemoryConfig
    from eijax.eval.read_fit import _load, collect, layout, linear_read, main, mixed, set_fitted
    from eijax.generate import load_model

    mem = MemoryConfig(sink=0, window=64, rule="linear", gate="joint", adapter=True)
    model = load_model(str(tiny_model_dir), mem)
    rng = np.random.default_rng(0)
    n, h, hkv, d = model.config.n_layers, model.config.n_heads, model.config.n_kv_heads, model.config.head_dim
    fitted = {"layers": np.arange(n), "sigma_wq": np.eye(d) + 0.3 * rng.standard_normal((n, h, d, d)),
              "sigma_wk": np.eye(d) + 0.3 * rng.standard_normal((n, hkv, d, d)),
              "sigma_log_c": rng.standard_normal((n, h))}
    set_fitted(model, fitted)
    collect(model, rng.integers(0, 1000, 200).tolist(), tmp_path / "run")
    data = _load(tmp_path / "run", 0)
    params = {k: jnp.asarray(fitted[f"sigma_{k}"][0]) for k in ("wq", "wk", "log_c")}
    np.testing.assert_allclose(np.asarray(mixed(params, data, "sigma", layout(data))), np.asarray(data["own"]), atol=3e-3)
    _, log_den = linear_read(params, data, "sigma", layout(data))
    assert float(jnp.abs(log_den[data["window"] > 0]).max()) > 0.1   # the memory's mass does move the mix
    np.savez(tmp_path / "fit.npz", **fitted)
    main(["export", str(tmp_path / "fit.npz"), str(tmp_path / "joint"), "--model", str(tiny_model_dir)])
    back = load_model(str(tiny_model_dir), MemoryConfig(sink=0, window=64), str(tmp_path / "joint"))
    assert back.memory_config.gate == "joint"
    np.testing.assert_allclose(np.asarray(back.blocks.gate.bias[...]), fitted["sigma_log_c"], rtol=1e-6)
    with pytest.raises(SystemExit):   # a fit that does not cover every layer cannot be exported
        np.savez(tmp_path / "part.npz", **{**fitted, "layers": np.arange(n - 1)})
        main(["export", str(tmp_path / "part.npz"), str(tmp_path / "x"), "--model", str(tiny_model_dir)])
