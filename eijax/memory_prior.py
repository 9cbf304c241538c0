"""The memory prior (MemoryConfig.prior): what a long prompt's memory starts from instead of zeros.

Why: a trained SmolLM2 memory recalled needles in later writes ~0.8 of the time but in the first
write (the first window folded into an empty memory) 2 of 22 (docs/memory-training.md). That window
is computed with the memory bypassed and written into M = 0, unlike every later one. Starting the
memory from a prior, and reading it from the first token after the sink, makes the first window like
the others: with stage 7's weights, first-write recall at 1K went from 0-1 of 12 to 9 of 12 with no
training.

The prior is the memory the model itself leaves after one window of a fixed primer text (Persuasion,
the synthetic fillers' novel, never the held-out perplexity text): `python -m eijax.memory_prior`
streams `sink + window` primer tokens through an empty memory and stores the result per layer in
the memory path (`blocks.memory_prior.M`, `.z`), so it ships in memory files like the rest of it.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from eijax.data.synthetic import ASSET as PRIMER_TEXT
from eijax.model import EdgeInfiniteLM

def primer_tokens(tokenizer: Any, n_tokens: int) -> list[int]:
    """The first `n_tokens` tokens of the primer: the novel's paragraphs that hold no digit, in order.
    Digits are kept out because the prior is read at every recall: one made from Persuasion's
    opening (a baronetage entry full of dates) put its digits into recalled pass keys (9 of 30 at
    1K with the needle at depth 0.1, answers like 52149 for 52940; docs/memory-training.md)."""
    paragraphs = [p for p in PRIMER_TEXT.read_text(encoding="utf-8").splitlines() if p and not any(c.isdigit() for c in p)]
    ids: list[int] = []
    for p in paragraphs:
        ids += tokenizer.encode(("\n\n" if ids else "") + p, add_special_tokens=False)
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise ValueError(f"the primer text gives {len(ids)} tokens, fewer than the {n_tokens} asked")


def primed_memory(model: EdgeInfiniteLM, tokens: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """(M, z) per layer [NL, Hkv, d, d], [NL, Hkv, d] after streaming `tokens` (sink, then whole
    windows) through an empty memory: the sink is prefilled, each window prefilled and folded."""
    mem = model.memory_config
    s, w = mem.sink, mem.window
    if len(tokens) <= s or (len(tokens) - s) % w:
        raise ValueError(f"a primer is sink + n*window tokens (sink={s}, window={w}); got {len(tokens)}")
    graphdef, params = nnx.split(model)

    @jax.jit
    def prefill(params, state, chunk):
        return nnx.merge(graphdef, params).prefill(state, chunk)[1]

    compress = jax.jit(lambda params, state: nnx.merge(graphdef, params).compress(state))
    ids = jnp.asarray(tokens, jnp.int32)[None]
    state = model.init_state(1)
    if s:
        state = prefill(params, state, ids[:, :s])
    for at in range(s, ids.shape[1], w):
        state = compress(params, prefill(params, state, ids[:, at:at + w]))
    return state.memory.M[:, 0], state.memory.z[:, 0]


def prime(model: EdgeInfiniteLM, tokens: Sequence[int]) -> None:
    """Set the model's memory prior, in place, to the memory `tokens` leave (see `primed_memory`)."""
    prior = model.blocks.memory_prior
    if prior is None:
        raise ValueError("this model has no memory prior (MemoryConfig.prior is False)")
    M, z = primed_memory(model, tokens)
    prior.M[...] = M.astype(prior.M[...].dtype)
    prior.z[...] = z.astype(prior.z[...].dtype)


def primer_length(model: EdgeInfiniteLM, windows: int = 1) -> int:
    return model.memory_config.sink + windows * model.memory_config.window


def main(argv: Sequence[str] | None = None) -> None:
    import dataclasses
    from pathlib import Path

    from eijax import cli
    from eijax.pretrained import load_pretrained
    from eijax.tokenizer import load_tokenizer
    from eijax.trained import _saved_memory, _trained_meta, init_from_trained, save_memory_file

    p = cli.ArgumentParser(prog="python -m eijax.memory_prior",
                           description="Add a memory prior (MemoryConfig.prior) to a trained memory path: the memory "
                                       "that `windows` windows of the primer text leave, computed with its own weights. "
                                       "Writes a new memory file that --checkpoint accepts anywhere.")
    p.add_argument("source", help="packaged memory name, memory file or train.py run folder")
    p.add_argument("out", help="output stem: writes <out>.safetensors and <out>.json")
    p.add_argument("--windows", type=int, default=1, help="primer windows folded into the prior (default 1)")
    p.add_argument("--note", default="", help="free text stored in the JSON's provenance")
    a = p.parse_args(argv)
    with cli.user_errors():
        meta = _trained_meta(a.source)
        base = meta["base_checkpoint"]
        model = load_pretrained(base, dataclasses.replace(_saved_memory(meta), prior=True))
        patterns = init_from_trained(model, a.source)
        prime(model, primer_tokens(load_tokenizer(base), primer_length(model, a.windows)))
        provenance = dict(meta.get("provenance") or {}, prior=dict(source=str(a.source), windows=a.windows,
                                                                   primer=PRIMER_TEXT.name, note=a.note))
        stem = save_memory_file(model, sorted(set(patterns) | {"memory_prior"}), Path(a.out), base, provenance)
    print(f"wrote {stem}.safetensors and {stem}.json")


if __name__ == "__main__":
    main()
