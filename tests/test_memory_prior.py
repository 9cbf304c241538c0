"""The memory prior (MemoryConfig.prior): long inputs start their memory from stored (M0, z0) and read
it from the first token after the sink; inputs that fit the cache never see it. Scan = loop with the
prior, the streaming engine = the laid-out forward, the prior = the memory its primer leaves, and
memory files carry it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import eijax
from eijax.generate import Generator, SamplingConfig
from eijax.memory_prior import primed_memory, prime
from eijax.testing import padded_inputs, random_tokens, randomise_memory_path, segment_loop, tiny_eijax_model
from eijax.trained import init_from_trained, save_memory_file

S, L = 4, 8
fwd = nnx.jit(lambda m, t, v: m.forward(t, v))
PATTERNS = ["gate", "memory_adapter", "write_gate", "memory_prior"]


def _model(prior: bool = True, family: str = "llama", dtype: str = "float32", seed: int = 0):
    mem = eijax.MemoryConfig(sink=S, window=L, rule="delta", adapter=True, write_gate=True, prior=prior)
    model = tiny_eijax_model(family, mem, dtype=dtype, seed=seed)
    randomise_memory_path(model)
    if prior:
        prime(model, random_tokens((S + 2 * L,), seed=9).tolist())
    return model


def _same_base(model) -> eijax.EdgeInfiniteLM:
    """The same weights with no prior (the control)."""
    other = _model(prior=False)
    nnx.update(other, nnx.state(model, nnx.Not(nnx.PathContains("memory_prior"))))
    return other


def test_prior_is_the_memory_its_primer_leaves():
    model = _model()
    tokens = random_tokens((S + 2 * L,), seed=9).tolist()
    M, z = primed_memory(_same_base(model), tokens)
    np.testing.assert_array_equal(model.blocks.memory_prior.M[...], M)
    np.testing.assert_array_equal(model.blocks.memory_prior.z[...], z)
    assert float(jnp.min(z)) > 0  # z sums σ(k) > 0: every read is well defined
    with pytest.raises(ValueError, match="sink \\+ n\\*window"):
        primed_memory(model, tokens[:-1])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_scanned_forward_with_prior_equals_the_segment_loop(family):
    with jax.enable_x64(True):
        model = _model(family=family, dtype="float64")
        tokens, valid = padded_inputs(S, L, 4, seed=2)
        hidden, _, memories, _ = segment_loop(model, tokens, valid)
        np.testing.assert_allclose(np.asarray(fwd(model, tokens, valid)), hidden, rtol=1e-10, atol=1e-10)
        first = np.asarray(memories[0].M)  # the memory the first window reads is the prior
        prior = np.asarray(model.blocks.memory_prior.M[...])
        if family == "gemma3":  # memory (and so the prior) lives in the global layers only
            is_global = ~np.asarray(model.config.local_layers)
            np.testing.assert_array_equal(first[is_global, 0], prior[is_global])
            assert not first[~is_global].any()
        else:
            np.testing.assert_array_equal(first[:, 0], prior)


def test_short_inputs_ignore_the_prior_and_long_ones_read_it():
    model = _model()
    control = _same_base(model)
    sampling = SamplingConfig(max_new_tokens=6)
    short = random_tokens((S + L - 6,), seed=4).tolist()  # prompt + generation fit the cache: never primed
    with_prior, without = Generator(model).generate(short, sampling), Generator(control).generate(short, sampling)
    assert with_prior.route == "plain" and with_prior.tokens == without.tokens
    long = random_tokens((S + 3 * L,), seed=5)
    a = np.asarray(fwd(model, jnp.asarray(long[None]), jnp.ones((1, long.size), bool)))
    b = np.asarray(fwd(control, jnp.asarray(long[None]), jnp.ones((1, long.size), bool)))
    np.testing.assert_array_equal(a[:, :S], b[:, :S])  # the sink never reads memory
    assert np.abs(a[:, S:] - b[:, S:]).max() > 1e-3   # the first window already reads the prior


def test_streaming_engine_primes_as_the_laid_out_forward_does():
    """Generator streams a long prompt in chunks (prime after the sink, folds when full): its last
    logits equal the laid-out forward's, with and without question-last."""
    model = _model()
    tokens = random_tokens((S + 3 * L,), seed=6)
    expected = np.asarray(model.logits(fwd(model, jnp.asarray(tokens[None]), jnp.ones((1, tokens.size), bool))[:, -1]))
    gen = Generator(model, chunk_sizes=(8, 4))
    logits, state, _, _, kind = gen.prefill(tokens.tolist())
    assert kind == "stream" and bool(np.asarray(state.written).all())
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)
    doc, question = tokens[:S + 2 * L].tolist(), tokens[S + 2 * L:].tolist()  # question-last: the same layout
    logits_q, *_ = gen.prefill(doc, question)
    np.testing.assert_allclose(np.asarray(logits_q), expected, rtol=1e-5, atol=1e-5)


