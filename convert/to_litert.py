"""eijax -> fixed-shape LiteRT graphs for one scenario, quantised by recipe (DESIGN §1.6).

    python -m convert.to_litert --checkpoint smollm2 --scenario qa --quant float32 mixed --out exports/litert

writes, per recipe, `<out>/<scenario>_<recipe>.tflite` (signatures prefill_T for each chunk size
of the scenario, decode, compress; named state tensors, see convert.signatures) and a `.json`
beside it (scenario, recipe, tokenizer source), and prints the on-device memory budget.
The float32 graph is converted with litert-torch; every other recipe is applied to it with
ai-edge-quantizer from a rule list in convert/recipes/<name>.json (or any JSON path). Static
(integer-activation) recipes are calibrated by running the float graph over real text.
"""

from __future__ import annotations

import functools
import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from eijax import cli
from eijax.model import EdgeInfiniteLM

from convert.budget import budget
from convert.litert_runtime import prior_path
from convert.scenarios import Scenario, load_scenario

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
FLOAT = "float32"


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.json"))


def load_recipe(name_or_path: str) -> tuple[str, list[dict]]:
    """(recipe name, ai-edge-quantizer rule list) from a name in convert/recipes or a JSON path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = RECIPE_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise cli.InputError(f"unknown quantisation recipe {name_or_path!r}; known: {', '.join(available_recipes())}, "
                             "or a path to an ai-edge-quantizer JSON rule list")
    try:
        rules = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise cli.InputError(f"recipe {path} is not valid JSON ({e})") from None
    if not isinstance(rules, list):
        raise cli.InputError(f"recipe {path} must be a JSON list of quantizer rules")
    return path.stem, rules


# ------------------------------------------------------------------------------ float export
def export_float(model: EdgeInfiniteLM, scenario: Scenario, out_path: str | Path, meta: dict | None = None) -> Path:
    """Convert the scenario's signatures with litert-torch and write the float32 .tflite (+ .json)."""
    import litert_torch

    from convert.signatures import signatures
    from convert.weights import to_torch

    twin = to_torch(model, scenario.memory_config(model.memory_config), cache_write="dus")
    converter = None
    for name, (module, kwargs) in signatures(twin, scenario.chunks, scenario.decode_batch).items():
        converter = (litert_torch.signature(name, module, sample_kwargs=kwargs) if converter is None
                     else converter.signature(name, module, sample_kwargs=kwargs))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    converter.convert().export(str(out_path))
    write_meta(out_path, scenario, FLOAT, meta or {})
    write_prior(twin, out_path)
    return out_path


def write_prior(twin, tflite: Path) -> None:
    """The memory prior beside the graph (runners start long prompts from it): mem_M_i, mem_z_i."""
    from safetensors.numpy import save_file

    if not twin.primes:
        return
    tensors = {}
    for i, block in enumerate(twin.blocks):
        if block.use_memory:
            tensors[f"mem_M_{i}"] = block.memory_prior.M.detach().numpy().astype(np.float32)
            tensors[f"mem_z_{i}"] = block.memory_prior.z.detach().numpy().astype(np.float32)
    save_file(tensors, str(prior_path(tflite)))


def write_meta(path: Path, scenario: Scenario, recipe: str, extra: dict) -> None:
    meta = dict(scenario=scenario.name, sink=scenario.sink, window=scenario.window, chunks=list(scenario.chunks),
                decode_batch=scenario.decode_batch, memory=scenario.memory, recipe=recipe,
                # decode returns the token's k/v rows (k_row_i, v_row_i), to be written at slot `fill`
                decode_returns="rows", **extra)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))


