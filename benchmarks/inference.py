"""Inference speed on the real SmolLM2-135M-Instruct (all 30 layers): time to first token and decode
tokens/s against input length, for eijax in JAX (edgeinfinite), eijax's LiteRT graphs (float32 and
dynamic int8), transformers (sdpa, full attention, up to its 8K context) and llama.cpp
(llama-cpp-python) on the same GGUF file (the packaged Q4_1 one).

    python -m benchmarks.inference                                   # all engines, 256 .. 32K tokens
    python -m benchmarks.inference --engines jax,transformers --lengths 256 --decode-tokens 8   # quick check

One process per cell (engine x length; `--cell engine:length` runs one and prints one JSON line),
so no cell inherits another's memory, threads or caches. The parent prints the tables, the ratios
and the issue-10 targets (met / missed) from this one run. Every cell is warmed first (JAX compiles
its fixed chunk shapes, LiteRT packs its weights, torch and llama.cpp run a short input), so first
token is prefill + the first greedy pick, and decode is the next tokens, greedy, stop tokens ignored.
Inputs are random token ids (speed does not depend on them). Run on a quiet machine: the script
warns when the load average says another process is busy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import peak_rss_mb, run_child, warn_if_busy
from eijax import cli

MODULE = "benchmarks.inference"
ENGINES = ("jax", "litert-f32", "litert-int8", "transformers", "llamacpp")
LENGTHS = "256,1024,4096,8192,16384,32768"
LITERT_RECIPES = {"litert-f32": "float32", "litert-int8": "dynamic_int8"}
SCENARIO = "qa"  # memory on; the JAX engine runs with the same sink and window
TRANSFORMERS_CONTEXT = 8192  # SmolLM2's max_position_embeddings: full attention stops there
VOCAB = 49152


class Skip(Exception):
    """A cell that cannot run here (package missing, beyond the engine's context); the reason is printed."""


def prompt_ids(length: int) -> list[int]:
    import numpy as np

    return np.random.RandomState(0).randint(0, VOCAB, length).tolist()


def timing(ttft: float, n_tokens: int, decode_seconds: float) -> dict[str, float | None]:
    """first token + (n_tokens - 1) decode steps in decode_seconds."""
    tps = (n_tokens - 1) / decode_seconds if n_tokens > 1 and decode_seconds > 0 else None
    return dict(ttft_s=ttft, decode_tps=tps)


def best(runs: list[dict]) -> dict:
    """Lowest first-token time and highest decode rate over repeats."""
    decode = [r["decode_tps"] for r in runs if r["decode_tps"]]
    return dict(ttft_s=min(r["ttft_s"] for r in runs), decode_tps=max(decode) if decode else None)


# ------------------------------------------------------------------ cells (one per child process)
def cell_jax(a: argparse.Namespace, length: int) -> dict:
    from eijax.config import MemoryConfig
    from eijax.generate import Generator, SamplingConfig
    from eijax.pretrained import load_pretrained

    cli.enable_compilation_cache(min_compile_secs=0.0)
    t = time.perf_counter()
    model = load_pretrained(a.model, MemoryConfig(sink=a.sink, window=a.window))
    gen = Generator(model, "edgeinfinite")
    engine = gen.engine_for(length + a.decode_tokens)
    load = time.perf_counter() - t
    t = time.perf_counter()
    engine.warm_up()
    warm = time.perf_counter() - t
    ids, runs = prompt_ids(length), []
    for _ in range(a.repeats):
        out = gen.generate(ids, SamplingConfig(max_new_tokens=a.decode_tokens))  # no stop ids: exactly N tokens
        runs.append(timing(out.time_to_first_token, len(out.tokens), out.seconds - out.time_to_first_token))
    return dict(best(runs), load_s=load, warmup_s=warm, route=out.route, dtype=model.config.dtype)


def litert_path(a: argparse.Namespace, engine: str) -> Path:
    given = a.litert_f32 if engine == "litert-f32" else a.litert_int8
    return Path(given) if given else Path(a.litert_dir) / f"{SCENARIO}_{LITERT_RECIPES[engine]}.tflite"


def cell_litert(a: argparse.Namespace, length: int, engine: str) -> dict:
    path = litert_path(a, engine)
    if not path.is_file():
        raise Skip(f"no {path}: build it with python -m convert.to_litert --checkpoint {a.model} "
                   f"--scenario {SCENARIO} --quant {LITERT_RECIPES[engine]} --out {path.parent}")
    from convert.litert_runtime import LiteRTModel, Streamer
    from convert.run_litert import run

    t = time.perf_counter()
    model = LiteRTModel(path, num_threads=a.threads)
    load = time.perf_counter() - t
    ids, runs, warm = prompt_ids(length), [], None
    for _ in range(a.repeats):
        r = run(Streamer(model), ids, None, a.decode_tokens)  # warms every signature first (reported apart)
        warm = r["warmup_s"] if warm is None else warm
        runs.append(dict(ttft_s=r["time_to_first_token_s"], decode_tps=r["decode_tokens_per_s"]))
    return dict(best(runs), load_s=load, warmup_s=warm, chunks=list(model.chunks), cache=model.cache_size)


def cell_transformers(a: argparse.Namespace, length: int) -> dict:
    if length > TRANSFORMERS_CONTEXT:
        raise Skip(f"beyond its {TRANSFORMERS_CONTEXT // 1024}K context (full attention)")
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from eijax.checkpoint import read_checkpoint

    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    # The GGUF's dequantised tensors (identical to transformers' own GGUF loader's, asserted in
    # tests/test_checkpoint_readers.py), read through eijax's weight cache: seconds, not a minute.
    config, tensors = read_checkpoint(a.model)
    hf = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    model = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa", dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()},
                                                strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    load = time.perf_counter() - t
    t = time.perf_counter()
    _torch_greedy(model, prompt_ids(64), 2)
    warm = time.perf_counter() - t
    runs = [_torch_greedy(model, prompt_ids(length), a.decode_tokens) for _ in range(a.repeats)]
    return dict(best(runs), load_s=load, warmup_s=warm, attention=model.config._attn_implementation)


def _torch_greedy(model, ids: list[int], n_tokens: int) -> dict:
    """Prefill (logits of the last position only, like the other engines), then greedy decode with the KV cache."""
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        t_first = time.perf_counter()
        for _ in range(n_tokens - 1):
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        t_end = time.perf_counter()
    return timing(t_first - t0, n_tokens, t_end - t_first)


def cell_llamacpp(a: argparse.Namespace, length: int) -> dict:
    try:
        from llama_cpp import Llama, __version__
    except ImportError as e:
        raise Skip(f"llama-cpp-python is not installed ({e}); pip install -e '.[bench]' builds it from source") from None
    from eijax.checkpoint import resolve_model

    path = resolve_model(a.model)
    t = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=length + a.decode_tokens + 64, n_batch=512, n_threads=a.threads,
                n_threads_batch=a.threads, seed=0, verbose=False)
    load = time.perf_counter() - t
    t = time.perf_counter()
    _llama_greedy(llm, prompt_ids(32), 2)
    warm = time.perf_counter() - t
    runs = [_llama_greedy(llm, prompt_ids(length), a.decode_tokens) for _ in range(a.repeats)]
    trained = int(llm.metadata.get("llama.context_length", 0) or 0)
    return dict(best(runs), load_s=load, warmup_s=warm, version=__version__, gguf=path.name,
                beyond_training_context=bool(trained) and length > trained)


