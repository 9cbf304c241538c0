"""The memory mechanism, end to end: retrieval through the memory must be learnable.

A tiny model is trained from scratch with the public entry point (`eijax.train.loop.run`) on the
built-in "digitkey" task (eijax/data/synthetic.py: preamble, random words, one needle "The key is D.",
question "What is the key?") and scored by the trainer's own held-out evaluation (greedy decoding
through eijax.generate, exact match of the digit). Training mixes two context lengths:

  SHORT  context + question + answer fit in sink + window (layout rule 1): memory is irrelevant.
         This is the within-window control: it says the model and the task format can be learned.
  LONG   the context fills the sink and one segment; the question starts the next segment, so the
         needle is reachable only through the memory.

Asserted: with memory on, LONG is answered (>= 0.9); the same run with `memory.enabled=false` stays
at chance on LONG (digits are balanced, chance is 0.1); both runs learn SHORT (>= 0.8). If the first
fails and the others pass, retrieval through the memory is broken.

Settings, and why (measured on the 2-core CPU, 2026-11-29):
  * The base weights are random N(0, 0.1) (`_random_base`), not tiny-random's own 0.02 (Hugging Face's
    initializer_range): at 0.02 even the within-window task sits on a loss plateau for 350-600 steps,
    at 0.1 it is learned in about 100. Written as a Hugging Face folder and loaded with
    `model.checkpoint`, because the config has no init-scale key.
  * SHORT mixed into training: the copy circuit forms within the window and carries over to the
    memory read. LONG is answered after 150-250 steps (loss < 0.04 over both kinds); 600 steps leave
    room for SHORT, which lags in some seeds (seed 1 had SHORT at 0.5 after 400 steps).
  * gate_init 0.5 (a much stronger gradient through the memory than the default 0.05), every
    parameter trainable, learning rate 5e-3 (at 1e-2, 2 of 3 seeds never left the plateau), batch 8 (the cheapest
    per example on CPU), sink 32 (the chat header and most of the preamble: the memory holds filler
    and needle), window 64.
  * Seeds 0-4: memory on 1.0 (LONG) and 1.0 (SHORT); memory off 0.1 (LONG, chance) and 1.0 (SHORT;
    0.9 for seed 4).
  * A batch of SHORT records only is a second shape, so most runs compile the step twice (~15 s more).
    The whole file took 3 min 50 s with another job busy on the same 2 cores; one run (train, two
    compiles, eval) took 55-65 s when the machine was less loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SINK, WINDOW = 32, 64
SHORT, LONG = 45, 80      # context tokens (bytes) of the two kinds of record
STEPS = 600               # LONG learned by step 150-250 in the seeds measured; SHORT lags in some (400 was short)
EXAMPLES = 40             # held-out examples per length (a multiple of 10: digits balanced)
SEED = 0
CHANCE = 0.1

ARGS = ("model_name=tiny-random", "data.tokenizer=bytes", f"memory.sink={SINK}", f"memory.window={WINDOW}",
        "memory.remat=none", "memory.rule=linear", "memory.adapter=false", "optim.distill_weight=0.0",
        "optim.trainable=[embed,blocks,final_norm]",
        "optim.learning_rate=5e-3", "optim.warmup_steps=20", "data.tasks=[digitkey]",
        f"data.context_lengths=[{SHORT},{LONG}]", "data.batch_size=8", "data.max_segments=2", "data.buckets=[2]",
        f"run.steps={STEPS}", "run.log_every=50", "run.report=false", "checkpoint.enabled=false",
        "eval.before=false", "eval.after=true", "eval.tasks=[digitkey]", f"eval.lengths=[{SHORT},{LONG}]",
        f"eval.examples={EXAMPLES}", "eval.max_new_tokens=16")


def _random_base(folder: Path, seed: int, std: float = 0.1) -> str:
    """tiny-random's architecture with N(0, std) weights and unit norms, as a Hugging Face folder."""
    from flax import nnx
    from safetensors.numpy import save_file

    from eijax.pretrained import hf_config_of, hf_tensor_names
    from eijax.train.config_schema import load_config
    from eijax.train.loop import build_model

    model = build_model(load_config(None, ["model_name=tiny-random"]))
    block_names, top_names = hf_tensor_names(model.config.family)
    rng = np.random.default_rng(seed)
    tensors = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(str(p) for p in path)
        is_block = path[0] == "blocks"
        name, transpose = (block_names if is_block else top_names).get(path[1:] if is_block else path, (None, False))
        if name is None:
            continue  # gate, memory adapter: not part of a base checkpoint
        shape = var.shape[1:] if is_block else var.shape
        for i in range(model.config.n_layers if is_block else 1):
            value = (np.ones(shape, np.float32) if path[-1] == "scale"
                     else (std * rng.standard_normal(shape)).astype(np.float32))
            tensors[name.format(i=i)] = np.ascontiguousarray(value.T if transpose else value)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config_of(model)))
    save_file(tensors, str(folder / "model.safetensors"))
    return str(folder)


