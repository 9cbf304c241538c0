"""The training loop on a tiny random model: gate-only updates, bucketing, resume after SIGTERM,
checkpoints that refuse another model."""

from __future__ import annotations

import json
import os
import signal

import jax
import numpy as np
import pytest

from eijax.testing import TINY_TRAIN_ARGS
from eijax.train.config_schema import load_config

TINY = list(TINY_TRAIN_ARGS)


def tiny_config(tmp_path, *extra):
    """TINY with `extra` replacing keys it sets (a key twice on one command line is an error)."""
    args = dict(a.split("=", 1) for a in [*TINY, f"run.output_dir={tmp_path}", *extra])
    return load_config(None, [f"{k}={v}" for k, v in args.items()])


def test_gate_only_step_keeps_base_frozen():
    from flax import nnx

    from eijax.train import sharding as shd
    from eijax.train.loop import build_model, shard_training_state
    from eijax.train.optim import count_params, make_optimizer, memory_path_only, split_trainable
    from eijax.train.step import jit_train_step, prepare_batch

    cfg = load_config(None, TINY)
    model = build_model(cfg)
    graphdef, tr_state, fr_state = split_trainable(model, cfg.optim.trainable)
    assert {p[1] for p, _ in nnx.to_flat_state(tr_state)} == {"gate"}
    tx = make_optimizer(cfg.optim, 10)
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    trainable, frozen, opt_state, sh = shard_training_state(tr_state, fr_state, tx, mesh, shd.rules_from_config(
        cfg.mesh.logical_axis_rules))
    # optimizer state exists for the gate only: Adam's mu and nu are each gate-sized
    assert count_params(opt_state) <= 2 * count_params(trainable) + 8
    frozen_before = jax.tree.map(np.asarray, frozen)
    rng = np.random.RandomState(0)
    n = 8 + 2 * 128
    batch = dict(tokens=rng.randint(0, 259, (2, n)).astype(np.int32), valid=np.ones((2, n), bool),
                 labels=rng.randint(0, 259, (2, n)).astype(np.int32), loss_mask=np.zeros((2, n), np.float32))
    batch["loss_mask"][:, -20:] = 1
    batch = prepare_batch(batch, cfg.memory.sink, cfg.memory.window)
    step = jit_train_step(graphdef, tx, 64, sh, memory_path_only(tr_state))
    gate_before = jax.tree.map(np.asarray, trainable)
    trainable, opt_state, m = step(trainable, opt_state, frozen, batch)
    trainable, opt_state, m = step(trainable, opt_state, frozen, batch)
    assert np.isfinite(float(m["loss"])) and float(m["answer_tokens"]) == 40
    changed = jax.tree.map(lambda a, b: not np.allclose(a, np.asarray(b)), gate_before, trainable)
    assert all(jax.tree.leaves(changed))
    same = jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), frozen_before, frozen)
    assert all(jax.tree.leaves(same))


def test_lr_scale_multiplies_one_modules_updates():
    import jax.numpy as jnp

    from eijax.train.config_schema import OptimSection
    from eijax.train.optim import check_lr_scale, make_optimizer

    params = {"blocks": {"gate": {"w": jnp.ones(3)}, "key_conv": {"taps": jnp.ones(3)}}}
    grads = {"blocks": {"gate": {"w": jnp.full(3, 0.5)}, "key_conv": {"taps": jnp.full(3, 0.5)}}}
    tx = make_optimizer(OptimSection(warmup_steps=0, clip_norm=0.0, lr_scale=[["key_conv", 20]]), 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["blocks"]["key_conv"]["taps"], 20 * updates["blocks"]["gate"]["w"], rtol=1e-6)
    assert float(jnp.abs(updates["blocks"]["gate"]["w"]).max()) > 0
    check_lr_scale(OptimSection(lr_scale=[["key_conv", 2]]), params)
    with pytest.raises(ValueError, match="adapter"):
        check_lr_scale(OptimSection(lr_scale=[["adapter", 2]]), params)


def test_chunked_loss_equals_full_logits():
    import jax.numpy as jnp

    from eijax.train.loop import build_model
    from eijax.train.step import chunked_cross_entropy

    model = build_model(load_config(None, TINY))
    rng = np.random.RandomState(1)
    hidden = jnp.asarray(rng.randn(2, 72, 64), jnp.float32)
    labels = jnp.asarray(rng.randint(0, 512, (2, 72)), jnp.int32)
    mask = jnp.asarray(rng.rand(2, 72) < 0.3, jnp.float32)
    logp = jax.nn.log_softmax(model.logits(hidden))
    want = -jnp.sum(jnp.take_along_axis(logp, labels[..., None], -1)[..., 0] * mask)
    got, cnt, _ = chunked_cross_entropy(model, hidden, labels, mask, chunk=16)  # 72 is not a multiple: padded
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    assert float(cnt) == float(mask.sum())


