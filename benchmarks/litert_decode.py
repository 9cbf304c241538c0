"""Where a LiteRT decode step's time goes: decode tokens/s of converted graphs (recipes x thread
counts) measured in one process in interleaved rounds (best round kept), the weight bytes each
token reads against this machine's measured copy bandwidth, and optionally a `perf` profile of one
graph's decode loop.

    python -m benchmarks.litert_decode --dir exports/qa_memory_prior \
        --recipes dynamic_int8,mixed,int4_block32 --threads 1,2
    python -m benchmarks.litert_decode --dir exports/qa_memory_prior --recipes dynamic_int8 --threads 2 --perf 8

A CPU decode step reads every weight once per token, so tokens/s x the graph's size is the weight
bandwidth it reaches; against the machine's copy bandwidth that says whether a recipe is bound by
memory or by the rest of the step (the profile then says which rest). `--perf S` records S seconds
of the first graph's decode with Linux `perf record -g` (needs perf and permission to attach to this
process) and prints the native symbols that took the most samples.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import warn_if_busy


def copy_bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
    """Bytes read + written per second by one large memory copy (best of `repeats`)."""
    a = np.ones(mib * 2**20, np.uint8)
    b = np.empty_like(a)
    best = min(_seconds(lambda: np.copyto(b, a)) for _ in range(repeats))
    return 2 * a.nbytes / best / 1e9


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_tps(model, prompt: list[int], tokens: int) -> float:
    """Greedy decode rate after the first token (stop tokens ignored: exactly `tokens` generated)."""
    from convert.litert_runtime import Streamer

    t_first = None
    for i, _ in enumerate(Streamer(model).generate(prompt, tokens, ())):
        if i == 0:
            t_first = time.perf_counter()
    return (tokens - 1) / (time.perf_counter() - t_first)


def perf_profile(model, prompt: list[int], seconds: float, top: int) -> list[tuple[float, str]]:
    """(percent of samples, symbol) for the `top` symbols of `seconds` of this process's decode."""
    from convert.litert_runtime import Streamer

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        stream = Streamer(model).generate(prompt, 100_000, ())
        next(stream)  # prefill done: record decode only
        rec = subprocess.Popen(["perf", "record", "-F", "499", "-g", "-p", str(os.getpid()), "-o", data, "--",
                                "sleep", str(seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while rec.poll() is None:
            next(stream)
        if rec.returncode:
            raise SystemExit(f"error: perf record failed: {rec.stderr.strip()[-300:]}")
        rep = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "sym", "-g", "none",
                              "--stdio"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in rep.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0].endswith("%"):
            rows.append((float(parts[0][:-1]), parts[2].strip()))
    return rows[:top]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.litert_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True, help="folder of converted graphs (<scenario>_<recipe>.tflite)")
    p.add_argument("--scenario", default="qa")
    p.add_argument("--recipes", default="dynamic_int8", help="comma list")
    p.add_argument("--threads", default="2", help="comma list of XNNPACK thread counts")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per timing")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over every graph x threads")
    p.add_argument("--perf", type=float, default=0.0, help="seconds of perf record on the first graph's decode")
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args(argv)
    from convert.litert_runtime import LiteRTModel
    from convert.run_litert import warm

    paths = {r: Path(a.dir) / f"{a.scenario}_{r}.tflite" for r in a.recipes.split(",") if r}
    for r, path in paths.items():
        if not path.is_file():
            p.error(f"no {path}: convert it with python -m convert.to_litert --quant {r}")
    threads = [int(t) for t in a.threads.split(",") if t]
    warn_if_busy()
    prompt = [int(x) for x in np.random.RandomState(0).randint(100, 40000, size=a.prompt_tokens)]
    models = {}
    for r, path in paths.items():
        for th in threads:
            models[r, th] = LiteRTModel(path, num_threads=th)
            warm(models[r, th])
    best: dict[tuple[str, int], float] = {}
    for _ in range(a.rounds):
        for key, model in models.items():
            best[key] = max(best.get(key, 0.0), decode_tps(model, prompt, a.tokens))
    bandwidth = copy_bandwidth_gbs()
    print(f"decode after a {a.prompt_tokens}-token prompt, {a.tokens} tokens, best of {a.rounds} interleaved rounds; "
          f"memory copy bandwidth {bandwidth:.1f} GB/s (read + write)")
    print(f"| recipe | threads | graph MiB | decode tokens/s | weight GB/s (size x tokens/s) |\n|---|---|---|---|---|")
    for (r, th), tps in best.items():
        size = paths[r].stat().st_size
        print(f"| {r} | {th} | {size / 2**20:.0f} | {tps:.1f} | {size * tps / 1e9:.1f} |")
    out = dict(decode_tps={f"{r}@{th}": v for (r, th), v in best.items()}, copy_gbs=bandwidth)
    if a.perf:
        key = next(iter(models))
        rows = perf_profile(models[key], prompt, a.perf, a.top)
        print(f"\nperf: {key[0]} at {key[1]} threads, {a.perf:g} s of decode, top symbols (% of samples):")
        for pct, sym in rows:
            print(f"  {pct:6.2f}%  {sym}")
        out["perf"] = rows
    return out


if __name__ == "__main__":
    main()