def train(tmp: Path, seed: int, memory: bool) -> dict:
    from eijax.train.config_schema import load_config
    from eijax.train.loop import run

    base = tmp / f"base{seed}"
    if not base.exists():
        _random_base(base, seed)
    # With memory off the gate is bypassed (memory is never written), so gate_init cannot change that
    # run's training. It is set near 0 there because the trainer's evaluation decodes with memory on
    # whatever memory.enabled says (Evaluator uses method "edgeinfinite"): at 0.5 the untrained
    # memory read leaks the needle into the answer of a model trained without memory.
    gate = "0.5" if memory else "0.0001"
    config = load_config(None, [*ARGS, f"model.checkpoint={base}", f"run.seed={seed}", f"memory.gate_init={gate}",
                                f"memory.enabled={str(memory).lower()}",
                                f"run.output_dir={tmp / f'run_s{seed}_memory_{memory}'}"])
    return run(config)


def check_layout() -> None:
    """The two lengths do what the assertions assume, for the eval samples themselves."""
    from eijax.data.byte_tokenizer import ByteTokenizer
    from eijax.data.layout import query_start
    from eijax.data.records import as_record, render_parts
    from eijax.data.synthetic import SyntheticSource

    from eijax.train.config_schema import load_config

    tok, seed = ByteTokenizer(), load_config(None, ARGS).eval.seed
    for length in (SHORT, LONG):
        for sample in SyntheticSource("digitkey", num_samples=EXAMPLES, seed=seed, tokenizer=tok,
                                      context_tokens=length):
            p = render_parts(as_record(sample), tok)
            c, q, total = len(p.ctx), len(p.query), len(p.ctx) + len(p.query) + len(p.answer)
            assert p.ctx.index(tok.encode(sample["target"])[0]) >= SINK  # the sink never holds the needle's digit
            if length == SHORT:  # rule 1: one window, and generation takes the plain route too
                assert total <= SINK + WINDOW
            else:  # rule 3, needle before the question's segment; generation streams
                assert c + q > SINK + WINDOW and query_start(c, total, SINK, WINDOW) == SINK + WINDOW


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    check_layout()
    tmp = tmp_path_factory.mktemp("memory_learns")
    return {memory: train(tmp, SEED, memory)["eval_after"] for memory in (True, False)}


def test_memory_retrieves_the_needle_from_an_earlier_segment(runs):
    assert runs[True][f"acc/digitkey/{LONG}"] >= 0.9, runs[True]


def test_without_memory_the_needle_is_out_of_reach(runs):
    assert abs(runs[False][f"acc/digitkey/{LONG}"] - CHANCE) <= 0.1, runs[False]


def test_within_window_control_is_learned(runs):
    # SHORT has 10 distinct prompts (preamble + needle, no room for filler), so accuracy moves in steps
    # of 0.1; "learned" is 0.8 or more (chance 0.1). Memory off it lags (one seed in five: 0.9).
    for memory in (False, True):
        assert runs[memory][f"acc/digitkey/{SHORT}"] >= 0.8, runs[memory]