def test_prepare_batch_keeps_the_loss_and_cuts_only_padding():
    """The step's inputs (answer positions only, last segment cut) give the loss of every position."""
    import jax.numpy as jnp
    from flax import nnx

    from eijax.train.loop import build_model
    from eijax.train.step import loss_fn, prepare_batch

    cfg = load_config(None, TINY)
    s, w = cfg.memory.sink, cfg.memory.window
    model = build_model(cfg)
    rng = np.random.RandomState(3)
    n = s + 3 * w
    valid = np.zeros((2, n), bool)
    valid[0, :s + 2 * w + 10] = True
    valid[1, :s + 2 * w + 70] = True
    tokens = np.where(valid, rng.randint(0, 259, (2, n)), 0).astype(np.int32)
    labels = rng.randint(0, 259, (2, n)).astype(np.int32)
    mask = np.zeros((2, n), np.float32)
    mask[0, s + 2 * w + 2:s + 2 * w + 9] = 1
    mask[1, s + 2 * w + 40:s + 2 * w + 69] = 1
    out = prepare_batch(dict(tokens=tokens, valid=valid, labels=labels, loss_mask=mask), s, w)
    assert out["tokens"].shape == (2, s + 2 * w + 128) and out["loss_index"].shape == (2, 32)
    assert out["loss_weight"].sum() == mask.sum()
    np.testing.assert_array_equal(out["loss_labels"][0, :7], labels[0, s + 2 * w + 2:s + 2 * w + 9])
    graphdef, trainable, frozen = nnx.split(model, nnx.PathContains("gate"), ...)
    every = dict(tokens=tokens, valid=valid, loss_index=np.tile(np.arange(n, dtype=np.int32), (2, 1)),
                 loss_labels=labels, loss_weight=mask)
    want, _ = loss_fn(trainable, frozen, graphdef, {k: jnp.asarray(v) for k, v in every.items()}, 64)
    got, aux = loss_fn(trainable, frozen, graphdef, {k: jnp.asarray(v) for k, v in out.items()}, 64, True)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    assert float(aux["answer_tokens"]) == mask.sum()


def _losses(path):
    return [json.loads(l)["loss"] for l in open(path / "metrics.jsonl") if json.loads(l)["kind"] == "train"]


