"""Generate text with the LiteRT graphs of one scenario (ai-edge-litert, CPU).

    python -m convert.run_litert --model exports/qa_float32.tflite --prompt "Who is Anne?" [--document book.txt]
    python -m convert.run_litert --model exports/qa_float32.tflite --synthetic-length 4096 --max-new-tokens 32

An input of any length is streamed through prefill chunks, compress and decode (convert.litert_runtime);
reports time to first token and decode tokens/s. `--compare-eijax CHECKPOINT` also runs eijax's
generator (same sink/window/memory) and checks that the greedy tokens are equal.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Sequence

import numpy as np

from eijax import cli

from convert.litert_runtime import LiteRTModel, Streamer


def run(streamer: Streamer, prompt: list[int], question: list[int] | None, max_new_tokens: int,
        stop_ids: Sequence[int] = ()) -> dict:
    """Greedy generation with timings: time to first token (prefill + first pick) and decode tokens/s.

    Each signature is called once first (XNNPACK packs its weights on a signature's first call);
    that one-off cost is reported as warmup_s, not counted in the timings.
    """
    t0 = time.perf_counter()
    warm(streamer.model)
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens, t_first = [], None
    for token in streamer.generate(prompt, max_new_tokens, stop_ids, question=question):
        if t_first is None:
            t_first = time.perf_counter()
        tokens.append(token)
    t_end = time.perf_counter()
    n_prompt = len(prompt) + len(question or [])
    decode_s = t_end - (t_first or t_end)
    return dict(tokens=tokens, prompt_tokens=n_prompt, warmup_s=warmup, time_to_first_token_s=(t_first or t_end) - t0,
                decode_tokens_per_s=(len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else None)


def warm(model: LiteRTModel) -> None:
    state = model.init_state()
    for t in model.chunks:
        model.prefill(state, np.zeros((model.batch, t), np.int32), np.full((model.batch,), t, np.int32))
    model.prefill(state, np.zeros((model.batch, 1), np.int32), np.ones((model.batch,), np.int32))
    model.compress(state)


def eijax_tokens(checkpoint: str, meta: dict, prompt: list[int], question: list[int] | None, max_new_tokens: int,
                 stop_ids: Sequence[int]) -> list[int]:
    """Greedy tokens from eijax.generate with the scenario's memory config (the reference)."""
    from eijax.generate import Generator, SamplingConfig
    from convert.loading import load_model
    from convert.scenarios import Scenario

    scenario = Scenario(meta["scenario"], meta["sink"], meta["window"], tuple(meta["chunks"]), meta["decode_batch"],
                        meta["memory"])
    model = load_model(checkpoint, scenario.memory_config())
    gen = Generator(model, "edgeinfinite" if scenario.memory else "streaming", chunk_sizes=scenario.chunks)
    out = gen.generate(prompt, SamplingConfig(max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids)), question=question)
    return list(out.tokens)


@cli.main_guard
def main(argv: Sequence[str] | None = None) -> None:
    p = cli.ArgumentParser(prog="python -m convert.run_litert", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help=".tflite written by convert.to_litert (its .json beside it)")
    p.add_argument("--prompt", help="user message (the question in document mode)")
    p.add_argument("--document", help="text file: document + question, question-last as in S-SFT")
    p.add_argument("--synthetic-length", type=int, default=0,
                   help="instead of --prompt: a passkey prompt of about this many tokens (timing runs)")
    p.add_argument("--tokenizer", help="tokenizer source (default: the one recorded in the model's .json)")
    p.add_argument("--raw", action="store_true", help="no chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compare-eijax", metavar="CHECKPOINT", help="also generate with eijax and compare greedy tokens")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    a = p.parse_args(argv)
    if not (a.prompt or a.synthetic_length):
        raise cli.InputError("give --prompt or --synthetic-length")
    document = cli.existing_file(a.document, "--document").read_text(encoding="utf-8") if a.document else ""

    from eijax.generate import prompt_parts, stop_ids
    from eijax.tokenizer import load_tokenizer

    model = LiteRTModel(cli.existing_file(a.model, "--model"), num_threads=a.threads)
    source = a.tokenizer or model.meta.get("tokenizer")
    if not source:
        raise cli.InputError(f"{model.path} records no tokenizer (no {model.path.with_suffix('.json').name}?): "
                             "pass --tokenizer")
    tok = load_tokenizer(source)
    if a.synthetic_length:
        from eijax.data.synthetic import passkey_sample

        sample = passkey_sample(0, seed=0, tokenizer=tok, context_tokens=a.synthetic_length)
        document, question_text = sample["context"], sample["instruction"]
    else:
        question_text = a.prompt
    if a.raw:
        prompt, question = tok.encode(document, add_special_tokens=False), tok.encode(question_text, add_special_tokens=False)
    else:
        prompt, question = prompt_parts(tok, question_text, document)
    stops = stop_ids(tok)
    result = run(Streamer(model), prompt, question, a.max_new_tokens, stops)
    result["text"] = tok.decode(result["tokens"])
    if a.compare_eijax:
        reference = eijax_tokens(a.compare_eijax, model.meta, prompt, question, a.max_new_tokens, stops)
        result["eijax_tokens_equal"] = reference == result["tokens"]
        result["eijax_text"] = tok.decode(reference)
    if a.json:
        print(json.dumps(result))
    else:
        print(result["text"])
        tps = result["decode_tokens_per_s"]
        print(f"[litert {model.path.name}] prompt {result['prompt_tokens']} tokens, time to first token "
              f"{result['time_to_first_token_s']:.2f}s, decode {tps and f'{tps:.1f}'} tokens/s"
              + (f", equals eijax: {result['eijax_tokens_equal']}" if a.compare_eijax else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
