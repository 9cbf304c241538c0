"""Sharded and multi-process training on CPU: an 8-device (data, fsdp, tensor) = (2, 2, 2) step
equals the 1-device step, a checkpoint saved on one mesh resumes on another, and a 2-process run
over loopback trains and checkpoints.

Fake devices need XLA_FLAGS before jax is imported, so these tests run in subprocesses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from eijax.testing import TINY_TRAIN_ARGS

ROOT = Path(__file__).resolve().parents[1]
TINY = list(TINY_TRAIN_ARGS)

SHARDED_STEP = r"""
import json, sys
import jax, numpy as np
from eijax.train import sharding as shd
from eijax.train.config_schema import load_config
from eijax.train.loop import build_model, shard_training_state
from eijax.train.optim import make_optimizer, memory_path_only, split_trainable
from eijax.train.step import jit_train_step, prepare_batch

cfg = load_config(None, sys.argv[1:])
rules = shd.rules_from_config(cfg.mesh.logical_axis_rules)
rng = np.random.RandomState(0)
n = 8 + 2 * 128
batch = dict(tokens=rng.randint(0, 512, (4, n)).astype(np.int32), valid=np.ones((4, n), bool),
             labels=rng.randint(0, 512, (4, n)).astype(np.int32), loss_mask=(rng.rand(4, n) < 0.2).astype(np.float32))
batch["valid"][1, 200:] = False

batch = prepare_batch(batch, cfg.memory.sink, cfg.memory.window)
out = {}
for name, mesh in [("one", shd.make_mesh(1, 1, 1, jax.devices()[:1])), ("eight", shd.make_mesh(2, 2, 2))]:
    model = build_model(cfg)
    graphdef, tr, fr = split_trainable(model, cfg.optim.trainable)
    tx = make_optimizer(cfg.optim, 10)
    trainable, frozen, opt_state, sh = shard_training_state(tr, fr, tx, mesh, rules)
    step = jit_train_step(graphdef, tx, 64, sh, memory_path_only(tr))
    losses = []
    for _ in range(3):
        b = shd.global_batch(batch, sh["batch"])
        trainable, opt_state, m = step(trainable, opt_state, frozen, b)
        losses.append(float(m["loss"]))
    specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(frozen)})
    out[name] = dict(losses=losses, gate=[np.asarray(x).ravel().tolist() for x in jax.tree.leaves(trainable)],
                     devices=len(jax.tree.leaves(frozen)[0].sharding.device_set), specs=specs)
print("RESULT" + json.dumps(out))
"""


def _run(cmd, env_extra=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_eight_device_sharded_step_equals_one_device():
    p = _run([sys.executable, "-c", SHARDED_STEP, *TINY],
             {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.split("RESULT", 1)[1])
    one, eight = res["one"], res["eight"]
    assert one["devices"] == 1 and eight["devices"] == 8
    assert any("tensor" in s for s in eight["specs"]) and any("fsdp" in s for s in eight["specs"])
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-5)
    assert one["losses"][2] != one["losses"][0]  # the gate moved
    for a, b in zip(eight["gate"], one["gate"]):
        # float32 reduction order differs over 8 shards: near-zero entries move by ~2e-6 after 3 Adam steps
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-6)


# Three runs of 3 steps in one 8-device process: the reference on mesh data=8; the same run stopped
# by SIGTERM after the step-2 checkpoint; that checkpoint resumed on data=2 fsdp=2 tensor=2 with the
# gate's heads split over `tensor` (so restoring has to re-shard, not just copy). checkpointing.save
# and .restore are wrapped to record what was saved and what came back.
RESHARD_RESUME = r"""
import json, os, signal, sys
import jax, numpy as np
from eijax.train import checkpointing as ckpt
from eijax.train.config_schema import MeshSection, load_config
from eijax.train.loop import run

# the reference and the stopped run compile the same step on the same mesh: compile it once
jax.config.update("jax_compilation_cache_dir", f"{sys.argv[1]}/jax_cache")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
base = dict(a.split("=", 1) for a in sys.argv[2:])
def config(name, **extra):
    args = {**base, "run.output_dir": f"{sys.argv[1]}/{name}", **extra}
    return load_config(None, [f"{k}={v}" for k, v in args.items()])

