"""The default S-SFT train step (`python train.py`'s config, the real SmolLM2): tokens/s and achieved
FLOP/s as a fraction of this machine's measured matmul peak, for the step as it was ("before") and
as it is, measured in one run on the same batches.

  before  remat per segment, lm head on every slot, the question segment kept at full window, the
          layers scanned
  scan    the trainer's step with its layers scanned (`memory.layer_loop=scan`; shown where "auto"
          unrolls them, i.e. on CPU)
  after   the trainer's step: remat "auto" (none on CPU), lm head on answer tokens only, the last
          segment cut to the slots it uses (eijax.train.step.prepare_batch), no backward through the
          sink and segment 0 when only the memory path trains (EdgeInfiniteLM.forward frozen_local),
          layers unrolled on CPU (MemoryConfig.layer_loop "auto")

All run the current `EdgeInfiniteLM.forward` (layer-major: each layer's weights read once per pass,
not once per segment); "before" reproduces the step-level changes only, so to see the forward's own
gain run this script on a checkout from before it (docs/performance.md did, back to back).
All give the same loss (checked here). FLOPs counted are only those a step needs
(`eijax.train.flops.step_flops`: forward and activation-backward matmuls over the real slots, the lm
head over answer tokens), the same count for both, so the fraction of peak is comparable.

    python -m benchmarks.ssft_step                  # ~5 minutes on 2 cores
    python -m benchmarks.ssft_step memory.adapter=false "optim.trainable=[gate]" memory.rule=linear \
        optim.distill_weight=0 data.context_lengths=[700]    # the gate-only step issue 9 measured
    python -m benchmarks.ssft_step --batches 2 --repeats 1 key=value ...   # config overrides
    python -m benchmarks.ssft_step --skip-before --profile    # + where the step's time goes, by XLA op kind
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import op_profile, warn_if_busy
from eijax.train.config_schema import load_config
from eijax.train.flops import matmul_peak_flops, step_flops
from eijax.train.step import loss_fn, prepare_batch


def before_batch(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The old step's inputs: every slot kept and every slot through the lm head (mask = weight)."""
    b, n = local["tokens"].shape
    return dict(tokens=local["tokens"], valid=local["valid"], loss_index=np.tile(np.arange(n, dtype=np.int32), (b, 1)),
                loss_labels=local["labels"].astype(np.int32), loss_weight=local["loss_mask"].astype(np.float32))


def grad_step(model, patterns, chunk: int, skip_frozen: bool, distill_weight: float):
    from eijax.train.optim import memory_path_only, split_trainable

    graphdef, trainable, frozen = split_trainable(model, patterns)
    frozen_local = skip_frozen and memory_path_only(trainable)
    trainable, frozen = nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)

    @jax.jit
    def step(trainable, frozen, batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, graphdef, batch, chunk,
                                                                     frozen_local, distill_weight)
        return loss, grads

    return step, trainable, frozen


def measure(step, trainable, frozen, batches, repeats: int) -> tuple[float, list[float]]:
    """(seconds for one pass over the batches, best of `repeats` per batch; losses)."""
    total, losses = 0.0, []
    for b in batches:
        b = {k: jnp.asarray(v) for k, v in b.items()}
        jax.block_until_ready(step(trainable, frozen, b))  # compile + warm-up
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            loss, _ = jax.block_until_ready(step(trainable, frozen, b))
            best = min(best, time.perf_counter() - t)
        total += best
        losses.append(float(loss))
    return total, losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=4, help="batches from the default data stream")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per batch (best is kept)")
    p.add_argument("--skip-before", action="store_true", help="time only the current step")
    p.add_argument("--profile", action="store_true", help="also trace one step of the first batch and print its "
                   "slowest XLA op kinds (summed over threads)")
    p.add_argument("overrides", nargs="*", help="config key=value overrides (as for train.py)")
    a = p.parse_args()
    warn_if_busy()
    from eijax.data.pipeline import make_iterator
    from eijax.train.loop import build_model, data_config, load_tokenizer_for

    config = load_config(None, a.overrides)
    mem = config.memory
    model = build_model(config)
    it = make_iterator(data_config(config), load_tokenizer_for(config))
    raw = [next(it) for _ in range(a.batches)]
    real = sum(int(r["valid"].sum()) for r in raw)
    after = [prepare_batch(r, mem.sink, mem.window) for r in raw]
    w = config.optim.distill_weight
    beyond = lambda b: int((b["valid"][:, mem.sink + mem.window:]).sum()) if w else 0  # tokens the KL covers
    needed = sum(step_flops(model.config, mem, b["tokens"].shape[1] * b["tokens"].shape[0],
                            int(b["loss_weight"].sum()), beyond(b)) for b in after)
    peak = matmul_peak_flops()
    chunk = config.optim.loss_chunk or mem.window
    print(f"{config.model_name}, sink {mem.sink}, window {mem.window}, batch {config.data.batch_size}, "
          f"{a.batches} batches: {real} real tokens, slots {sum(r['tokens'].size for r in raw)} (before) / "
          f"{sum(b['tokens'].size for b in after)} (after); trainable {list(config.optim.trainable)}, "
          f"rule {mem.rule}, distill_weight {w}")
    print(f"measured float32 matmul peak {peak / 1e9:.1f} GFLOP/s; FLOPs a pass needs {needed / 1e9:.1f} G; "
          f"remat auto -> {mem.resolved_remat()!r}, layer loop -> {mem.resolved_layer_loop()!r} on {jax.default_backend()}")
    rows = {}
    variants = []
    if not a.skip_before:
        old = dataclasses.replace(mem, remat="segment", layer_loop="scan")
        variants.append(("before", old, [before_batch(r) for r in raw], False))
        if mem.resolved_layer_loop() == "unroll":
            variants.append(("scan", dataclasses.replace(mem, layer_loop="scan"), after, True))
    variants.append(("after", mem, after, True))
    for name, m, batches, skip_frozen in variants:
        from eijax.model import with_memory_config

        step, trainable, frozen = grad_step(with_memory_config(model, m), config.optim.trainable, chunk, skip_frozen, w)
        secs, losses = measure(step, trainable, frozen, batches, a.repeats)
        rows[name] = (secs, losses)
        print(f"{name:>7}: {secs:7.2f} s per pass, {real / secs:7.1f} real tokens/s, "
              f"{needed / secs / 1e9:6.1f} GFLOP/s = {needed / secs / peak:.2f} of peak; losses "
              + " ".join(f"{x:.4f}" for x in losses), flush=True)
        if a.profile and name == "after":
            first = {k: jnp.asarray(v) for k, v in batches[0].items()}
            print("  where one step's time goes (ms per step, calls; summed over threads):")
            for kind, ms, calls in op_profile(lambda: jax.block_until_ready(step(trainable, frozen, first)), 1):
                print(f"    {kind:<40} {ms:9.1f} {calls:6d}")
    for name in ("before", "scan"):
        if name in rows:
            (t0, l0), (t1, l1) = rows[name], rows["after"]
            print(f"speed-up after/{name}: x{t0 / t1:.2f} (same losses: {np.allclose(l0, l1, rtol=1e-4, atol=1e-5)})")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