def test_memory_file_carries_the_prior_and_a_run_without_one_leaves_it_out(tmp_path):
    model = _model()
    save_memory_file(model, PATTERNS, tmp_path / "primed", "tiny")
    fresh = _model(seed=0)
    fresh.blocks.memory_prior.M[...] = jnp.zeros_like(fresh.blocks.memory_prior.M[...])
    assert sorted(init_from_trained(fresh, tmp_path / "primed")) == sorted(PATTERNS)
    np.testing.assert_array_equal(fresh.blocks.memory_prior.M[...], model.blocks.memory_prior.M[...])
    plain = _model(prior=False)  # e.g. an older experiment config warm-started from the shipped name
    init_from_trained(plain, tmp_path / "primed")
    np.testing.assert_array_equal(plain.blocks.gate.kernel[...], model.blocks.gate.kernel[...])
    assert plain.blocks.memory_prior is None
    with pytest.raises(ValueError, match="prior"):
        eijax.with_memory_config(model, eijax.MemoryConfig(sink=S, window=L, rule="delta", adapter=True,
                                                           write_gate=True))
    baseline = Generator(model, "streaming")  # memory off: the prior is never read
    assert not baseline.engine_for(100).model.primes


def test_training_reads_the_prior_of_its_init_and_the_run_loads_with_it(tmp_path):
    """train.py with memory.prior: refused without a prior to start from; warm-started from a memory
    file that has one, it trains (primed forward) and the run loads back with the same prior."""
    from eijax.testing import TINY_TRAIN_ARGS
    from eijax.train.config_schema import ConfigError, load_config
    from eijax.train.loop import build_model, run

    def config(out, *extra):
        args = dict(a.split("=", 1) for a in [*TINY_TRAIN_ARGS, "memory.prior=true", "run.steps=2",
                                             f"run.output_dir={out}", *extra])
        return load_config(None, [f"{k}={v}" for k, v in args.items()])

    with pytest.raises(ConfigError, match="memory.prior needs a prior"):
        run(config(tmp_path / "none"))
    model = build_model(config(tmp_path / "none"))
    mem = model.memory_config
    prime(model, random_tokens((mem.sink + mem.window,), seed=3).tolist())
    save_memory_file(model, ["gate", "memory_prior"], tmp_path / "init", "")
    run(config(tmp_path / "run", f"model.init_memory={tmp_path / 'init'}"))
    # the run as an init (a random base cannot be reloaded by name): its prior comes through its own init
    again = build_model(config(tmp_path / "again", f"model.init_memory={tmp_path / 'run'}"))
    np.testing.assert_array_equal(again.blocks.memory_prior.M[...], model.blocks.memory_prior.M[...])
    assert not np.array_equal(again.blocks.gate.bias[...], model.blocks.gate.bias[...])  # the gate trained
