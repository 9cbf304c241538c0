"""One table over the quantisation recipes of a scenario: size, logit error and next-token
agreement against the float32 graph, and passkey accuracy at a length inside sink + window (the
quantised base model's own ability) and one beyond it (what the memory retrieves).

    python -m convert.evaluate_recipes --dir exports/smollm2 --scenario qa [--passkey-samples 5]

Logit error and agreement are teacher-forced: a real text is prefilled in chunks, then fed one
token at a time through `decode` (crossing at least one compress), and every decode call's logits
are compared with the float graph's on the same tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from eijax import cli

from convert.litert_runtime import LiteRTModel, Streamer


def teacher_forced_logits(model: LiteRTModel, tokens: Sequence[int], n_prefill: int) -> np.ndarray:
    """Logits [len(tokens) - n_prefill, V]: row j predicts tokens[n_prefill + j + 1]."""
    streamer = Streamer(model)
    logits, state = streamer.prefill(model.init_state(), tokens[:n_prefill], model.prime_point(len(tokens)))
    rows = [logits]
    for token in tokens[n_prefill:-1]:
        logits, state = streamer.decode_step(state, int(token))
        rows.append(logits)
    return np.stack(rows)


def compare_logits(test: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    return dict(logit_rel_err=float(np.abs(test - reference).max() / np.abs(reference).max()),
                next_token_agreement=float(np.mean(test.argmax(-1) == reference.argmax(-1))))


def passkey_accuracy(model: LiteRTModel, tokenizer, samples: Sequence[dict], max_new_tokens: int = 12) -> float:
    from eijax.data.synthetic import score_answer
    from eijax.generate import prompt_parts, stop_ids

    streamer, hits = Streamer(model), 0
    for sample in samples:
        prompt, question = prompt_parts(tokenizer, sample["instruction"], sample["context"])
        tokens = list(streamer.generate(prompt, max_new_tokens, stop_ids(tokenizer), question=question))
        hits += score_answer("passkey", tokenizer.decode(tokens), sample)
    return hits / max(len(samples), 1)


def evaluate(paths: dict[str, Path], tokens: Sequence[int], n_prefill: int, tokenizer=None,
             passkey_sets: dict[str, Sequence[dict]] | None = None) -> list[dict]:
    """A row per recipe; the float32 graph is the reference. `passkey_sets`: {column: samples}."""
    float_model = LiteRTModel(paths["float32"])
    reference = teacher_forced_logits(float_model, tokens, n_prefill)
    rows = []
    for name, path in paths.items():
        model = float_model if name == "float32" else LiteRTModel(path)
        logits = reference if name == "float32" else teacher_forced_logits(model, tokens, n_prefill)
        row = dict(recipe=name, bytes=path.stat().st_size, **compare_logits(logits, reference))
        if tokenizer is not None:
            for column, samples in (passkey_sets or {}).items():
                row[column] = passkey_accuracy(model, tokenizer, samples)
        rows.append(row)
        del model  # one quantised graph alive at a time (XNNPACK packs weights per signature: GBs on gemma-3-270m)
    return rows


def markdown(rows: list[dict]) -> str:
    keys = ["recipe", "bytes", "logit_rel_err", "next_token_agreement"] + [k for k in rows[0] if k.startswith("passkey")]
    fmt = lambda k, v: f"{v / 2**20:.1f} MiB" if k == "bytes" else f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(k, r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


@cli.main_guard
def main(argv: Sequence[str] | None = None) -> None:
    p = cli.ArgumentParser(prog="python -m convert.evaluate_recipes", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True, help="folder with <scenario>_<recipe>.tflite from convert.to_litert")
    p.add_argument("--scenario", required=True)
    p.add_argument("--text-tokens", type=int, default=0, help="teacher-forced text length (default: cache + 64)")
    p.add_argument("--decode-tokens", type=int, default=96, help="how many of them go through decode")
    p.add_argument("--passkey-samples", type=int, default=0, help="samples per passkey length (0: no passkey columns)")
    p.add_argument("--passkey-lengths", type=int, nargs="+", default=[],
                   help="context tokens per column (default: 0.7 x and 2 x the cache size: inside and beyond the window)")
    a = p.parse_args(argv)
    from eijax.data.synthetic import filler_sentences, passkey_sample
    from eijax.tokenizer import load_tokenizer

    if not Path(a.dir).is_dir():
        raise cli.MissingInput(f"--dir {a.dir!r}: no such folder")
    paths = {f.stem[len(a.scenario) + 1:]: f for f in sorted(Path(a.dir).glob(f"{a.scenario}_*.tflite"))}
    if "float32" not in paths:
        raise cli.MissingInput(f"no {a.scenario}_float32.tflite in {a.dir} (write it with python -m convert.to_litert)")
    if not paths["float32"].with_suffix(".json").is_file():
        raise cli.MissingInput(f"{paths['float32'].with_suffix('.json')} is missing (convert.to_litert writes it "
                               "beside the .tflite)")
    meta = json.loads(paths["float32"].with_suffix(".json").read_text())
    tok = load_tokenizer(meta["tokenizer"])
    cache = meta["sink"] + meta["window"]
    n_text = a.text_tokens or cache + 64
    text = " ".join(filler_sentences()[100:100 + n_text // 10])
    tokens = tok.encode(text, add_special_tokens=False)[:n_text]
    lengths = a.passkey_lengths or [int(0.7 * cache), 2 * cache]
    passkey_sets = {f"passkey@{n}": [passkey_sample(i, seed=1, tokenizer=tok, context_tokens=n) for i in range(a.passkey_samples)]
                    for n in lengths} if a.passkey_samples else {}
    rows = evaluate(paths, tokens, len(tokens) - a.decode_tokens, tok, passkey_sets)
    print(markdown(rows))
    print(json.dumps(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
