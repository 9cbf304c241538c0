"""convert/ part 1: the PyTorch twin (DESIGN §2.5, JAX == PyTorch) and the Hugging Face export,
for every family (the `family` fixture); gemma3's twin also carries its local layers' own window."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import eijax
from eijax.testing import random_tokens, randomise_memory_path, tiny_eijax_model, tiny_hf_model
from eijax.memory_prior import prime

from convert.loading import load_model
from convert.litert_runtime import merge_decode
from convert.signatures import Compress, Decode, Prefill, flatten_state, unflatten_state
from convert.to_torch import export_folder, load_torch
from convert.weights import state_to_jax, to_eijax, to_torch


def _params(model) -> list[np.ndarray]:
    return [np.asarray(v[...]) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]


@pytest.mark.parametrize("gate", ["linear", "head_linear", "scalar"])
def test_round_trip_is_exact(family, gate):
    model = tiny_eijax_model(family, eijax.MemoryConfig(sink=4, window=8, gate=gate))
    randomise_memory_path(model)
    twin = to_torch(model)
    # torch layout: Linear kernels transposed, one tensor per layer, eijax's names otherwise
    assert twin.blocks[1].q_proj.weight.shape == (model.config.n_heads * model.config.head_dim, model.config.d_model)
    np.testing.assert_array_equal(twin.blocks[1].q_proj.weight.detach().numpy(),
                                  np.asarray(model.blocks.q_proj.kernel[...])[1].T)
    back = to_eijax(twin)
    for a, b in zip(_params(model), _params(back), strict=True):
        np.testing.assert_array_equal(a, b)


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / np.abs(np.asarray(b)).max())


def _assert_states_close(jax_state, torch_state, tol=1e-5):
    other = state_to_jax(torch_state)
    if jax_state.local_k is not None:  # a global layer's history rows: eijax rolls them unread, the twin keeps none
        local = np.array([h is not None for h in torch_state.local_k])
        hide = lambda a: jnp.where(local.reshape(-1, 1, 1, 1, 1), a, 0)
        jax_state = jax_state._replace(local_k=hide(jax_state.local_k), local_v=hide(jax_state.local_v))
    assert int(other.fill) == int(jax_state.fill)
    np.testing.assert_array_equal(np.asarray(other.valid), np.asarray(jax_state.valid))
    np.testing.assert_array_equal(np.asarray(other.written), np.asarray(jax_state.written))
    for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(jax_state)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


_prefill = nnx.jit(lambda m, s, t, v: m.prefill(s, t, v))
_compress = nnx.jit(lambda m, s: m.compress(s))


@pytest.mark.parametrize("family,rule,adapter,write_gate,prior,decay,keep", [
    ("llama", "linear", False, True, False, 1.0, 0), ("qwen2", "delta", False, False, False, 0.7, 0),
    ("qwen3", "delta", True, True, True, 0.6, 1), ("gemma3", "delta", True, False, True, 1.0, 0)])
def test_torch_twin_matches_jax_over_segments(family, rule, adapter, write_gate, prior, decay, keep):
    """Sink, chunked segments with padding, three compresses, then decode steps (batch 2). gemma3:
    memory in its global layer, the local layers' history (4 tokens) rolled at every compress.
    With a memory prior, both start the memory from it after the sink; with a decay, both scale it
    by the same learned retention at every compress (qwen3: KV head 0 keeps everything)."""
    mem = eijax.MemoryConfig(sink=4, window=8, rule=rule, adapter=adapter, write_gate=write_gate, prior=prior,
                             decay=decay, decay_keep_heads=keep)
    model = tiny_eijax_model(family, mem)
    randomise_memory_path(model)
    if prior:
        prime(model, random_tokens((4 + 8,), seed=9).tolist())
    twin = to_torch(model)
    if adapter or write_gate or prior or decay < 1:  # the adapter, write gate, prior and decay survive the round trip too
        for a, b in zip(_params(model), _params(to_eijax(twin)), strict=True):
            np.testing.assert_array_equal(a, b)
    tokens = random_tokens((2, 40), seed=3)
    js, ts = model.init_state(2), twin.init_state(2)
    worst = 0.0

    def step(chunk, valid=None):
        nonlocal js, ts, worst
        hj, js = _prefill(model, js, jnp.asarray(chunk), jnp.ones(chunk.shape, bool) if valid is None else jnp.asarray(valid))
        with torch.no_grad():
            ht, ts = twin.prefill(ts, torch.from_numpy(chunk), None if valid is None else torch.from_numpy(valid))
        worst = max(worst, _rel(twin.logits(ht).detach().numpy(), model.logits(hj)))
        _assert_states_close(js, ts)

    step(tokens[:, :4])
    if prior:
        js, ts = model.prime(js), twin.prime(ts)
        _assert_states_close(js, ts)
        assert bool(np.asarray(js.written).all()) and np.abs(np.asarray(js.memory.z)).max() > 0
    pos = 4
    for seg in range(3):
        valid = np.ones((2, 8), bool)
        if seg == 1:
            valid[1, 6:] = False  # a padded row: writes nothing to memory, attends to nothing padded
        step(tokens[:, pos:pos + 5], valid[:, :5])
        step(tokens[:, pos + 5:pos + 8], valid[:, 5:])
        js, ts = _compress(model, js), twin.compress(ts)
        _assert_states_close(js, ts)
        pos += 8
    assert bool(np.asarray(js.written).all())
    if family == "gemma3":
        assert bool(np.asarray(js.local_valid).all()) and not any(m.abs().max() for m in ts.M[::2])  # local: no memory
    for _ in range(4):
        step(tokens[:, pos:pos + 1])
        pos += 1
    assert worst < 1e-5


def test_signature_wrappers_match_model(family):
    """Prefill/Decode/Compress wrappers (named flat state) == the model's own methods."""
    mem = eijax.MemoryConfig(sink=4, window=8)
    twin = to_torch(tiny_eijax_model(family, mem))
    tokens = torch.from_numpy(random_tokens((1, 12), seed=5))
    state = twin.init_state(1)
    flat = flatten_state(state, True)
    local = twin.config.local_layers or (False,) * twin.config.n_layers
    with torch.no_grad():
        out = Prefill(twin)(tokens[:, :8], torch.tensor([6], dtype=torch.int32), **flat)
        valid = torch.arange(8)[None] < 6
        hidden, ref = twin.prefill(state, tokens[:, :8], valid)
        np.testing.assert_allclose(out["logits"].numpy(), twin.logits(hidden[:, 5]).numpy(), rtol=1e-6, atol=1e-6)
        assert int(out["fill"][0]) == int(ref.fill) == 6
        flat = {**flat, **{k: v for k, v in out.items() if k != "logits"}}  # the runner keeps what is not returned
        dec = Decode(twin)(tokens[:, 8:9], **flat)
        assert int(dec["fill"][0]) == 7
        # decode returns the token's k/v rows, not the caches: written at slot 6 they give prefill's state
        one, ref = twin.prefill(unflatten_state(flat, twin), tokens[:, 8:9])
        np.testing.assert_allclose(dec["logits"].numpy(), twin.logits(one[:, 0]).numpy(), rtol=1e-5, atol=1e-5)
        assert set(dec) == {"logits", "valid", "fill", *(f"{m}_row_{i}" for m in "kv" for i in range(len(local)))}
        after = {k: v.numpy().copy() for k, v in flat.items()}
        assert sorted(merge_decode(after, {k: v.numpy() for k, v in dec.items() if k != "logits"}, np.array([6]))) == \
            sorted({*(f"{m}_cache_{i}" for m in "kv" for i in range(len(local))), "valid", "fill"})
        for name, value in flatten_state(ref, True).items():
            if name in after:
                np.testing.assert_allclose(after[name], value.numpy(), rtol=1e-6, atol=1e-6, err_msg=name)
        comp = Compress(twin)(**{k: torch.from_numpy(v) for k, v in after.items()})
        history = {f"local_{m}_{i}" for m in "kv" for i, is_local in enumerate(local) if is_local}
        memory = {f"mem_{m}_{i}" for m in "Mz" for i, is_local in enumerate(local) if not is_local}
        assert set(comp) == {*memory, *history, *(["local_valid"] if history else []), "valid", "fill", "written"}
        assert not history & set(out)  # prefill and decode leave the history as it is
        assert int(comp["fill"][0]) == 4 and bool(comp["written"][0])
        assert not comp["valid"][0, 4:].any() and comp["valid"][0, :4].all()