# ------------------------------------------------------------------------------ quantisation
def calibration_data(float_path: Path, prompts: Sequence[Sequence[int]], decode_steps: int = 4) -> dict[str, list[dict]]:
    """{signature: [inputs, ...]} recorded while the float graph streams each prompt, then decodes.

    Every signature needs samples (the quantizer fails otherwise), so each chunk size is also run
    once from a fresh state on the start of the first prompt.
    """
    from convert.litert_runtime import LiteRTModel, Streamer

    model = LiteRTModel(float_path)
    data: dict[str, list[dict]] = {name: [] for name in model.runners}
    model.runners = {name: _Recording(call, data[name]) for name, call in model.runners.items()}
    streamer = Streamer(model)
    for prompt in prompts:
        state = model.init_state()
        logits, state = streamer.prefill(state, prompt, model.prime_point(len(prompt)))
        for _ in range(decode_steps):
            logits, state = streamer.decode_step(state, int(np.argmax(logits)))
        if not data["compress"]:
            model.compress(state)
    first = list(prompts[0])
    for t in model.chunks:
        tokens = np.array([(first * (t // max(len(first), 1) + 1))[:t]], np.int32)
        model.prefill(model.init_state(), tokens, np.array([t], np.int32))
    return data


class _Recording:
    """A signature call that also keeps a copy of every input it is given."""

    def __init__(self, call, samples: list[dict]):
        self.call, self.samples = call, samples

    def get_input_details(self) -> dict:
        return self.call.get_input_details()

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        self.samples.append({k: np.array(v) for k, v in inputs.items()})
        return self.call(**inputs)


def calibrate(float_path: Path, rules: list[dict], calibration: dict[str, list[dict]]) -> dict:
    """Activation ranges ({tensor: {min, max}}) over every calibration sample.

    Global min/max, not the quantizer's default moving average (0.95 per sample): our samples are
    heterogeneous by design. Only the first chunk of a prompt holds the attention-sink token, whose
    activations are ~1e4 on SmolLM2 against ~1-30 elsewhere; an average shrinks that range and
    every fresh prefill then clips it (measured: next-token agreement 0.54 -> 0.94 for the same
    recipe on SmolLM2, qa scenario).

    The ranges are tracked by the interpreter's own profiler (CALIBRATION_PROFILER_BASED), not by
    the default mode that preserves every intermediate tensor and copies them into Python: same
    ranges (the tiny gemma3's static_a16w8 graph came out byte-identical), and the default mode
    held more than 15 GB on gemma-3-270m before it was stopped.
    """
    from ai_edge_quantizer import calibrator, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(rules)
    calib = calibrator.Calibrator(str(float_path), mode=calibrator.CalibrationMode.CALIBRATION_PROFILER_BASED,
                                  qsv_update_func=qsv_utils.min_max_update)
    calib.calibrate(calibration, manager)
    return calib.get_model_qsvs()


def quantize(float_path: Path, rules: list[dict], out_path: Path,
             calibration: Callable[[], dict[str, list[dict]]] | None = None) -> Path:
    """Apply a recipe. `calibration` is called (once, by the caller's cache) only when the quantizer
    says the recipe needs activation ranges."""
    from ai_edge_quantizer import quantizer

    qt = quantizer.Quantizer(str(float_path), rules)
    ranges = None
    if qt.need_calibration:
        if calibration is None:
            raise ValueError("this recipe quantises activations and needs calibration data")
        ranges = calibrate(float_path, rules, calibration())
    qt.quantize(ranges, enable_progress_report=False).export_model(str(out_path), overwrite=True)
    return out_path


def calibration_prompts(tokenizer, vocab_size: int, n_prompts: int = 3, length: int = 0) -> list[list[int]]:
    """Real text (consecutive sentences of the filler book) when there is a tokenizer, else random ids."""
    length = length or 256
    if tokenizer is None:
        rng = np.random.default_rng(0)
        return [rng.integers(0, vocab_size, length).tolist() for _ in range(n_prompts)]
    from eijax.data.synthetic import filler_sentences

    sentences = filler_sentences()
    prompts = []
    for i in range(n_prompts):
        start = (i * 997) % len(sentences)
        text = " ".join(sentences[start:start + 4 * length // 25 + 1])
        prompts.append(tokenizer.encode(text, add_special_tokens=False)[:length])
    return prompts


# ------------------------------------------------------------------------------ CLI
def convert(checkpoint: str, scenario_name: str, recipes: Sequence[str], out_dir: str | Path, *,
            calibration_length: int = 0, reuse_float: bool = False, log=print) -> dict[str, Path]:
    """Float export + every recipe; returns {recipe: path}. Prints sizes, times and the budget."""
    from convert.loading import load_model, tokenizer_source, try_load_tokenizer

    scenario = load_scenario(scenario_name)
    resolved = [load_recipe(r) for r in recipes]  # fail on a bad recipe before the slow conversion
    t0 = time.perf_counter()
    model = load_model(checkpoint, scenario.memory_config())
    tok_source = tokenizer_source(checkpoint)
    meta = dict(checkpoint=str(checkpoint), tokenizer=tok_source, vocab_size=model.config.vocab_size)
    out_dir = Path(out_dir)
    float_path = out_dir / f"{scenario.name}_{FLOAT}.tflite"
    if reuse_float and float_path.is_file():
        log(f"[{FLOAT}] reusing {float_path}")
    else:
        export_float(model, scenario, float_path, meta)
        log(f"[{FLOAT}] converted in {time.perf_counter() - t0:.1f}s, peak RSS {peak_rss_mib():.0f} MiB")
    paths = {FLOAT: float_path}
    config = model.config
    del model  # quantisation needs the graph only: free the weights (1 GB for gemma-3-270m) first

    @functools.cache
    def calibration() -> dict[str, list[dict]]:  # recorded once, for the first recipe that needs it
        prompts = calibration_prompts(try_load_tokenizer(tok_source), config.vocab_size,
                                      length=calibration_length or 2 * scenario.cache_size)
        return calibration_data(float_path, prompts)

    for name, rules in resolved:
        if name == FLOAT:
            continue
        t1 = time.perf_counter()
        out = out_dir / f"{scenario.name}_{name}.tflite"
        if not rules:
            shutil.copyfile(float_path, out)
        else:
            quantize(float_path, rules, out, calibration)
        write_meta(out, scenario, name, meta)
        if prior_path(float_path).is_file():  # the prior is float32 state, the same for every recipe
            shutil.copyfile(prior_path(float_path), prior_path(out))
        paths[name] = out
        log(f"[{name}] quantised in {time.perf_counter() - t1:.1f}s")
    log(f"scenario {scenario.name}: sink {scenario.sink}, window {scenario.window}, chunks {list(scenario.chunks)}, "
        f"decode batch {scenario.decode_batch}, memory {'on' if scenario.memory else 'off'}")
    log("on-device memory budget (MiB; state = kv cache + memory, counted twice for input and output buffers):")
    log(f"  {'recipe':18s} {'weights':>9s} {'kv cache':>9s} {'memory':>9s} {'activ.':>9s} {'total':>9s}")
    for name, path in paths.items():
        b = budget(config, scenario, path.stat().st_size)
        log(f"  {name:18s} " + " ".join(f"{v / 2**20:9.1f}" for v in
                                         (b.weights, b.kv_cache, b.memory_state, b.activations, b.total)))
    return paths


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@cli.main_guard
def main(argv: Sequence[str] | None = None) -> None:
    p = cli.ArgumentParser(prog="python -m convert.to_litert", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="base model (name, HF folder, .gguf), convert.to_torch folder, or eijax training checkpoint")
    p.add_argument("--scenario", required=True, help="name in configs/scenarios or a YAML path")
    p.add_argument("--quant", nargs="+", default=[FLOAT],
                   help=f"recipes (names in convert/recipes: {', '.join(available_recipes())}; a JSON path; or 'all')")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--calibration-length", type=int, default=0, help="tokens per calibration prompt (static recipes)")
    p.add_argument("--reuse-float", action="store_true", help="quantise an existing <scenario>_float32.tflite in --out")
    a = p.parse_args(argv)
    recipes = available_recipes() if a.quant == ["all"] else a.quant
    convert(a.checkpoint, a.scenario, recipes, a.out, calibration_length=a.calibration_length, reuse_float=a.reuse_float,
            log=lambda s: print(s, file=sys.stderr, flush=True))


if __name__ == "__main__":
    main()
