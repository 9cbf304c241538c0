"""The front door of every CLI (eijax.cli): a user's mistake is ONE `error: ...` line on stderr and
exit status 2, never a traceback; a genuine bug still propagates with its traceback.

Most cases call the tools' main() in-process (pytest.raises(SystemExit) + capsys); two run the
real command lines in a subprocess to check the `__main__` wiring end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eijax import cli

ROOT = Path(__file__).resolve().parents[1]
TINY_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=32, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, num_hidden_layers=1, intermediate_size=48, vocab_size=40,
                  max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True)


def assert_user_error(exc_info, capsys, *fragments: str) -> str:
    """Exit status 2, exactly one `error:` line (the last one) naming `fragments`, no traceback."""
    assert exc_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def assert_user_error_process(p: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in p.stderr, p.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def truncated_gguf(tmp_path_factory) -> Path:
    """A small llama GGUF cut off in its tensor data, as an interrupted download leaves it."""
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "cut.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.ones((40, 32), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(32, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    return path


def tiny_model_folder(folder: Path, **overrides) -> Path:
    """A tiny random llama as an HF folder (config.json + model.safetensors), written without torch."""
    from safetensors.numpy import save_file

    config = {**TINY_LLAMA, **overrides}
    d, ff, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], d), "model.norm.weight": (d,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                       p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
                       p + "mlp.down_proj.weight": (d, ff)})
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def fake_training_run(run: Path, arch: dict, base: str) -> Path:
    """A training-run folder (orbax checkpoints/<step> with meta) for a model of `arch`."""
    from eijax.train.checkpointing import make_manager, save

    manager = make_manager(run / "checkpoints", keep=1, async_save=False)
    gate = {"blocks": {"gate": {"w": np.zeros(3, np.float32)}}}
    save(manager, 1, gate, gate, None, {"arch": arch, "base_checkpoint": base, "trainable_patterns": ["gate"]})
    manager.wait_until_finished()
    manager.close()
    return run


# ------------------------------------------------------------------ model files
def test_truncated_gguf_is_named_as_truncated(truncated_gguf, capsys):
    from convert import to_torch
    from eijax import generate

    with pytest.raises(SystemExit) as e:  # the tokenizer reads the file first
        generate.main(["--model", str(truncated_gguf), "--prompt", "hi"])
    assert_user_error(e, capsys, str(truncated_gguf), "truncated")
    with pytest.raises(SystemExit) as e:  # the weights reader
        to_torch.main(["--checkpoint", str(truncated_gguf), "--out", str(truncated_gguf.parent / "out")])
    assert_user_error(e, capsys, str(truncated_gguf), "truncated")


def test_missing_model_path(tmp_path, capsys):
    from convert import to_litert
    from eijax import generate

    with pytest.raises(SystemExit) as e:
        generate.main(["--model", str(tmp_path / "absent.gguf"), "--prompt", "hi"])
    assert_user_error(e, capsys, "absent.gguf", "neither an existing path nor a known model name")
    with pytest.raises(SystemExit) as e:
        to_litert.main(["--checkpoint", str(tmp_path / "absent"), "--scenario", "qa", "--out", str(tmp_path)])
    assert_user_error(e, capsys, "absent")


def test_checkpoint_of_another_model(tmp_path, capsys, monkeypatch):
    from eijax import generate
    from eijax.data.byte_tokenizer import ByteTokenizer

    folder = tiny_model_folder(tmp_path / "tiny")
    arch = dict(family="llama", vocab_size=40, d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=16,
                d_ff=48, gate="linear")  # trained on a 3-layer model; --model has 1 layer
    run = fake_training_run(tmp_path / "run", arch, base="/models/other")
    assert generate.base_model_source(None, str(run)) == "/models/other"  # no --model: the run's own base
    monkeypatch.setattr("eijax.tokenizer.load_tokenizer", lambda source: ByteTokenizer())
    with pytest.raises(SystemExit) as e:
        generate.main(["--model", str(folder), "--checkpoint", str(run), "--prompt", "hi", "--sink", "4",
                       "--window", "16"])
    assert_user_error(e, capsys, "trained for another model", "n_layers")


def test_memory_file_with_an_option_this_eijax_lacks(tmp_path):
    """A memory file or run saved by another version (e.g. a reverted experiment's option) is a
    CheckpointMismatch naming the option, which every CLI prints as one line, not a TypeError."""
    from eijax.trained import PACKAGED_DIR, CheckpointMismatch, load_trained

    meta = json.loads((PACKAGED_DIR / "smollm2-memory.json").read_text())
    meta["memory"]["out_adapter"] = 32
    (tmp_path / "mem.json").write_text(json.dumps(meta))
    (tmp_path / "mem.safetensors").write_bytes(b"")  # never read: the metadata is refused first
    with pytest.raises(CheckpointMismatch, match="memory options this eijax does not have: out_adapter"):
        load_trained(tmp_path / "mem")


# ------------------------------------------------------------------ scenario files
@pytest.mark.parametrize("text, fragment", [
    ("sink: 4\nwindow: [16\nprefill_chunks: [8]\n", "not valid YAML (line 3"),
    ("sink: 4\nwindow: 16\nprefill_chunks: 16\n", "prefill_chunks must be a list"),
])
def test_to_litert_bad_scenario_file(tmp_path, capsys, text, fragment):
    from convert import to_litert

    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        to_litert.main(["--checkpoint", "smollm2", "--scenario", str(path), "--out", str(tmp_path / "out")])
    assert_user_error(e, capsys, str(path), fragment)


@pytest.mark.parametrize("text, match", [
    ("- sink: 4\n", "must be a mapping"),
    ("sink: '4'\nwindow: 16\nprefill_chunks: [8]\n", "sink must be an integer, got '4'"),
    ("sink: 4\nwindow: 16.5\nprefill_chunks: [8]\n", "window must be an integer"),
    ("sink: 4\nwindow: 16\nprefill_chunks: [8, x]\n", "prefill_chunks entry must be an integer, got 'x'"),
    ("sink: 4\nwindow: 16\nprefill_chunks: [8]\ndecode_batch: true\n", "decode_batch must be an integer"),
    ("sink: 4\nwindow: 16\nprefill_chunks: [8]\nmemory: 'yes'\n", "memory must be true or false"),
    ("sink: 4\nwindow: 16\nprefill_chunks: []\n", "prefill_chunks is empty"),
])
def test_scenario_fields_are_validated(tmp_path, text, match):
    from convert.scenarios import load_scenario

    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(cli.InputError, match=match):
        load_scenario(path)


# ------------------------------------------------------------------ options
def test_unknown_method(tmp_path, capsys):
    from eijax import generate
    from eijax.eval import __main__ as evaluate

    with pytest.raises(SystemExit) as e:
        generate.main(["--method", "bogus", "--prompt", "hi"])
    assert_user_error(e, capsys, "--method", "'bogus'")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--methods", "edgeinfinite,bogus", "--out", str(tmp_path)])
    assert_user_error(e, capsys, "--methods", "bogus")


def test_missing_input_files(tmp_path, capsys):
    from convert import run_litert
    from eijax import generate
    from eijax.eval import __main__ as evaluate
    from eijax.eval import ppl_gap

    absent = str(tmp_path / "absent.txt")
    for main, args, option in [
        (generate.main, ["--prompt", "hi", "--document", absent], "--document"),
        (evaluate.main, ["--ppl-file", absent, "--out", str(tmp_path)], "--ppl-file"),
        (evaluate.main, ["--longbench", absent, "--out", str(tmp_path)], "--longbench"),
        (ppl_gap.main, ["--file", absent], "--file"),
        (run_litert.main, ["--model", "x.tflite", "--prompt", "hi", "--document", absent], "--document"),
        (run_litert.main, ["--model", str(tmp_path / "x.tflite"), "--prompt", "hi"], "--model"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(args)
        assert_user_error(e, capsys, option, "no such file")


def test_memory_prior_of_an_unknown_source(tmp_path, capsys):
    from eijax import memory_prior

    with pytest.raises(SystemExit) as e:
        memory_prior.main([str(tmp_path / "nope"), str(tmp_path / "out")])
    assert_user_error(e, capsys, "nope", "neither a packaged memory name")


# ------------------------------------------------------------------ bugs keep their traceback
@pytest.mark.parametrize("error", [RuntimeError("boom"), ValueError("internal"), KeyError("k")])
def test_a_bug_still_propagates(tmp_path, monkeypatch, error):
    from convert import to_litert

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(to_litert, "load_scenario", broken)  # to_litert used to swallow ValueError/KeyError
    with pytest.raises(type(error)):
        to_litert.main(["--checkpoint", "smollm2", "--scenario", "qa", "--out", str(tmp_path)])


def test_guard_passes_other_exceptions_and_return_values():
    @cli.main_guard
    def main(fail_with=None):
        if fail_with is not None:
            raise fail_with
        return 7

    assert main() == 7
    with pytest.raises(RuntimeError):
        main(RuntimeError("a bug"))
    with pytest.raises(SystemExit) as e:
        main(cli.InputError("bad\ninput"))
    assert e.value.code == 2


# ------------------------------------------------------------------ real command lines
def test_train_malformed_jsonl_line_end_to_end(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"context": "c", "instruction": "q", "answer": "a"}\n{bad json\n')
    p = run_cli("train.py", "configs/tasks/jsonl.yaml", "model_name=tiny-random", "data.tokenizer=bytes",
                "memory.sink=8", "memory.window=128", f"data.files=[{data}]", f"run.output_dir={tmp_path / 'run'}",
                "eval.before=false", "eval.after=false", "run.report=false")
    assert_user_error_process(p, f"{data}:2: bad JSON")


def test_to_litert_numeric_prefill_chunks_end_to_end(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("sink: 4\nwindow: 16\nprefill_chunks: 16\n")
    p = run_cli("-m", "convert.to_litert", "--checkpoint", "smollm2", "--scenario", str(path), "--out", str(tmp_path))
    assert_user_error_process(p, "prefill_chunks must be a list", "got 16")
