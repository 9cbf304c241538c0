"""eijax S-SFT step vs the same model in PyTorch eager, same machine, same run.

Both sides: SmolLM2-shaped model with identical parameters (convert.weights.to_torch), one
sequence of sink + n segments, gate-only gradients, next-token cross-entropy on the last segment
(logits over every position, as the trainer does). eijax: the trainer's loss under jax.jit
(remat=none, like eager); PyTorch: convert.torch_model.EdgeInfiniteTorch (the export twin) run
eagerly, segment by segment, loss.backward(). The losses are checked to agree.
(transformers has no EdgeInfinite layer, so the project's own PyTorch twin is the eager model.)

    python -m benchmarks.torch_vs_jax                      # defaults: a few minutes
    python -m benchmarks.torch_vs_jax --layers 30 --segments 8
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import smollm2_shaped, timed, warn_if_busy
from benchmarks.ssft_step import gate_step, make_batch
from eijax.config import MemoryConfig


def torch_step(twin, batch: dict[str, np.ndarray]):
    import torch
    import torch.nn.functional as F

    mem = twin.memory_config
    tokens = torch.from_numpy(np.array(batch["tokens"])).long()
    labels = torch.from_numpy(np.array(batch["labels"])).long()
    mask = torch.from_numpy(np.array(batch["loss_mask"]))
    state = twin.init_state(1)
    hs = []
    if mem.sink:
        h, state = twin.prefill(state, tokens[:, :mem.sink])
        hs.append(h)
    for lo in range(mem.sink, tokens.shape[1], mem.window):
        h, state = twin.step_segment(state, tokens[:, lo:lo + mem.window])
        hs.append(h)
    logits = twin.logits(torch.cat(hs, dim=1))
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    loss = (ce * mask.flatten()).sum() / mask.sum()
    loss.backward()
    return loss.item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--segments", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    warn_if_busy()
    import torch

    from convert.weights import to_torch

    mem = MemoryConfig(sink=a.sink, window=a.window, remat="none")
    model = smollm2_shaped(mem, a.layers)
    batch = make_batch(mem, a.segments, model.config.vocab_size)
    step, trainable, frozen = gate_step(model)
    t = time.perf_counter()
    compiled = step.lower(trainable, frozen, batch).compile()
    compile_s = time.perf_counter() - t
    jax_s, (jax_loss, _) = timed(compiled, trainable, frozen, batch, repeats=a.repeats)

    twin = to_torch(model)
    for name, prm in twin.named_parameters():
        prm.requires_grad_("gate" in name)
    torch_loss = torch_step(twin, batch)  # warm-up
    best = float("inf")
    for _ in range(a.repeats):
        twin.zero_grad(set_to_none=True)
        t = time.perf_counter()
        torch_loss = torch_step(twin, batch)
        best = min(best, time.perf_counter() - t)
    n = int(batch["tokens"].size)
    print(f"SmolLM2 width, {a.layers} layers, {n} tokens (sink {a.sink} + {a.segments} x {a.window}), gate-only grads; "
          f"torch threads {torch.get_num_threads()}")
    print(f"eijax (jit) step  {jax_s:.3f} s   (compile {compile_s:.1f} s)   loss {float(jax_loss):.5f}")
    print(f"torch eager step  {best:.3f} s                      loss {torch_loss:.5f}")
    print(f"ratio torch / eijax step time: {best / jax_s:.2f}   |loss diff| {abs(torch_loss - float(jax_loss)):.2e}")


if __name__ == "__main__":
    main()