def test_overflowing_prefill_is_refused():
    twin = to_torch(tiny_eijax_model("llama", eijax.MemoryConfig(sink=4, window=8)))
    with pytest.raises(ValueError, match="overflows the cache"):
        twin.prefill(twin.init_state(1), torch.zeros(1, 13, dtype=torch.int32))


def test_hf_export_loads_in_transformers_and_round_trips(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_eijax_model(family, eijax.MemoryConfig(sink=4, window=8, gate="head_linear", adapter=True))
    randomise_memory_path(model)
    export_folder(model, tmp_path)
    meta = json.loads((tmp_path / "edgeinfinite.json").read_text())
    assert meta["memory_config"]["gate"] == "head_linear"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    tokens = random_tokens((1, 11), seed=2)
    with torch.no_grad():
        hf_logits = hf(torch.from_numpy(tokens).long()).logits.numpy()
    hidden, _ = model.prefill(model.init_state(1), jnp.asarray(tokens))
    assert _rel(hf_logits, model.logits(hidden)) < 1e-5
    back = load_model(tmp_path)  # eijax from the folder: base + gate file, exact
    assert back.memory_config.gate == "head_linear" and back.memory_config.adapter
    for a, b in zip(_params(model), _params(back), strict=True):
        np.testing.assert_array_equal(a, b)
    twin, ref = load_torch(tmp_path), to_torch(model)
    for (na, a), (nb, b) in zip(twin.state_dict().items(), ref.state_dict().items(), strict=True):
        assert na == nb and torch.equal(a, b)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_model(tmp_path)


def test_hf_tensors_match_the_original_checkpoint(family):
    from convert.to_torch import hf_tensors

    _, tensors = tiny_hf_model(family)
    exported = hf_tensors(tiny_eijax_model(family, eijax.MemoryConfig(sink=4, window=8)))
    tied = {"lm_head.weight"} if "lm_head.weight" not in exported else set()
    assert set(exported) == set(tensors) - tied
    for name, value in exported.items():
        np.testing.assert_array_equal(value, tensors[name])
