"""convert/ parts 2-5: fixed-shape LiteRT graphs of a tiny model, recipes, runner, bad input.

The conversion of the tiny model (4 signatures, 7 recipes) takes about 30-60 s on 2 cores, so the
tests that need it are marked slow; the input checks are fast.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import eijax
from eijax.memory_prior import prime
from eijax.testing import random_tokens, randomise_memory_path, tiny_eijax_model

from convert.budget import budget
from convert.scenarios import Scenario, load_scenario
from convert.to_litert import available_recipes, load_recipe

SCENARIO = "name: tiny\ndescription: test\nsink: 4\nwindow: 16\nprefill_chunks: [8, 4]\ndecode_batch: 1\nmemory: true\n"
VOCAB = 97
MEMORY_PATH = "MemoryGate_gate|MemoryAdapter_memory_adapter|MemoryRead_mem_read|MemoryWrite_mem_write|MemoryWriteGate_write_gate|MemoryDecay_memory_decay"

# Stated bounds vs the float32 graph on the tiny random model (observed values are about half of
# these; a quantisation that breaks a layer or a scale gives relative errors of order 1).
BOUNDS = {  # recipe: (max logit rel err, min next-token agreement)
    "float32": (0.0, 1.0), "fp16": (2e-3, 0.95), "int8_weight_only": (0.05, 0.85), "dynamic_int8": (0.05, 0.85),
    "mixed": (0.15, 0.7), "int4_block32": (0.4, 0.6), "static_a16w8": (0.3, 0.75),
}


def _model_with_gate():
    """The whole memory path: gate, adapter, write gate, a split decay (KV head 0 keeps everything) and
    a memory prior (whose file travels with every recipe's graph: the runner primes long prompts from it)."""
    model = tiny_eijax_model("llama", eijax.MemoryConfig(sink=4, window=16, adapter=True, write_gate=True, prior=True,
                                                         decay=0.7, decay_keep_heads=1))
    randomise_memory_path(model)
    prime(model, random_tokens((4 + 16,), vocab=VOCAB, seed=12).tolist())
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from convert.to_litert import convert
    from convert.to_torch import export_folder

    root = tmp_path_factory.mktemp("litert")
    model = _model_with_gate()
    export_folder(model, root / "hf")
    (root / "tiny.yaml").write_text(SCENARIO)
    paths = convert(str(root / "hf"), str(root / "tiny.yaml"), available_recipes(), root / "out", log=lambda s: None)
    return model, paths


# ------------------------------------------------------------------ fast: input checks
def test_unknown_scenario_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown scenario 'nope'.*known scenarios: .*qa"):
        load_scenario("nope")


def test_chunk_larger_than_window_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sink: 4\nwindow: 16\nprefill_chunks: [32, 8]\n")
    with pytest.raises(ValueError, match="prefill chunk 32 is larger than the window"):
        load_scenario(path)


def test_unknown_scenario_key_and_recipe_are_clear_errors(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("sink: 4\nwindow: 16\nprefil_chunks: [8]\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_scenario(path)
    with pytest.raises(ValueError, match="unknown quantisation recipe"):
        load_recipe("int3")


def test_shipped_scenarios_and_recipes_load():
    for name in ("summarisation", "qa", "chat"):
        s = load_scenario(name)
        assert max(s.chunks) <= s.window
    assert load_scenario("chat").memory is False
    names = set(available_recipes())
    assert {"float32", "fp16", "int8_weight_only", "dynamic_int8", "int4_block32", "mixed", "static_a16w8"} <= names
    for name in names:
        _, rules = load_recipe(name)
        # the memory path is never quantised (float memory arithmetic; an all-zero gate has no int4 scale)
        assert not rules or rules[-1] == {"regex": MEMORY_PATH, "operation": "*", "algorithm_key": "no_quantize"}


def test_budget_is_fixed_by_the_scenario():
    cfg = eijax.model_config_from_hf(dict(model_type="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30,
                                          num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                                          tie_word_embeddings=True))
    s = Scenario("x", sink=64, window=512, prefill_chunks=(128,))
    b = budget(cfg, s)
    assert b.kv_cache == 2 * 30 * 576 * 3 * 64 * 4
    assert b.memory_state == 30 * 3 * (64 * 64 + 64) * 4
    assert abs(b.weights / 4 - 134.5e6) < 1.5e6  # SmolLM2-135M + gate, float32
    off = budget(cfg, Scenario("y", sink=64, window=512, prefill_chunks=(128,), memory=False))
    assert off.memory_state == 0


def test_budget_of_gemma3_counts_local_history_and_global_memory_only():
    cfg = eijax.model_config_from_hf(dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640,
                                          num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                                          head_dim=256, intermediate_size=2048, sliding_window=512))
    b = budget(cfg, Scenario("x", sink=64, window=512, prefill_chunks=(128,)))
    assert b.kv_cache == 2 * (18 * 576 + 15 * 511) * 256 * 4  # 15 local layers keep 511 tokens each
    assert b.memory_state == 3 * (256 * 256 + 256) * 4       # memory in the 3 global layers only
    assert abs(b.weights / 4 - 268.2e6) < 1e6                # gemma-3-270m + gate, float32


# ------------------------------------------------------------------ slow: conversions
def _jax_steps(model, calls, tokens):
    """[(chunk [1, size] int32, n valid, logits, eijax state)] per call; (None, 0, None, state) for a compress."""
    prefill = nnx.jit(lambda m, s, t, v: m.prefill(s, t, v))
    compress = nnx.jit(lambda m, s: m.compress(s))
    state, pos, out = model.init_state(1), 0, []
    for call in calls:
        if call == "compress":
            state = compress(model, state)
            out.append((None, 0, None, state))
            continue
        n, size = call
        chunk = np.zeros((1, size), np.int32)
        chunk[0, :n] = tokens[pos:pos + n]
        valid = np.arange(size)[None] < n
        hidden, state = prefill(model, state, jnp.asarray(chunk), jnp.asarray(valid))
        out.append((chunk, n, np.asarray(model.logits(hidden[:, n - 1])), state))
        pos += n
    return out


def _assert_same_slots(state: dict, jax_state) -> None:
    assert int(state["fill"][0]) == int(jax_state.fill)
    np.testing.assert_array_equal(state["valid"], np.asarray(jax_state.valid))


# (valid tokens, chunk size) or "compress": sink + window, padded chunks, decode, three compresses
CALLS = [(8, 8), (8, 8), (4, 4), "compress", (8, 8), (5, 8), (1, 1), (1, 1), (1, 1), "compress",
         (3, 4), (8, 8), (1, 1), (4, 4), "compress", (1, 1), (1, 1)]


def _replay(model, path) -> tuple[dict, int]:
    """The float graph at `path` == the PyTorch twin == eijax over CALLS: logits of every call, the
    slots, the memory and (models with local layers) each local layer's history, after every call
    and compress. Returns (final LiteRT state, number of calls whose logits were compared)."""
    from convert.litert_runtime import LiteRTModel
    from convert.weights import to_torch

    lite = LiteRTModel(path)
    twin = to_torch(model, model.memory_config)
    tokens = random_tokens((60,), vocab=VOCAB, seed=7)
    state, tstate, checked = lite.init_state(), twin.init_state(1), 0
    for chunk, n, jax_logits, jax_state in _jax_steps(model, CALLS, tokens):
        if chunk is None:
            state, tstate = lite.compress(state), twin.compress(tstate)
        else:
            logits, state = lite.prefill(state, chunk, np.array([n], np.int32))
            with torch.no_grad():
                hidden, tstate = twin.prefill(tstate, torch.from_numpy(chunk), torch.arange(chunk.shape[1])[None] < n)
                torch_logits = twin.logits(hidden[:, n - 1]).numpy()
            for other in (logits, torch_logits):
                assert np.abs(other - jax_logits).max() / np.abs(jax_logits).max() < 1e-4
            checked += 1
        assert int(state["fill"][0]) == int(tstate.fill)
        _assert_same_slots(state, jax_state)
        np.testing.assert_array_equal(state["written"], np.asarray(jax_state.written))
        if "local_valid" in state:
            np.testing.assert_array_equal(state["local_valid"], np.asarray(jax_state.local_valid))
        references = {"mem_M": jax_state.memory.M, "mem_z": jax_state.memory.z, "local_k": jax_state.local_k,
                      "local_v": jax_state.local_v}
        for name, value in state.items():
            kind, _, layer = name.rpartition("_")
            if kind in references:
                ref = np.asarray(references[kind][int(layer)])
                assert np.abs(value - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1.0), name
    return state, checked


@pytest.mark.slow
def test_litert_float_matches_torch_and_jax(exported):
    model, paths = exported
    state, checked = _replay(model, paths["float32"])
    assert checked == 14 and bool(state["written"][0])


@pytest.mark.slow
def test_gemma3_litert_float_matches_torch_and_jax(tmp_path):
    """Gemma 3 (local, global, local layers; sliding window 5): memory in the global layer only, the
    local layers' 4-token history crosses the graph boundary and is rolled by `compress`."""
    from convert.to_litert import export_float

    model = tiny_eijax_model("gemma3", eijax.MemoryConfig(sink=4, window=16, adapter=True))
    randomise_memory_path(model)
    scenario = Scenario("tiny", sink=4, window=16, prefill_chunks=(8, 4))
    state, checked = _replay(model, export_float(model, scenario, tmp_path / "gemma3.tflite"))
    assert {name for name in state if name.startswith(("mem_", "local_"))} == {
        "mem_M_1", "mem_z_1", "local_k_0", "local_v_0", "local_k_2", "local_v_2", "local_valid"}
    assert checked == 14 and bool(state["written"][0]) and state["local_valid"].all()


@pytest.mark.slow
def test_every_recipe_converts_runs_and_stays_within_its_bound(exported):
    from convert.evaluate_recipes import evaluate

    _, paths = exported
    assert set(paths) == set(BOUNDS)
    tokens = random_tokens((64,), vocab=VOCAB, seed=11).tolist()
    rows = {r["recipe"]: r for r in evaluate(paths, tokens, n_prefill=30)}  # 34 decode steps, 2 compresses
    sizes = {name: r["bytes"] for name, r in rows.items()}
    for name, (max_err, min_agree) in BOUNDS.items():
        assert rows[name]["logit_rel_err"] <= max_err, (name, rows[name])
        assert rows[name]["next_token_agreement"] >= min_agree, (name, rows[name])
    assert sizes["int4_block32"] < sizes["dynamic_int8"] < sizes["fp16"] < sizes["float32"]


@pytest.mark.slow
def test_runner_greedy_output_equals_eijax(exported):
    from convert.litert_runtime import LiteRTModel, Streamer
    from eijax.generate import Generator, SamplingConfig

    model, paths = exported
    document = random_tokens((45,), vocab=VOCAB, seed=3).tolist()  # longer than sink + window: streams
    question = random_tokens((6,), vocab=VOCAB, seed=4).tolist()
    runtime = LiteRTModel(paths["float32"])
    assert runtime.prior is not None and runtime.prime_point(51) == 4  # the prior file came with the graph
    lite = list(Streamer(runtime).generate(document, 20, question=question))
    ref = Generator(model, "edgeinfinite", chunk_sizes=(8, 4)).generate(
        document, SamplingConfig(max_new_tokens=20), question=question)
    assert ref.route == "stream" and len(lite) == 20
    assert lite == list(ref.tokens)
    streamer = Streamer(runtime)
    primed, _ = streamer.prefill(runtime.init_state(), document, runtime.prime_point(len(document)))
    unprimed, _ = streamer.prefill(runtime.init_state(), document)
    assert np.abs(primed - unprimed).max() > 1e-3 * np.abs(unprimed).max()  # the prior is read


@pytest.mark.slow
def test_recipes_keep_the_memory_path_float_and_quantise_the_rest(exported):
    from convert.graph_stats import constant_bytes

    _, paths = exported
    for name, path in paths.items():
        memory = constant_bytes(path, MEMORY_PATH)
        assert any(op == "FULLY_CONNECTED" for _, op in memory), name  # the linear gate's weight is in scope
        assert {dtype for dtype, _ in memory} <= {"FLOAT32", "INT32"}, (name, memory)
        weights = constant_bytes(path, r"(q|k|v|o|gate|up|down)_proj")
        dtypes = {dtype for dtype, _ in weights} - {"INT32"}  # INT32: shape operands
        expected = {"float32": {"FLOAT32"}, "fp16": {"FLOAT16"}, "int4_block32": {"INT4"}, "mixed": {"INT4", "INT8"}}
        assert dtypes == expected.get(name, {"INT8"}), (name, weights)


@pytest.mark.slow
def test_memory_off_graph_matches_jax_streaming(tmp_path):
    """The chat-style graph (memory: false): no memory state crosses the boundary, compress only
    drops the window (StreamingLLM), and every call matches eijax with the memory disabled."""
    from convert.litert_runtime import LiteRTModel
    from convert.to_litert import export_float

    model = tiny_eijax_model("llama", eijax.MemoryConfig(sink=4, window=16, enabled=False))
    scenario = Scenario("off", sink=4, window=16, prefill_chunks=(8, 4), memory=False)
    state, checked = _replay(model, export_float(model, scenario, tmp_path / "off.tflite"))
    assert not any(name.startswith("mem_") for name in state) and checked == 14


@pytest.mark.slow
def test_buffer_view_calls_equal_the_signature_runner(exported):
    """LiteRTModel calls signatures through views of their buffers (one copy per call; decode keeps
    the state in its own buffers and copies back only the slot it wrote); the same stream through
    ai-edge-litert's copying SignatureRunner gives the same logits and state."""
    from convert.litert_runtime import LiteRTModel, Streamer

    _, paths = exported
    fast, slow = LiteRTModel(paths["float32"]), LiteRTModel(paths["float32"])
    slow.runners = {name: call.runner for name, call in slow.runners.items()}
    tokens = random_tokens((50,), vocab=VOCAB, seed=9).tolist()
    (a, sa), (b, sb) = (Streamer(m).prefill(m.init_state(), tokens) for m in (fast, slow))
    for token in tokens[:25]:  # crosses a compress
        (a, sa), (b, sb) = Streamer(fast).decode_step(sa, token), Streamer(slow).decode_step(sb, token)
        np.testing.assert_array_equal(a, b)
        assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_graph_without_its_json_still_knows_its_sink(exported, tmp_path):
    import shutil

    from convert.litert_runtime import LiteRTModel

    _, paths = exported
    bare = shutil.copyfile(paths["float32"], tmp_path / "bare.tflite")  # no .json beside it
    assert LiteRTModel(bare).sink == LiteRTModel(paths["float32"]).sink == 4