def test_resume_after_sigterm_gives_identical_losses(tmp_path):
    """Also covers bucketing (two shapes, one compiled step each) and gradient accumulation."""
    from eijax.train.loop import run

    # contexts of 250 and 500 bytes need 3 and 5 segments of 128 (with the question): buckets 4 and 8
    steps = ["run.steps=5", "checkpoint.every=2", "data.context_lengths=[250,500]", "optim.grad_accum=2"]
    full = run(tiny_config(tmp_path / "full", *steps))
    assert len(full["losses"]) == 5 and all(np.isfinite(full["losses"]))
    # tokens cut to the last slot used (rounded up to 64 within its segment); answer slots: a power of two
    shapes = sorted((tuple(t), tuple(a)) for t, a in full["compiled_shapes"])
    assert 2 <= len(shapes) <= 4, shapes
    for (b, n), (_, k) in shapes:
        assert b == 1 and (n - 8) % 64 == 0 and n <= 8 + 8 * 128 and k in (16, 32, 64), shapes

    def kill_at_3(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # what a TPU preemption sends

    first = run(tiny_config(tmp_path / "killed", *steps), on_step=kill_at_3)
    assert first["preempted"] and first["steps"] == 3
    assert sorted(os.listdir(tmp_path / "killed" / "checkpoints")) == ["2", "3"]
    second = run(tiny_config(tmp_path / "killed", *steps))
    assert second["steps"] == 5 and len(second["losses"]) == 2
    np.testing.assert_array_equal(first["losses"] + second["losses"], full["losses"])
    assert _losses(tmp_path / "killed") == full["losses"]


def test_checkpoint_for_another_model_fails_clearly(tmp_path):
    from eijax.trained import CheckpointMismatch, restore_params
    from eijax.train.loop import build_model, run

    run(tiny_config(tmp_path, "run.steps=1", "checkpoint.async_save=false"))
    ok = build_model(tiny_config(tmp_path))
    assert restore_params(ok, tmp_path) == 1
    other = build_model(tiny_config(tmp_path, "override_model_config=true", "model.n_layers=3"))
    with pytest.raises(CheckpointMismatch, match="n_layers"):
        restore_params(other, tmp_path)


def test_load_trained_restores_the_runs_memory_path_on_its_base(tmp_path):
    """A run trained with the memory adapter and write gate on an exported base folder comes back
    through `load_trained` (used by generate and convert) with its adapter, write gate, gate and rule, while sink and
    window follow the inference override and the base weights are the folder's."""
    from flax import nnx

    from convert.loading import load_model
    from convert.to_torch import export_folder
    from eijax.config import MemoryConfig
    from eijax.trained import load_trained, restore_params
    from eijax.train.loop import build_model, run

    base_dir = export_folder(build_model(tiny_config(tmp_path / "base")), tmp_path / "base")
    extra = [f"model.checkpoint={base_dir}", "memory.adapter=true", "memory.rule=delta", "memory.write_gate=true",
             "optim.trainable=[gate,memory_adapter,write_gate]", "run.steps=2", "checkpoint.async_save=false"]
    run(tiny_config(tmp_path / "run", *extra))
    trained = build_model(tiny_config(tmp_path / "run", *extra))
    assert restore_params(trained, tmp_path / "run") == 2
    params = lambda m, f=nnx.Param: {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(m, f))}
    want = params(trained)
    identity = np.broadcast_to(np.eye(16), want[("blocks", "memory_adapter", "q")].shape)
    assert not np.allclose(want[("blocks", "memory_adapter", "q")], identity)  # the adapter did train
    assert np.any(want[("blocks", "write_gate", "w")])                            # and the write gate

    # the run exported as a memory file (what ships as "smollm2-memory") loads the same everywhere
    from eijax.trained import main as export_main, trained_base

    export_main([str(tmp_path / "run"), str(tmp_path / "exported" / "mem")])
    assert trained_base(tmp_path / "exported" / "mem.json") == str(base_dir)
    for loaded in (load_trained(tmp_path / "run", MemoryConfig(sink=4, window=64)),
                   load_model(tmp_path / "run", MemoryConfig(sink=4, window=64)),
                   load_trained(tmp_path / "exported" / "mem", MemoryConfig(sink=4, window=64)),
                   load_model(tmp_path / "exported" / "mem.safetensors", MemoryConfig(sink=4, window=64))):
        m = loaded.memory_config
        assert (m.sink, m.window, m.adapter, m.write_gate, m.rule) == (4, 64, True, True, "delta")
        got = params(loaded)
        assert got.keys() == want.keys()
        for path in want:
            np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))

    # a new run warm-started from either form begins where the trained one ended (model.init_memory)
    for source in (tmp_path / "run", tmp_path / "exported" / "mem"):
        warm = build_model(tiny_config(tmp_path / "warm", *extra, f"model.init_memory={source}"))
        got = params(warm)
        for path in want:
            np.testing.assert_array_equal(got[path], want[path], err_msg=f"{source}: {path}")
    from eijax.trained import CheckpointMismatch
    linear = [e for e in extra if e != "memory.rule=delta"] + ["memory.rule=linear"]
    with pytest.raises(CheckpointMismatch, match="rule: 'delta' vs 'linear'"):
        build_model(tiny_config(tmp_path / "warm", *linear, f"model.init_memory={tmp_path / 'exported' / 'mem'}"))

    # a run that trains only the write gate on top of a warm start: loading it (or its export) gives
    # the init's gate and adapter with the run's own write gate
    only = [e for e in extra if not e.startswith("optim.trainable")] + [
        "optim.trainable=[write_gate]", f"model.init_memory={tmp_path / 'exported' / 'mem'}"]
    run(tiny_config(tmp_path / "stage2", *only))
    export_main([str(tmp_path / "stage2"), str(tmp_path / "exported" / "stage2")])
    for loaded in (load_trained(tmp_path / "stage2"), load_trained(tmp_path / "exported" / "stage2")):
        got = params(loaded)
        for path in want:
            if "write_gate" in path:
                assert not np.array_equal(got[path], want[path]), path  # trained again in stage 2
            else:
                np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))


def test_report_scores_the_compared_memory_path_on_the_same_samples(tmp_path):
    """eval.compare: after training, a trained memory path for the same base is scored on the run's
    own eval samples and gets its column in report.md; one for another base is skipped."""
    from convert.to_torch import export_folder
    from eijax.trained import save_memory_file
    from eijax.train.loop import build_model, run

    base_dir = export_folder(build_model(tiny_config(tmp_path / "base")), tmp_path / "base")
    extra = [f"model.checkpoint={base_dir}", "run.steps=1", "checkpoint.enabled=false", "run.report=true",
             "eval.after=true", "eval.tasks=[passkey]", "eval.lengths=[200]", "eval.examples=2",
             "eval.max_new_tokens=4"]
    save_memory_file(build_model(tiny_config(tmp_path / "x", *extra)), ["gate"], tmp_path / "mem", str(base_dir))
    summary = run(tiny_config(tmp_path / "run", *extra, f"eval.compare={tmp_path / 'mem'}"))
    assert set(summary["eval_compare"]) >= {"acc/passkey/200"}
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"| task | context tokens | before | after | `{tmp_path / 'mem'}` |" in report

    save_memory_file(build_model(tiny_config(tmp_path / "x", *extra)), ["gate"], tmp_path / "other", "elsewhere")
    summary = run(tiny_config(tmp_path / "run2", *extra, f"eval.compare={tmp_path / 'other'}"))
    assert "eval_compare" not in summary and "eval_after" in summary
