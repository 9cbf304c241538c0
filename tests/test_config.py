"""Layered config loading: errors name the offending key; layers apply in order."""

from __future__ import annotations

from pathlib import Path

import pytest

from eijax.train.config_schema import ConfigError, load_config


def _exp(tmp_path, text: str):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_defaults_are_smollm2_with_the_shipped_recipe():
    """`python train.py` is stage 1 of `smollm2-memory`'s recipe (configs/experiments/smollm2_distill.yaml)
    and only the memory path."""
    c = load_config()
    assert c.model.checkpoint == "smollm2" and c.model.n_layers == 30 and c.model.tie_embeddings
    assert c.optim.trainable == ["gate", "memory_adapter"] and c.optim.weight_decay == 0.0
    assert (c.memory.rule, c.memory.adapter, c.optim.distill_weight) == ("delta", True, 1.0)
    assert c.data.tasks == ["passkey", "multikey"] and c.eval.compare == "smollm2-memory"
    shipped = load_config(Path(__file__).parents[1] / "configs/experiments/smollm2_distill.yaml")
    for key in ("memory.rule", "memory.adapter", "optim.trainable", "optim.learning_rate", "optim.distill_weight",
                "data.tasks", "data.context_lengths", "data.batch_size"):
        section, name = key.split(".")
        assert getattr(getattr(c, section), name) == getattr(getattr(shipped, section), name), key


def test_every_experiment_config_loads_and_writes_to_its_own_folder():
    """Each file of configs/experiments is one command (`python train.py <file>`): it must load, and
    no two may share an output folder, or one run would resume from the other's checkpoints."""
    files = sorted((Path(__file__).parents[1] / "configs/experiments").glob("*.yaml"))
    assert len(files) > 10
    folders = {f.name: load_config(f).run.output_dir for f in files}
    assert len(set(folders.values())) == len(folders), folders


def test_layer_order_base_model_experiment_cli(tmp_path):
    exp = _exp(tmp_path, "model_name: qwen3-0.6b\noptim:\n  learning_rate: 3.0e-3\n  warmup_steps: 7\n")
    c = load_config(exp, ["optim.learning_rate=1e-2", "mesh_name=fsdp"])
    assert c.model.family == "qwen3" and c.model.head_dim == 128      # model file chosen by experiment
    assert c.optim.warmup_steps == 7                                     # experiment over base
    assert c.optim.learning_rate == pytest.approx(1e-2)                  # command line over experiment ("1e-2" string)
    assert (c.mesh.data, c.mesh.fsdp) == (1, -1)                         # mesh preset from the command line


@pytest.mark.parametrize("override, needle", [
    (["optim.lerning_rate=1"], "optim.lerning_rate"),
    (["optim.learning_rate=fast"], "optim.learning_rate"),
    (["run.steps=1.5"], "run.steps"),
    (["memory.gate=huge"], "memory.gate"),
    (["checkpoint.keep=true"], "checkpoint.keep"),
    (["run.steps=3", "run.steps=4"], "run.steps"),
    (["model_name=gpt5"], "gpt5"),
    (["steps"], "steps"),
    (["run.output_dir=gs://bucket/run"], "run.output_dir"),
])
def test_command_line_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, override)


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'optim.learning_rate'"):
        load_config(None, ["optim.lerning_rate=1"])


@pytest.mark.parametrize("text,needle", [
    ("optim:\n  warmup: 3\n", r"optim\.warmup.*exp\.yaml"),           # unknown key: names the file
    ("run:\n  steps: 3\n  seed: 1\n  steps: 4\n", "'steps' is set twice"),
    ("data:\n  buckets: 4\n", r"data\.buckets.*expects list"),         # wrong type
])
def test_file_errors_name_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(_exp(tmp_path, text))


def test_model_arch_key_set_again_needs_override(tmp_path):
    exp = _exp(tmp_path, "model:\n  n_layers: 4\n")
    with pytest.raises(ConfigError, match=r"model\.n_layers.*override_model_config"):
        load_config(exp)
    with pytest.raises(ConfigError, match=r"model\.d_model"):
        load_config(None, ["model.d_model=128"])
    c = load_config(exp, ["override_model_config=true"])
    assert c.model.n_layers == 4
    # the checkpoint path and dtypes are not architecture: free to change
    assert load_config(None, ["model.checkpoint=/tmp/x", "model.dtype=bfloat16"]).model.dtype == "bfloat16"


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="data.buckets"):
        load_config(None, ["data.buckets=[1,2]", "data.max_segments=8"])
    with pytest.raises(ConfigError, match="every model shape key"):
        load_config(None, ["model.checkpoint=''", "model_name=smollm2-135m", "override_model_config=true",
                           "model.d_model=0"])


def test_needle_depth_ranges_become_one_source_each():
    from eijax.train.loop import data_config

    cfg = load_config(None, ["data.tasks=[passkey]", "data.context_lengths=[2000]",
                             "data.needle_depths=[[0.0,1.0],[0.0,0.12]]"])
    sources = data_config(cfg)["sources"]
    assert [s.get("depth_range") for s in sources] == [None, (0.0, 0.12)]  # the default passes nothing
    with pytest.raises(ConfigError, match="data.needle_depths"):
        data_config(load_config(None, ["data.needle_depths=[[0.5,0.2]]"]))
