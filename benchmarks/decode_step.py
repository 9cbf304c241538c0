"""Where a JAX decode step's time goes, on the real SmolLM2 (sink 64 + window 512, 300 tokens in):
the jitted step, its 30 layers alone, the lm head alone, the step with memory off, and the Engine's
decode loop (what `eijax.generate` runs: the step plus sampling and the host loop).

    python -m benchmarks.decode_step [--tokens 40]

Float32 decode reads every weight once per token (540 MB for SmolLM2): on a CPU the step is bound by
memory bandwidth, so the layers dominate and memory on/off changes little.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx

import eijax
from benchmarks.common import timed, warn_if_busy
from eijax.generate import Engine, SamplingConfig
from eijax.model import with_memory_config


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

    return jax.jit(step), jax.jit(layers), jax.jit(head)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=40, help="tokens decoded by the Engine loop")
    a = p.parse_args()
    warn_if_busy()
    mem = eijax.MemoryConfig(sink=64, window=512)
    model = eijax.load_pretrained("smollm2", mem)
    engine = Engine(model)
    logits, state = engine.prefill(engine.init_state(), list(range(100, 400)))
    token = jnp.asarray([5], jnp.int32)
    params = nnx.state(model)
    step, layers, head = _step_fns(model)
    off = with_memory_config(model, dataclasses.replace(mem, enabled=False))
    step_off = _step_fns(off)[0]
    rows = [("jitted step (layers + lm head)", timed(step, params, state, token)[0]),
            ("  30 layers", timed(layers, params, state, token)[0]),
            ("  lm head", timed(head, params, jnp.ones((1, model.config.d_model), jnp.float32))[0]),
            ("jitted step, memory off", timed(step_off, nnx.state(off), state, token)[0])]
    list(engine.decode(state, logits, SamplingConfig(max_new_tokens=4)))  # compile the loop's steps
    logits, state = engine.prefill(engine.init_state(), list(range(100, 400)))  # decode donated the state
    t = time.perf_counter()
    n = sum(1 for _ in engine.decode(state, logits, SamplingConfig(max_new_tokens=a.tokens)))
    rows.append((f"Engine.decode loop ({n} tokens)", (time.perf_counter() - t) / n))
    for name, seconds in rows:
        print(f"{name:34s} {seconds * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
