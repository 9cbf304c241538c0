"""Long-stream soak of the compressive memory: N tokens through sink + window + memory, checking that
M, z and the logits stay finite, how z grows, and how far float32 memory drifts from a float64 run
of the same stream (the float32 horizon).

The stream is random tokens through a tiny random model (or `--model smollm2`), one window-sized
segment per jitted step (`EdgeInfiniteLM.step_segment`: prefill into the empty window, then fold it
into memory). Every `--report-every` tokens it prints max |z|, max |M|, the relative drift of z and
of the last logits against the float64 twin, and whether everything is finite.

    python -m benchmarks.memory_soak --tokens 1000000              # tiny model, ~1-2 min
    python -m benchmarks.memory_soak --model smollm2 --tokens 100000 --window 256
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def build(model_name: str, memory, dtype: str):
    if model_name == "tiny":
        from eijax.testing import tiny_eijax_model

        return tiny_eijax_model("llama", memory, dtype=dtype)
    from eijax.pretrained import load_pretrained

    return load_pretrained(model_name, memory, dtype=dtype, param_dtype=dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny' (random tiny llama) or a model name/path")
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--sink", type=int, default=8)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--rule", default="linear", choices=("linear", "delta"))
    p.add_argument("--report-every", type=int, default=100_000)
    p.add_argument("--no-float64", action="store_true", help="skip the float64 twin (no drift column)")
    a = p.parse_args()
    import eijax

    mem = eijax.MemoryConfig(sink=a.sink, window=a.window, rule=a.rule)
    jax.config.update("jax_enable_x64", not a.no_float64)
    runs = {"float32": build(a.model, mem, "float32")}
    if not a.no_float64:
        runs["float64"] = build(a.model, mem, "float64")
    step = nnx.jit(lambda m, s, t: m.step_segment(s, t))
    logits = nnx.jit(lambda m, h: m.logits(h[:, -1]))
    vocab = runs["float32"].config.vocab_size
    rng = np.random.RandomState(0)
    states = {k: m.init_state(1) for k, m in runs.items()}
    sink = jnp.asarray(rng.randint(0, vocab, (1, a.sink)), jnp.int32)
    for k, m in runs.items():
        _, states[k] = nnx.jit(lambda m, s, t: m.prefill(s, t))(m, states[k], sink)
    print(f"{a.model}, sink {a.sink}, window {a.window}, rule {a.rule}: {a.tokens:,} tokens")
    print(f"{'tokens':>10} {'max|z|':>10} {'max|M|':>10} {'z drift':>9} {'logit drift':>11} {'finite':>6} {'s':>6}")
    t0, seen = time.perf_counter(), 0
    while seen < a.tokens:
        seg = jnp.asarray(rng.randint(0, vocab, (1, a.window)), jnp.int32)
        out = {}
        for k, m in runs.items():
            h, states[k] = step(m, states[k], seg)
            out[k] = h
        seen += a.window
        if seen % a.report_every < a.window or seen >= a.tokens:
            s32 = states["float32"].memory
            z32, m32 = np.asarray(s32.z, np.float64), np.asarray(s32.M, np.float64)
            l32 = np.asarray(logits(runs["float32"], out["float32"]), np.float64)
            finite = bool(np.isfinite(z32).all() and np.isfinite(m32).all() and np.isfinite(l32).all())
            zd = ld = float("nan")
            if "float64" in runs:
                z64 = np.asarray(states["float64"].memory.z)
                l64 = np.asarray(logits(runs["float64"], out["float64"]))
                zd = float(np.abs(z32 - z64).max() / np.abs(z64).max())
                ld = float(np.abs(l32 - l64).max() / np.abs(l64).max())
            print(f"{seen:>10,} {np.abs(z32).max():>10.3g} {np.abs(m32).max():>10.3g} {zd:>9.2e} {ld:>11.2e} "
                  f"{str(finite):>6} {time.perf_counter() - t0:>6.0f}", flush=True)
    per_token = np.abs(np.asarray(states["float32"].memory.z, np.float64)).max() / seen
    print(f"max|z| grows ~{per_token:.3g} per token (linear: z sums σ(k) >= 0; the read divides by it, so "
          f"only precision matters, not range). A single token's share of z falls below float32 resolution "
          f"after 2^24 = 16.8M tokens, but writes add whole-window sums, which stay resolvable for 2^24 "
          f"segments ({a.window} x 16.8M tokens); the drift columns show the accumulated error.")

if __name__ == "__main__":
    main()
