"""Shared helpers for the benchmarks: SmolLM2-shaped models, a child-process runner that reports
peak RSS (ru_maxrss), and this machine's measured matmul peak."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

# SmolLM2-135M-Instruct's shape (MODEL_API facts); random weights give the same compute.
SMOLLM2_HF = dict(model_type="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536,
                  rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192,
                  rope_parameters={"rope_type": "default", "rope_theta": 100000.0})


def smollm2_shaped(memory, layers: int = 30, max_position: int = 8192, real: bool = False):
    """SmolLM2 (optionally with fewer layers); `real` loads the packaged weights (all 30 layers)."""
    from eijax.config import model_config_from_hf
    from eijax.pretrained import build_model, load_pretrained

    if real:
        return load_pretrained("smollm2", memory)
    hf = dict(SMOLLM2_HF, num_hidden_layers=layers, max_position_embeddings=max_position)
    return build_model(model_config_from_hf(hf), memory)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_child(module: str, args: list[str], timeout: float = 1800, flag: str | None = "--child") -> dict[str, Any]:
    """Run `python -m module <flag> ...` in a fresh process; it prints one JSON line last."""
    cmd = [sys.executable, "-m", module, *([flag] if flag else []), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def timed(fn, *args, repeats: int = 3, calls: int = 1) -> tuple[float, Any]:
    """(best over `repeats` of the mean seconds per call of `calls` back-to-back calls, after one
    warm-up call; last output)."""
    import jax

    out = jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / calls)
    return best, out


def warn_if_busy(threshold: float = 0.5) -> float:
    """Warn when the 1-minute load average says another process is busy (timings would be off:
    on 2 cores a second busy process stalls the OpenMP / Eigen thread pools). Returns the load."""
    load = os.getloadavg()[0]
    if load > threshold:
        print(f"warning: load average {load:.2f} > {threshold}: another process is busy; timings will be "
              "slower than on a quiet machine", file=sys.stderr, flush=True)
    return load


def op_profile(run, steps: int, top: int = 15) -> list[tuple[str, float, int]]:
    """Trace run() (which does `steps` steps: decode steps, train steps) and aggregate the XLA ops of
    the trace by kind (the name without XLA's numeric suffix, e.g. every `dot.N` is `dot`): [(kind,
    ms per step, calls per step)], slowest first. Durations are summed over threads, so ops
    that ran side by side can add up to more than the wall time."""
    import jax

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        run()
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total, calls = collections.defaultdict(float), collections.Counter()
    for e in events:  # complete events of XLA's thunks; Python frames ('$...') and executor wrappers are skipped
        name = e.get("name", "")
        if e.get("ph") == "X" and not (name.startswith(("$", "ThunkExecutor", "Pjit", "ParseArguments", "np."))
                                       or "::" in name):
            kind = re.sub(r"\.\d+$", "", name)
            total[kind] += e["dur"] / 1e3
            calls[kind] += 1
    rows = sorted(total.items(), key=lambda kv: -kv[1])[:top]
    return [(name, ms / steps, calls[name] // steps) for name, ms in rows]
