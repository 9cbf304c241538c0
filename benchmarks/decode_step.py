"""Where a JAX decode step's time goes, on the real SmolLM2 (sink 64 + window 512, 300 tokens in):
the jitted step with its layers unrolled over per-layer weights (what decode runs) and scanned over
the stacked ones (what prefill runs), the 30 scanned layers alone, the lm head alone, the step with
memory off, and the Engine's decode loop (what `eijax.generate` runs: the step plus sampling and the
host loop).

    python -m benchmarks.decode_step [--tokens 40]

Float32 decode reads every weight once per token (540 MB for SmolLM2): on a CPU the step is bound by
memory bandwidth, so the layers dominate and memory on/off changes little. `--profile N` traces N
decode steps with jax.profiler and prints the XLA ops that took the most time per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx

import eijax
from benchmarks.common import op_profile, timed, warn_if_busy
from eijax.generate import Engine, SamplingConfig
from eijax.model import split_caches, with_memory_config


def _step_fns(model):
    graphdef = nnx.graphdef(model)

    def layers(params, state, token):
        return nnx.merge(graphdef, params).prefill(state, token[:, None])

    def step(params, state, token):
        m = nnx.merge(graphdef, params)
        hidden, state = m.prefill(state, token[:, None])
        return m.logits(hidden[:, 0]), state

    def head(params, hidden):
        return nnx.merge(graphdef, params).logits(hidden)

    def unrolled(params, layer_params, state, token):  # what Engine.decode runs
        m = nnx.merge(graphdef, params)
        hidden, state = m.prefill_unrolled(layer_params, state, token[:, None])
        return m.logits(hidden[:, 0]), state

    return jax.jit(step), jax.jit(layers), jax.jit(head), jax.jit(unrolled)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=40, help="tokens decoded by the Engine loop")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (best kept)")
    p.add_argument("--calls", type=int, default=10, help="calls per round (their mean is the round's time)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="also trace N decode steps and print the top XLA ops")
    a = p.parse_args()
    warn_if_busy()
    mem = eijax.MemoryConfig(sink=64, window=512)
    model = eijax.load_pretrained("smollm2", mem)
    engine = Engine(model)
    logits, state = engine.prefill(engine.init_state(), list(range(100, 400)))
    token = jnp.asarray([5], jnp.int32)
    params = nnx.state(model)
    step, layers, head, unrolled = _step_fns(model)
    off = with_memory_config(model, dataclasses.replace(mem, enabled=False))
    step_off = _step_fns(off)[0]
    cases = [("jitted step, layers unrolled", unrolled, (params, engine.layer_params, split_caches(state), token)),
             ("jitted step, layers scanned", step, (params, state, token)),
             ("  30 layers", layers, (params, state, token)),
             ("  lm head", head, (params, jnp.ones((1, model.config.d_model), jnp.float32))),
             ("jitted step, scanned, memory off", step_off, (nnx.state(off), state, token))]
    # Interleaved rounds of `--calls` calls each, best round kept: on a shared 2-core machine a
    # single call's time swings by 2x, and a slow spell should hit every case alike.
    best = {name: float("inf") for name, _, _ in cases}
    for _ in range(a.rounds):
        for name, fn, args in cases:
            best[name] = min(best[name], timed(fn, *args, repeats=1, calls=a.calls)[0])
    rows = list(best.items())
    list(engine.decode(state, logits, SamplingConfig(max_new_tokens=4)))  # compile the loop's steps
    logits, state = engine.prefill(engine.init_state(), list(range(100, 400)))  # decode donated the state
    t = time.perf_counter()
    n = sum(1 for _ in engine.decode(state, logits, SamplingConfig(max_new_tokens=a.tokens)))
    rows.append((f"Engine.decode loop ({n} tokens)", (time.perf_counter() - t) / n))
    for name, seconds in rows:
        print(f"{name:34s} {seconds * 1e3:8.1f} ms")
    if a.profile:
        logits, state = engine.prefill(engine.init_state(), list(range(100, 400)))
        print(f"\nXLA ops over {a.profile} Engine decode steps (ms per step summed over threads, calls per step):")
        run = lambda: list(engine.decode(state, logits, SamplingConfig(max_new_tokens=a.profile + 1)))
        for name, ms, n in op_profile(run, a.profile):
            print(f"  {name:40s} {ms:8.2f} ms  x{n}")


if __name__ == "__main__":
    main()
