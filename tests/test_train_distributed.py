"""Sharded and multi-process training on CPU: an 8-device (data, fsdp, tensor) = (2, 2, 2) step
equals the 1-device step, and a 2-process run over loopback trains and checkpoints.

Fake devices need XLA_FLAGS before jax is imported, so both run in subprocesses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model_name=tiny-random", "data.tokenizer=bytes", "memory.sink=8", "memory.window=128", "memory.remat=none",
        "data.tasks=[passkey]", "data.context_lengths=[250]", "data.max_segments=8", "data.buckets=[4,8]",
        "eval.before=false", "eval.after=false", "optim.learning_rate=1e-2", "optim.warmup_steps=1", "run.report=false"]

SHARDED_STEP = r"""
import json, sys
import jax, numpy as np
from eijax.train import sharding as shd
from eijax.train.config_schema import load_config
from eijax.train.loop import build_model, shard_training_state
from eijax.train.optim import make_optimizer, split_trainable
from eijax.train.step import jit_train_step

cfg = load_config(None, sys.argv[1:])
rules = shd.rules_from_config(cfg.mesh.logical_axis_rules)
rng = np.random.RandomState(0)
n = 8 + 2 * 128
batch = dict(tokens=rng.randint(0, 512, (4, n)).astype(np.int32), valid=np.ones((4, n), bool),
             labels=rng.randint(0, 512, (4, n)).astype(np.int32), loss_mask=(rng.rand(4, n) < 0.2).astype(np.float32))
batch["valid"][1, 200:] = False
out = {}
for name, mesh in [("one", shd.make_mesh(1, 1, 1, jax.devices()[:1])), ("eight", shd.make_mesh(2, 2, 2))]:
    model = build_model(cfg)
    graphdef, tr, fr = split_trainable(model, cfg.optim.trainable)
    tx = make_optimizer(cfg.optim, 10)
    trainable, frozen, opt_state, sh = shard_training_state(tr, fr, tx, mesh, rules)
    step = jit_train_step(graphdef, tx, 64, sh)
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
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


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