def describe(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): dict(value=np.asarray(jax.device_get(x)).tolist(), spec=str(x.sharding.spec),
            mesh=dict(x.sharding.mesh.shape), shard=list(x.sharding.shard_shape(x.shape))) for p, x in flat}

saved, restored = {}, {}
save, restore = ckpt.save, ckpt.restore
def recording_save(manager, step, trainable, opt_state, *a, **k):
    saved[step] = dict(trainable=describe(trainable), opt_state=describe(opt_state))
    return save(manager, step, trainable, opt_state, *a, **k)
def recording_restore(*a, **k):
    step, trainable, opt_state = restore(*a, **k)
    restored.update(step=step, trainable=describe(trainable), opt_state=describe(opt_state))
    return step, trainable, opt_state
ckpt.save, ckpt.restore = recording_save, recording_restore

def stop_at_2(step, record):
    if step == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # caught by the loop: checkpoint, then exit

first_mesh = {"mesh.data": 8, "mesh.fsdp": 1, "mesh.tensor": 1}
rules = [[k, "tensor" if k == "gate_heads" else v] for k, v in MeshSection().logical_axis_rules]
new_mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "mesh.logical_axis_rules": json.dumps(rules)}
reference = run(config("reference", **first_mesh, **{"checkpoint.enabled": "false"}))
stopped = run(config("resumed", **first_mesh), on_step=stop_at_2)
resumed = run(config("resumed", **new_mesh))
print("RESULT" + json.dumps(dict(reference=reference["losses"], stopped=stopped["losses"],
                                 resumed=resumed["losses"], saved=saved.get(2), restored=restored)))
"""


def test_checkpoint_resumes_on_a_different_mesh(tmp_path):
    args = [*TINY, "run.steps=3", "checkpoint.every=2", "checkpoint.async_save=false", "data.batch_size=8"]
    p = _run([sys.executable, "-c", RESHARD_RESUME, str(tmp_path), *args],
             {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.split("RESULT", 1)[1])
    ref, saved, restored = res["reference"], res["saved"], res["restored"]
    assert len(ref) == 3 and res["stopped"] == ref[:2]  # same mesh, same data: bit-identical
    assert saved is not None and restored["step"] == 2
    # (a) restored gate and Adam state are exactly what was saved
    for item in ("trainable", "opt_state"):
        assert restored[item].keys() == saved[item].keys() and saved[item]
        for key, leaf in saved[item].items():
            np.testing.assert_array_equal(np.asarray(restored[item][key]["value"], np.float32),
                                          np.asarray(leaf["value"], np.float32), err_msg=f"{item}{key}")
    # (b) saved on the data=8 mesh (gate replicated), restored onto the new mesh, heads split over tensor
    new_mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(leaf["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1} for leaf in saved["trainable"].values())
    assert all(leaf["mesh"] == new_mesh for leaf in restored["trainable"].values())
    split = [k for k, leaf in restored["trainable"].items() if "tensor" in leaf["spec"]]
    assert split and all("tensor" not in saved["trainable"][k]["spec"] for k in split)
    for k in split:
        full, shard = saved["trainable"][k]["shard"], restored["trainable"][k]["shard"]
        assert np.prod(shard) * 2 == np.prod(full), (k, full, shard)
    # (c) training goes on: step 3 on the new mesh gives the reference's step-3 loss. The meshes may
    # reduce in another order, so a float32-rounding tolerance, not bitwise (on CPU it came out equal)
    assert len(res["resumed"]) == 1
    np.testing.assert_allclose(res["resumed"][0], ref[2], rtol=1e-5)
    assert ref[2] != ref[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_cpu_run_trains(tmp_path):
    port = _free_port()
    args = [*TINY, f"run.output_dir={tmp_path}", "run.steps=3", "checkpoint.every=2", "data.batch_size=2",
            "distributed.enabled=true", f"distributed.coordinator_address=127.0.0.1:{port}",
            "distributed.num_processes=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "train.py", *args, f"distributed.process_id={i}"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    assert "2 process(es)" in outs[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and all(np.isfinite(summary["losses"]))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]
    # each process saved its own data-iterator state
    data_files = sorted(f.name for f in (tmp_path / "checkpoints" / "3" / "data").glob("process_*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
