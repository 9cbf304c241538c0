"""S-SFT train step vs number of segments: time and compiled peak memory, with and without remat,
and the step's FLOP/s as a fraction of this machine's measured float32 matmul peak.

The step is the trainer's loss (eijax.train.step.loss_fn: chunked cross-entropy on answer tokens)
differentiated with respect to the gate only, at batch 1; the answer is the last segment. Memory is
XLA's compiled temp allocation (memory_analysis), which is what grows with the sequence.

    python -m benchmarks.ssft_step                        # defaults: a few minutes
    python -m benchmarks.ssft_step --layers 30 --segments 1,2,4,8,16 --window 512
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import smollm2_shaped, timed
from eijax.train.flops import matmul_peak_flops
from eijax.config import MemoryConfig


def make_batch(memory: MemoryConfig, n_segments: int, vocab: int, seed: int = 0) -> dict[str, jax.Array]:
    n = memory.sink + n_segments * memory.window
    tokens = np.random.RandomState(seed).randint(0, vocab, (1, n)).astype(np.int32)
    labels = np.roll(tokens, -1, axis=1)
    mask = np.zeros((1, n), np.float32)
    mask[:, -memory.window:-1] = 1.0  # the answer: the last segment
    return dict(tokens=jnp.asarray(tokens), valid=jnp.ones((1, n), bool), labels=jnp.asarray(labels),
                loss_mask=jnp.asarray(mask))


def gate_step(model, chunk: int = 128):
    """(jitted step(trainable, frozen, batch) -> (loss, grads), trainable, frozen)."""
    from eijax.train.step import loss_fn

    graphdef, trainable, frozen = nnx.split(model, nnx.PathContains("gate"), ...)

    def step(trainable, frozen, batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, graphdef, batch, chunk)
        return loss, grads

    return jax.jit(step), trainable, frozen


def model_flops(model, n_tokens: int) -> float:
    """Analytic model FLOPs of one step (the trainer's count; XLA's cost_analysis counts a scan body
    once, not once per segment, so it cannot be used here)."""
    from eijax.train.flops import model_flops_per_token

    return model_flops_per_token(model.config, model.memory_config) * n_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--segments", default="1,2,4,8")
    p.add_argument("--remat", default="none,segment")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    peak = matmul_peak_flops()
    print(f"SmolLM2 width, {a.layers} layers, sink {a.sink}, window {a.window}; batch 1; gate-only grads")
    print(f"measured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'remat':>8} {'segments':>8} {'step s':>8} {'temp MB':>8} {'GFLOP':>8} {'GFLOP/s':>8} {'of peak':>8}")
    res = {}
    for remat in a.remat.split(","):
        mem = MemoryConfig(sink=a.sink, window=a.window, remat=remat)
        model = smollm2_shaped(mem, a.layers)
        step, trainable, frozen = gate_step(model)
        for n in [int(x) for x in a.segments.split(",")]:
            batch = make_batch(mem, n, model.config.vocab_size)
            compiled = step.lower(trainable, frozen, batch).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
            secs, (loss, _) = timed(compiled, trainable, frozen, batch, repeats=a.repeats)
            flops = model_flops(model, int(batch['tokens'].size))
            res[(remat, n)] = (secs, temp, flops)
            print(f"{remat:>8} {n:>8} {secs:>8.3f} {temp:>8.1f} {flops / 1e9:>8.1f} {flops / secs / 1e9:>8.1f} "
                  f"{flops / secs / peak:>8.2f}", flush=True)
    print("\nratios vs the 1st segment count (time should grow ~linearly; memory flat with remat):")
    for remat in a.remat.split(","):
        ns = sorted(n for r, n in res if r == remat)
        t0, m0, _ = res[(remat, ns[0])]
        print(f"  remat={remat:8s} " + "  ".join(
            f"n={n}: time x{res[(remat, n)][0] / t0:.2f} mem x{res[(remat, n)][1] / m0:.2f}" for n in ns))


if __name__ == "__main__":
    main()