def _llama_greedy(llm, ids: list[int], n_tokens: int) -> dict:
    llm.reset()  # no prefix reuse between runs
    t0 = time.perf_counter()
    t_first, n = None, 0
    for _ in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        n += 1
        if t_first is None:
            t_first = time.perf_counter()
        if n == n_tokens:
            break
    return timing(t_first - t0, n, time.perf_counter() - t_first)


CELLS: dict[str, Callable[[argparse.Namespace, int], dict]] = {
    "jax": cell_jax,
    "litert-f32": lambda a, n: cell_litert(a, n, "litert-f32"),
    "litert-int8": lambda a, n: cell_litert(a, n, "litert-int8"),
    "transformers": cell_transformers,
    "llamacpp": cell_llamacpp,
}


def run_cell(a: argparse.Namespace) -> None:
    engine, _, length = a.cell.partition(":")
    if engine not in CELLS or not length.isdigit():
        raise cli.InputError(f"--cell {a.cell!r}: expected engine:length with engine one of {', '.join(ENGINES)}")
    load_avg = os.getloadavg()[0]
    out: dict[str, Any] = dict(engine=engine, length=int(length), decode_tokens=a.decode_tokens, threads=a.threads,
                               load_avg=load_avg)
    try:
        out.update(CELLS[engine](a, int(length)))
    except Skip as e:
        out["skipped"] = str(e)
    out["peak_mb"] = peak_rss_mb()
    print(json.dumps(out), flush=True)


