"""Time to first token and peak memory vs input length: EdgeInfinite vs full attention.

One child process per (method, length), so ru_maxrss is that measurement's peak. Each child
builds the model, streams the input through eijax.generate, samples the first token twice (the
first run compiles), and reports: cold TTFT (with compile), warm TTFT, peak RSS and the RSS
after the model was built (so peak - base is what generation added).

    python -m benchmarks.ttft_memory                                   # defaults: a few minutes
    python -m benchmarks.ttft_memory --layers 30 --lengths 1024,2048,4096,8192,16384,32768
"""

from __future__ import annotations

import argparse
import json

from benchmarks.common import peak_rss_mb, rss_mb, run_child, smollm2_shaped, warn_if_busy

MODULE = "benchmarks.ttft_memory"


def child(a: argparse.Namespace) -> None:
    import time

    import numpy as np

    from eijax.config import MemoryConfig
    from eijax.generate import Generator, SamplingConfig

    model = smollm2_shaped(MemoryConfig(sink=a.sink, window=a.window), a.layers, max_position=max(a.length + 64, 8192))
    base = rss_mb()
    gen = Generator(model, a.method, full_bucket=1024)
    tokens = np.random.RandomState(0).randint(0, 49152, a.length).tolist()
    one = SamplingConfig(max_new_tokens=1)
    t = time.perf_counter()
    cold = gen.generate(tokens, one).time_to_first_token
    cold_wall = time.perf_counter() - t
    warm = min(gen.generate(tokens, one).time_to_first_token for _ in range(a.repeats))
    print(json.dumps(dict(method=a.method, length=a.length, cold_s=cold, cold_wall_s=cold_wall, warm_s=warm,
                          peak_mb=peak_rss_mb(), base_mb=base)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="edgeinfinite")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--lengths", default="1024,2048,4096,8192")
    p.add_argument("--layers", type=int, default=4, help="SmolLM2 width with this many layers (30 = the real depth)")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args()
    warn_if_busy()
    if a.child:
        return child(a)
    print(f"SmolLM2 width, {a.layers} layers, sink {a.sink} window {a.window}; random weights; one process per cell")
    print(f"{'length':>7} {'method':>13} {'TTFT warm s':>12} {'TTFT cold s':>12} {'peak MB':>9} {'peak-base MB':>13}")
    res = {}
    for n in [int(x) for x in a.lengths.split(",")]:
        for method in ("edgeinfinite", "full"):
            r = run_child(MODULE, ["--method", method, "--length", str(n), "--layers", str(a.layers),
                                   "--sink", str(a.sink), "--window", str(a.window), "--repeats", str(a.repeats)])
            res[(n, method)] = r
            print(f"{n:>7} {method:>13} {r['warm_s']:>12.3f} {r['cold_s']:>12.3f} {r['peak_mb']:>9.0f} "
                  f"{r['peak_mb'] - r['base_mb']:>13.0f}", flush=True)
    print("\nratios full / edgeinfinite (same run, same machine):")
    print(f"{'length':>7} {'TTFT warm':>10} {'peak RSS':>9} {'peak-base':>10}")
    for n in sorted({k[0] for k in res}):
        e, f = res[(n, "edgeinfinite")], res[(n, "full")]
        print(f"{n:>7} {f['warm_s'] / e['warm_s']:>10.2f} {f['peak_mb'] / e['peak_mb']:>9.2f} "
              f"{(f['peak_mb'] - f['base_mb']) / max(e['peak_mb'] - e['base_mb'], 1e-9):>10.2f}")
    lengths = sorted({k[0] for k in res})
    e0, e1 = res[(lengths[0], "edgeinfinite")], res[(lengths[-1], "edgeinfinite")]
    print(f"edgeinfinite {lengths[-1]} vs {lengths[0]} tokens: TTFT x{e1['warm_s'] / e0['warm_s']:.2f} "
          f"(input x{lengths[-1] / lengths[0]:.0f}), peak RSS x{e1['peak_mb'] / e0['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
