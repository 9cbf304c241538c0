"""Forward pass over a long input: eijax (jit, EdgeInfinite segments) vs transformers (eager, full
attention), same weights, same machine, one run. Also prints compile time and the fraction of
parameters each gate type trains.

    python benchmarks/forward_4k.py [--model smollm2] [--tokens 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import eijax
from eijax.checkpoint import read_checkpoint
from benchmarks.common import warn_if_busy


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def gate_fractions(model_name: str) -> None:
    hf_config, _ = read_checkpoint(model_name)
    config = eijax.model_config_from_hf(hf_config)
    for gate in ("linear", "head_linear", "scalar"):
        abstract = nnx.eval_shape(lambda: eijax.build_model(config, eijax.MemoryConfig(gate=gate)))
        n_gate = _count(nnx.state(abstract, nnx.PathContains("gate")))
        n_base = _count(nnx.state(abstract, nnx.Not(nnx.PathContains("gate"))))
        print(f"gate={gate:<12} trainable {n_gate:>9,d} of {n_base:,d} base params = {100 * n_gate / n_base:.4f}%")


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=512)
    args = ap.parse_args()
    warn_if_busy()

    gate_fractions(args.model)
    mem = eijax.MemoryConfig(sink=args.sink, window=args.window)
    model = eijax.load_pretrained(args.model, mem)
    ids = np.random.RandomState(0).randint(0, model.config.vocab_size, (1, args.tokens)).astype(np.int32)
    tokens, valid = eijax.pad_to_layout(jnp.asarray(ids), mem)
    graph, params = nnx.split(model)
    fwd = jax.jit(lambda p, t, v: nnx.merge(graph, p).forward(t, v))  # hidden states: logits are the same for both

    t0 = time.perf_counter()
    compiled = fwd.lower(params, tokens, valid).compile()
    compile_s = time.perf_counter() - t0
    n_seg = (tokens.shape[1] - mem.sink) // mem.window
    print(f"eijax compile: {compile_s:.1f} s ({n_seg} segments of {mem.window}, sink {mem.sink})")
    compiled(params, tokens, valid).block_until_ready()
    eijax_s = _median_time(lambda: compiled(params, tokens, valid).block_until_ready(), args.repeats)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config, tensors = read_checkpoint(args.model)
    config = AutoConfig.for_model(**hf_config)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    x = torch.from_numpy(ids).long()
    with torch.no_grad():
        hf.model(x)  # warm-up
        torch_s = _median_time(lambda: hf.model(x), args.repeats)
    print(f"forward {args.tokens} tokens: eijax jit {eijax_s:.2f} s | transformers eager (full attention) "
          f"{torch_s:.2f} s | ratio transformers/eijax {torch_s / eijax_s:.2f}x")


if __name__ == "__main__":
    main()