# ------------------------------------------------------------------ parent: cells, tables, targets
def build_litert(a: argparse.Namespace, engines: list[str]) -> None:
    """Convert the LiteRT graphs once into --litert-dir when they are missing (minutes)."""
    missing = [e for e in engines if e in LITERT_RECIPES and not litert_path(a, e).is_file()
               and not (a.litert_f32 if e == "litert-f32" else a.litert_int8)]
    if not missing or a.no_build:
        return
    recipes = [LITERT_RECIPES[e] for e in missing]
    cmd = [sys.executable, "-m", "convert.to_litert", "--checkpoint", a.model, "--scenario", SCENARIO,
           "--quant", *recipes, "--out", str(a.litert_dir)]
    if "litert-f32" not in missing and litert_path(a, "litert-f32").is_file():
        cmd.append("--reuse-float")
    print(f"building LiteRT graphs {recipes} into {a.litert_dir} (once; minutes): {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent)
    print(f"  {'done' if done.returncode == 0 else f'failed ({done.returncode})'} in {time.perf_counter() - t:.0f}s",
          flush=True)


def collect(a: argparse.Namespace, engines: list[str], lengths: list[int]) -> dict[tuple[str, int], dict]:
    args = ["--decode-tokens", str(a.decode_tokens), "--repeats", str(a.repeats), "--threads", str(a.threads),
            "--model", a.model, "--sink", str(a.sink), "--window", str(a.window), "--litert-dir", str(a.litert_dir)]
    args += [x for opt, v in (("--litert-f32", a.litert_f32), ("--litert-int8", a.litert_int8)) if v for x in (opt, v)]
    results, total, i = {}, len(engines) * len(lengths), 0
    for n in lengths:
        for engine in engines:
            i += 1
            print(f"[{i}/{total}] {engine} @ {n} tokens ...", end=" ", flush=True)
            t = time.perf_counter()
            try:
                r = run_child(MODULE, ["--cell", f"{engine}:{n}", *args], timeout=a.cell_timeout, flag=None)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                r = dict(engine=engine, length=n, error=" ".join(str(e).split())[-400:])
            results[(engine, n)] = r
            print(f"{describe(r)} ({time.perf_counter() - t:.0f}s)", flush=True)
    return results


def describe(r: dict) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    if "error" in r:
        return f"FAILED: {r['error']}"
    busy = f", load {r['load_avg']:.1f}" if r.get("load_avg", 0) > 0.5 else ""
    return f"first token {r['ttft_s']:.3f}s, decode {fmt(r['decode_tps'], '.1f')} tok/s, peak {r['peak_mb']:.0f} MB{busy}"


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def value(results: dict, engine: str, n: int, key: str) -> float | None:
    r = results.get((engine, n), {})
    return r.get(key) if "skipped" not in r and "error" not in r else None


def print_tables(results: dict, engines: list[str], lengths: list[int]) -> None:
    for title, key, spec in (("time to first token (s)", "ttft_s", ".3f"), ("decode (tokens/s)", "decode_tps", ".1f")):
        print(f"\n{title}")
        print(f"{'tokens':>7} " + " ".join(f"{e:>13}" for e in engines))
        for n in lengths:
            print(f"{n:>7} " + " ".join(f"{fmt(value(results, e, n, key), spec):>13}" for e in engines))
    notes = sorted({f"{e}: {r['skipped']}" for (e, _), r in results.items() if "skipped" in r})
    notes += [f"{e} @ {n}: failed" for (e, n), r in results.items() if "error" in r]
    for note in notes:
        print(f"  - {note}")


def ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def print_ratios(results: dict, lengths: list[int]) -> None:
    v = lambda e, n, k: value(results, e, n, k)
    cols = [("jax/tf decode", lambda n: ratio(v("jax", n, "decode_tps"), v("transformers", n, "decode_tps"))),
            ("tf/jax TTFT", lambda n: ratio(v("transformers", n, "ttft_s"), v("jax", n, "ttft_s"))),
            ("int8/llama decode", lambda n: ratio(v("litert-int8", n, "decode_tps"), v("llamacpp", n, "decode_tps"))),
            ("int8/llama TTFT", lambda n: ratio(v("litert-int8", n, "ttft_s"), v("llamacpp", n, "ttft_s"))),
            ("f32/jax decode", lambda n: ratio(v("litert-f32", n, "decode_tps"), v("jax", n, "decode_tps")))]
    print("\nratios (same run, same machine; decode: higher is faster for the first engine; "
          "tf/jax TTFT: how many times sooner JAX answers)")
    print(f"{'tokens':>7} " + " ".join(f"{c:>18}" for c, _ in cols))
    for n in lengths:
        print(f"{n:>7} " + " ".join(f"{fmt(f(n), '.2f'):>18}" for _, f in cols))


def extrapolated_ttft(points: dict[int, float], to: int) -> tuple[float, str] | None:
    """Transformers' TTFT at `to` tokens from its two longest measured lengths, assuming t ~ L^p
    with p fitted between them (the growth it showed, attention's quadratic part included)."""
    if len(points) < 2:
        return None
    l1, l2 = sorted(points)[-2:]
    p = math.log(points[l2] / points[l1]) / math.log(l2 / l1)
    est = points[l2] * (to / l2) ** p
    return est, (f"transformers TTFT at {l2} ({points[l2]:.3f}s) x ({to}/{l2})^p, p = {p:.2f} fitted on "
                 f"{l1} -> {l2} (t ~ L^p) = {est:.3f}s")


def targets(results: dict, lengths: list[int]) -> list[tuple[str, bool | None, str]]:
    """(target, met: True / False / None = not measured, detail) for the issue-10 targets."""
    v = lambda e, n, k: value(results, e, n, k)
    both = lambda e1, e2, k: [n for n in lengths if v(e1, n, k) is not None and v(e2, n, k) is not None]
    out = []

    def all_of(name: str, ns: list[int], ok: Callable[[int], bool], show: Callable[[int], str]) -> None:
        if not ns:
            out.append((name, None, "not measured (no length where the engines it compares both ran)"))
        else:
            out.append((name, all(ok(n) for n in ns), ", ".join(f"{n}: {show(n)}" for n in ns)))

    ns = both("jax", "transformers", "decode_tps")
    all_of("JAX decode >= transformers sdpa decode", ns, lambda n: v("jax", n, "decode_tps") >= v("transformers", n, "decode_tps"),
           lambda n: f"x{v('jax', n, 'decode_tps') / v('transformers', n, 'decode_tps'):.2f}")
    ns = [n for n in lengths if v("jax", n, "decode_tps") is not None]
    all_of("JAX decode >= 25 tokens/s (float32)", ns, lambda n: v("jax", n, "decode_tps") >= 25,
           lambda n: f"{v('jax', n, 'decode_tps'):.1f}")
    tf = {n: v("transformers", n, "ttft_s") for n in lengths if v("transformers", n, "ttft_s") is not None}
    jax16 = v("jax", 16384, "ttft_s")
    est = extrapolated_ttft(tf, 16384)
    if jax16 is None or est is None:
        out.append(("JAX TTFT at 16K <= 1/4 transformers' (extrapolated)", None,
                    "needs jax at 16384 and transformers at two lengths (e.g. 4096, 8192)"))
    else:
        out.append(("JAX TTFT at 16K <= 1/4 transformers' (extrapolated)", jax16 <= est[0] / 4,
                    f"JAX {jax16:.3f}s vs {est[0] / 4:.3f}s = 1/4 of the estimate; method: {est[1]}"))
    ns = both("jax", "transformers", "ttft_s")
    all_of("JAX TTFT <= 1/4 transformers' at every length both ran", ns,
           lambda n: v("jax", n, "ttft_s") <= v("transformers", n, "ttft_s") / 4,
           lambda n: f"1/{v('transformers', n, 'ttft_s') / v('jax', n, 'ttft_s'):.2f}")
    ns = both("litert-int8", "llamacpp", "decode_tps")
    all_of("LiteRT int8 decode >= 2/3 llama.cpp (Q4_1 GGUF)", ns,
           lambda n: v("litert-int8", n, "decode_tps") >= 2 / 3 * v("llamacpp", n, "decode_tps"),
           lambda n: f"x{v('litert-int8', n, 'decode_tps') / v('llamacpp', n, 'decode_tps'):.2f}")
    lt, lc = v("litert-int8", 4096, "ttft_s"), v("llamacpp", 4096, "ttft_s")
    out.append(("LiteRT int8 first token at 4K within 2x llama.cpp's", None if lt is None or lc is None else lt <= 2 * lc,
                "needs litert-int8 and llamacpp at 4096" if lt is None or lc is None else f"x{lt / lc:.2f}"))
    return out


def print_targets(results: dict, lengths: list[int]) -> None:
    print("\ntargets (issue 10)")
    for name, met, detail in targets(results, lengths):
        print(f"  {'met' if met else 'MISSED' if met is False else 'n/a':6} {name}: {detail}")


# ------------------------------------------------------------------ CLI
def parse(argv: list[str] | None) -> argparse.Namespace:
    from convert.scenarios import load_scenario
    from eijax.checkpoint.registry import cache_dir

    p = cli.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, from {','.join(ENGINES)}")
    p.add_argument("--lengths", default=LENGTHS, help="input lengths in tokens, comma-separated")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per cell (first + decode steps)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell after the warm-up (best kept)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for torch, LiteRT, llama.cpp")
    p.add_argument("--model", default="smollm2", help="registered name or .gguf (llama.cpp reads the same file)")
    scenario = load_scenario(SCENARIO)
    p.add_argument("--sink", type=int, default=scenario.sink, help=f"JAX engine's sink (the LiteRT {SCENARIO} scenario's)")
    p.add_argument("--window", type=int, default=scenario.window,
                   help=f"JAX engine's window (the LiteRT {SCENARIO} scenario's)")
    # The geometry is in the folder's name: graphs built for an older scenario file are not reused.
    p.add_argument("--litert-dir",
                   default=str(cache_dir() / "litert" / f"smollm2-{SCENARIO}-{scenario.sink}+{scenario.window}"),
                   help=f"where the {SCENARIO} graphs are (built there once when missing)")
    p.add_argument("--litert-f32", help="prebuilt float32 .tflite (instead of --litert-dir)")
    p.add_argument("--litert-int8", help="prebuilt dynamic-int8 .tflite (instead of --litert-dir)")
    p.add_argument("--no-build", action="store_true", help="never convert LiteRT graphs (their cells are skipped)")
    p.add_argument("--cell-timeout", type=float, default=3600, help="seconds per cell")
    p.add_argument("--out", help="also write every cell's JSON to this file")
    p.add_argument("--cell", help=argparse.SUPPRESS)  # engine:length, in a child process
    a = p.parse_args(argv)
    if a.decode_tokens < 2:
        p.error("--decode-tokens must be at least 2 (a first token and one decode step)")
    return a


@cli.main_guard
def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if a.cell:
        return run_cell(a)
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        raise cli.InputError(f"--engines: unknown {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    try:
        lengths = sorted({int(x) for x in a.lengths.split(",") if x.strip()})
    except ValueError:
        raise cli.InputError(f"--lengths {a.lengths!r}: expected comma-separated integers") from None
    load = warn_if_busy()
    print(f"SmolLM2-135M-Instruct ({a.model}), all 30 layers; {a.decode_tokens} tokens generated per cell, "
          f"{a.threads} threads, {a.repeats} timed run(s) per cell; JAX edgeinfinite sink {a.sink} + window {a.window}, "
          f"LiteRT scenario {SCENARIO}; load average {load:.2f} at start", flush=True)
    build_litert(a, engines)
    results = collect(a, engines, lengths)
    if a.out:
        Path(a.out).write_text(json.dumps([r for r in results.values()], indent=1))
    print_tables(results, engines, lengths)
    print_ratios(results, lengths)
    print_targets(results, lengths)
    busy = [r for r in results.values() if r.get("load_avg", 0) > 0.5]
    if busy:
        print(f"\nwarning: {len(busy)} cell(s) started with load average > 0.5; timings are not from a quiet machine")


if __name__ == "__main__":
    main()
