"""Start-up caches: dequantised GGUF weights (eijax.checkpoint.weight_cache) and JAX's persistent
compilation cache for `python -m eijax.generate`. Tiny GGUFs are written here (Q4_1 tensors, as in
the packaged SmolLM2), so nothing depends on a downloaded model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from eijax.checkpoint import gguf_file, read_checkpoint
from eijax.checkpoint.weight_cache import FORMAT

Q4_1 = gguf.GGMLQuantizationType.Q4_1
VOCAB = 272  # >= the byte tokenizer's 259 ids, so generate can run on it


def write_tiny_gguf(path: Path, seed: int = 0, d: int = 64, ff: int = 96, layers: int = 2) -> Path:
    """A llama GGUF with Q4_1 matrices and float32 norms, laid out as llama.cpp writes one."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(d // 4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)

    def add(name: str, shape: tuple[int, ...]) -> None:
        a = rng.normal(0.0, 0.2, shape).astype(np.float32)
        if len(shape) == 1:
            w.add_tensor(name, a + 1.0)
        else:
            q = gguf.quants.quantize(a, Q4_1)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=Q4_1)

    add("token_embd.weight", (VOCAB, d))  # tied: no output.weight
    add("output_norm.weight", (d,))
    for i in range(layers):
        for part, shape in [("attn_norm", (d,)), ("ffn_norm", (d,)), ("attn_q", (d, d)), ("attn_k", (d // 2, d)),
                            ("attn_v", (d // 2, d)), ("attn_output", (d, d)), ("ffn_gate", (ff, d)),
                            ("ffn_up", (ff, d)), ("ffn_down", (d, ff))]:
            add(f"blk.{i}.{part}.weight", shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def dequantisations(monkeypatch) -> list[str]:
    """Names of the tensors dequantised from a GGUF during the test."""
    seen: list[str] = []
    real = gguf_file._dequantized_float32

    def counting(tensor):
        seen.append(tensor.name)
        return real(tensor)

    monkeypatch.setattr(gguf_file, "_dequantized_float32", counting)
    return seen


def assert_same_checkpoint(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert a[1][name].dtype == b[1][name].dtype == np.float32, name
        np.testing.assert_array_equal(a[1][name], b[1][name], err_msg=name)


def test_weight_cache_is_written_then_used_then_invalidated(tmp_path, monkeypatch, dequantisations):
    cache = tmp_path / "weights"
    monkeypatch.setenv("EIJAX_WEIGHT_CACHE", str(cache))
    path = write_tiny_gguf(tmp_path / "tiny.gguf", seed=0)
    reference = gguf_file.read_gguf(path)
    n_tensors = len(dequantisations)
    dequantisations.clear()

    first = read_checkpoint(path)  # reads the GGUF, writes the cache
    assert len(dequantisations) == n_tensors
    written = sorted(cache.glob("*.safetensors"))
    assert len(written) == 1 and FORMAT in written[0].name
    assert_same_checkpoint(first, reference)

    dequantisations.clear()
    second = read_checkpoint(path)  # from the cache: nothing dequantised
    assert dequantisations == []
    assert_same_checkpoint(second, reference)

    from eijax.pretrained import load_pretrained  # a model builds from the cached (read-only, mapped) arrays

    model = load_pretrained(path)
    np.testing.assert_array_equal(np.asarray(model.embed[...]), reference[1]["model.embed_tokens.weight"])
    assert dequantisations == []

    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # touched, same bytes
    read_checkpoint(path)
    assert dequantisations == []  # keyed by content: re-hashed, still a hit

    write_tiny_gguf(path, seed=1)  # new content at the same path
    changed = read_checkpoint(path)
    assert len(dequantisations) == n_tensors
    assert_same_checkpoint(changed, gguf_file.read_gguf(path))
    assert not np.array_equal(changed[1]["model.embed_tokens.weight"], reference[1]["model.embed_tokens.weight"])
    assert len(list(cache.glob("*.safetensors"))) == 1  # the old content's entry was removed


def test_damaged_or_disabled_weight_cache_falls_back_to_the_gguf(tmp_path, monkeypatch, dequantisations):
    cache = tmp_path / "weights"
    monkeypatch.setenv("EIJAX_WEIGHT_CACHE", str(cache))
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    reference = read_checkpoint(path)
    (entry,) = cache.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])  # cut short
    dequantisations.clear()
    assert_same_checkpoint(read_checkpoint(path), reference)
    assert dequantisations  # read from the GGUF again, and the entry rewritten
    dequantisations.clear()
    read_checkpoint(path)
    assert dequantisations == []

    monkeypatch.setenv("EIJAX_WEIGHT_CACHE", "")  # off
    off = tmp_path / "off"
    monkeypatch.setenv("EIJAX_CACHE", str(off))
    read_checkpoint(path)
    assert dequantisations and not off.exists()


_GENERATE_WITH_BYTE_TOKENIZER = """
import sys
import eijax.tokenizer
from eijax.data.byte_tokenizer import ByteTokenizer
eijax.tokenizer.load_tokenizer = lambda source: ByteTokenizer()  # the tiny GGUF has no vocabulary
from eijax.generate import main
main(sys.argv[1:])
"""


def test_generate_second_run_hits_the_compilation_cache(tmp_path):
    """Run the CLI twice in fresh processes: the first writes compiled steps, the second compiles
    nothing new (every entry it needs is already there) and reads no GGUF tensor."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    jax_cache, weights = tmp_path / "jax", tmp_path / "weights"
    env = dict(os.environ, EIJAX_COMPILATION_CACHE=str(jax_cache), EIJAX_WEIGHT_CACHE=str(weights),
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-c", _GENERATE_WITH_BYTE_TOKENIZER, "--model", str(path), "--prompt", "hello", "--raw",
           "--sink", "4", "--window", "16", "--max-new-tokens", "3"]

    def run() -> set[str]:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "first token" in out.stderr
        return {p.name for p in jax_cache.iterdir() if p.name.endswith("-cache")}

    first = run()
    assert any("prefill_chunk" in n for n in first) and any("decode_step" in n for n in first)
    (entry,) = weights.glob("*.safetensors")
    mtime = entry.stat().st_mtime_ns
    assert run() == first  # nothing compiled (a miss would have written a new entry)
    assert entry.stat().st_mtime_ns == mtime  # the weights were read from the cache, not rewritten


def test_warm_up_compiles_every_step_generation_needs():
    """Engine.warm_up compiles the fixed set (each chunk size, compress, sample, decode); generating
    at any length afterwards compiles nothing more."""
    from eijax.config import MemoryConfig
    from eijax.generate import Generator, SamplingConfig
    from eijax.testing import tiny_eijax_model

    gen = Generator(tiny_eijax_model("llama", MemoryConfig(sink=4, window=16)), chunk_sizes=(8, 4, 1))
    engine = gen.engine_for(200)
    steps = dict(prefill=engine._prefill, compress=engine._compress, sample=engine._sample,
                 split=engine._split_caches, stack=engine._stack_caches)
    assert engine._decode_compiled is None
    before = {name: f._cache_size() for name, f in steps.items()}
    engine.warm_up()
    compiled = {name: f._cache_size() for name, f in steps.items()}
    added = {name: compiled[name] - before[name] for name in steps}
    # jit(sample_token) and the cache layout changes are module functions whose compiled shapes are
    # shared by engines: an earlier engine of the same sizes may have compiled them already
    shared = ("sample", "split", "stack")
    assert {k: v for k, v in added.items() if k not in shared} == dict(prefill=3, compress=1)
    decode = engine._decode_executable()  # compiled ahead of time: a call of another shape would raise
    assert all(added[k] <= 1 for k in shared)
    for n in (3, 20, 57, 130):  # inside the window, one fold, several folds and decode folds
        gen.generate(np.arange(n) % 90, SamplingConfig(max_new_tokens=30))
    assert {name: f._cache_size() for name, f in steps.items()} == compiled
    assert engine._decode_executable() is decode
