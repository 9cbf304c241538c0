"""Layered, typed training configuration (MaxText-style).

Layers, later wins:  configs/base.yaml -> configs/models/<model_name>.yaml ->
configs/tasks/<task_name>.yaml -> configs/mesh/<mesh_name>.yaml -> experiment file -> key=value.
`model_name`, `task_name` and `mesh_name` pick the preset files; they may be set in any layer.

Fails at start, naming the key, on: an unknown (or misspelt) key, a value of the wrong type, a key
written twice in one YAML file or twice on the command line, and a model-architecture key that the
model file sets and a later layer sets again (unless `override_model_config=true`, as in MaxText).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from eijax.cli import UserError, yaml_problem
from eijax.config import MemoryConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(UserError, ValueError):
    """A configuration mistake, reported before anything is built."""


@dataclasses.dataclass(frozen=True)
class RunSection:
    name: str = "default"
    output_dir: str = "runs/default"   # checkpoints, metrics.jsonl, TensorBoard events, report
    seed: int = 0
    steps: int = 100                   # optimizer steps (each = optim.grad_accum micro-batches)
    log_every: int = 1
    report: bool = True                # write report.md at the end


@dataclasses.dataclass(frozen=True)
class ModelSection:
    checkpoint: str = "smollm2"        # HF folder, .gguf, or a known name; "" = random init from the shapes below
    init_memory: str = ""              # warm start: trained memory path (packaged name, memory file or run)
    family: Literal["llama", "qwen2", "qwen3", "gemma3"] = "llama"
    vocab_size: int = 0                # shapes: checked against the checkpoint when one is given
    d_model: int = 0
    n_layers: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    d_ff: int = 0
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"         # compute
    param_dtype: Literal["float32", "bfloat16"] = "float32"   # frozen base in memory; trainable is always float32


# The memory section is eijax.config.MemoryConfig itself: one definition, validated by its own checks.
MemorySection = MemoryConfig


@dataclasses.dataclass(frozen=True)
class OptimSection:
    trainable: list[str] = dataclasses.field(default_factory=lambda: ["gate"])  # param-path substrings
    learning_rate: float = 1e-3        # the gate's own learning rate
    warmup_steps: int = 10
    end_lr_ratio: float = 0.1          # cosine decays to learning_rate * end_lr_ratio at run.steps
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.0          # DESIGN §1.2: none on the gate
    clip_norm: float = 1.0             # global-norm clipping; 0 disables
    grad_accum: int = 1                # micro-batches per optimizer step (optax.MultiSteps)
    loss_chunk: int = 0                # tokens per logits chunk in the loss; 0 = memory.window
    distill_weight: float = 0.0        # + this x KL(full attention || model) on tokens after segment 0
    # [[module, factor], ...]: that module's updates (a whole path element, as in `trainable`) scaled by
    # factor, e.g. [[key_conv, 20]] for new taps trained beside an already trained gate and adapter
    lr_scale: list[list[Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class DataSection:
    source: Literal["synthetic", "jsonl"] = "synthetic"
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["passkey", "multikey"])
    files: list[str] = dataclasses.field(default_factory=list)   # jsonl/parquet globs (source=jsonl)
    context_lengths: list[int] = dataclasses.field(default_factory=lambda: [1024])  # synthetic context tokens
    # synthetic: the asked needle's depth is drawn from each [lo, hi] range in turn (one source per
    # task x length x range); [0, 0.12] at 2K tokens puts it in the first window written to memory
    needle_depths: list[list[float]] = dataclasses.field(default_factory=lambda: [[0.0, 1.0]])
    batch_size: int = 1                # global batch (split over data x fsdp and processes)
    max_segments: int = 8
    buckets: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 8])
    question_position: Literal["last", "both"] = "last"
    tokenizer: str = ""                # "" = model.checkpoint; "bytes" = built-in byte tokenizer
    num_workers: int = 0
    shuffle: bool = True


@dataclasses.dataclass(frozen=True)
class EvalSection:
    every: int = 0                     # steps between evaluations; 0 = only before and after training
    before: bool = True
    after: bool = True
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["passkey", "multikey"])
    lengths: list[int] = dataclasses.field(default_factory=lambda: [2048, 4096, 8192])
    examples: int = 4                  # per task and length
    max_new_tokens: int = 12
    seed: int = 12345                  # held out: differs from the training stream's seed
    compare: str = ""                  # a trained memory path scored after training on the same samples


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = -1                     # -1: all remaining devices
    fsdp: int = 1
    tensor: int = 1
    # logical axis -> mesh axes (a name, a list of names, or null = replicated)
    logical_axis_rules: list[list[Any]] = dataclasses.field(default_factory=lambda: [
        ["batch", ["data", "fsdp"]], ["vocab", "tensor"], ["embed", "fsdp"], ["q_heads", "tensor"],
        ["kv_heads", "tensor"], ["mlp", "tensor"], ["layers", None], ["head_dim", None],
        ["gate_in", None], ["gate_heads", None]])


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    enabled: bool = True
    every: int = 50
    keep: int = 3
    async_save: bool = True
    resume: bool = True                # continue from the latest checkpoint in run.output_dir


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    enabled: bool = False              # call jax.distributed.initialize (Cloud TPU: leave the rest empty)
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1


@dataclasses.dataclass(frozen=True)
class Config:
    model_name: str = "smollm2-135m"
    task_name: str = "passkey_needle"
    mesh_name: str = "single"
    override_model_config: bool = False
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    memory: MemorySection = MemorySection()
    optim: OptimSection = OptimSection()
    data: DataSection = DataSection()
    eval: EvalSection = EvalSection()
    mesh: MeshSection = MeshSection()
    checkpoint: CheckpointSection = CheckpointSection()
    distributed: DistributedSection = DistributedSection()


# Architecture keys a model file owns (the checkpoint path and dtypes stay free to change).
ARCH_KEYS = frozenset(f"model.{k}" for k in ("family", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                             "head_dim", "d_ff", "rope_theta", "tie_embeddings"))
_SELECTORS = {"model_name": "models", "task_name": "tasks", "mesh_name": "mesh"}


# ------------------------------------------------------------------ schema walking
def _schema(cls=Config, prefix: str = "") -> dict[str, Any]:
    """Flat {dotted key: type} for every leaf of the schema."""
    out: dict[str, Any] = {}
    for name, typ in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(typ):
            out.update(_schema(typ, f"{prefix}{name}."))
        else:
            out[prefix + name] = typ
    return out


SCHEMA = _schema()


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(typ))
    return getattr(typ, "__name__", str(typ)).replace("typing.", "")


def _check_value(key: str, value: Any, typ: Any, where: str) -> Any:
    """Return `value` converted to `typ` where lossless, else raise ConfigError naming the key."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    bad = ConfigError(f"config key {key!r} ({where}) expects {_type_name(typ)}, got "
                      f"{type(value).__name__} {value!r}")
    if origin is Literal:
        if value not in args:
            raise bad
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_check_value(f"{key}[{i}]", v, args[0], where) for i, v in enumerate(value)] if args[0] is not Any else value
    if typ is Any:
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if typ is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if typ is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"schema type {typ} for {key} is not supported")


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(SCHEMA), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r} ({where}){hint}")


# ------------------------------------------------------------------ reading layers
class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"key {key!r} is set twice in {loader.name} (lines {seen[key] + 1} and "
                              f"{key_node.start_mark.line + 1})")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _flatten(tree: dict[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in SCHEMA:
            out.update(_flatten(v, where, key + "."))
        else:
            if key not in SCHEMA:
                raise _unknown_key(key, where)
            out[key] = v
    return out


def read_yaml_layer(path: str | Path) -> dict[str, Any]:
    """One YAML file -> flat {dotted key: raw value}; unknown and duplicated keys fail here."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        tree = loader.get_single_data() or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML ({yaml_problem(e)})") from None
    finally:
        loader.dispose()
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, got {type(tree).__name__}")
    return _flatten(tree, str(path))


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings -> flat dict; values parsed as YAML (so lists and bools work)."""
    out: dict[str, Any] = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"command-line override {arg!r} is not of the form key=value")
        key, raw = arg.split("=", 1)
        key = key.strip().removeprefix("--")
        if key not in SCHEMA:
            raise _unknown_key(key, "command line")
        if key in out:
            raise ConfigError(f"config key {key!r} is set twice on the command line")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"command-line override {arg!r}: the value is not valid YAML ({yaml_problem(e)})") from None
    return out


def _preset_path(kind: str, name: str, config_dir: Path) -> Path:
    path = config_dir / kind / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (config_dir / kind).glob("*.yaml"))
        raise ConfigError(f"no {kind} preset {name!r} ({path}); available: {choices}")
    return path


# ------------------------------------------------------------------ building
def build_config(flat: dict[str, Any], where: dict[str, str] | None = None) -> Config:
    """Flat {dotted key: value} (already merged) -> validated Config."""
    where = where or {}
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in flat.items():
        if key not in SCHEMA:
            raise _unknown_key(key, where.get(key, "?"))
        value = _check_value(key, value, SCHEMA[key], where.get(key, "?"))
        if "." in key:
            section, leaf = key.split(".", 1)
            sections.setdefault(section, {})[leaf] = value
        else:
            top[key] = value
    hints = typing.get_type_hints(Config)
    for section, values in sections.items():
        top[section] = hints[section](**values)
    config = Config(**top)
    _check_consistency(config)
    return config


def _check_consistency(c: Config) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(c.run.steps >= 0, f"run.steps must be >= 0, got {c.run.steps}")
    need(c.optim.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {c.optim.grad_accum}")
    need(c.optim.learning_rate > 0, f"optim.learning_rate must be > 0, got {c.optim.learning_rate}")
    need(c.optim.distill_weight >= 0, f"optim.distill_weight must be >= 0, got {c.optim.distill_weight}")
    need(len(c.optim.trainable) > 0, "optim.trainable is empty: nothing would train")
    need(c.data.batch_size >= 1, f"data.batch_size must be >= 1, got {c.data.batch_size}")
    need(c.data.buckets == sorted(c.data.buckets) and c.data.buckets[-1] >= c.data.max_segments,
         f"data.buckets must be ascending and reach data.max_segments={c.data.max_segments}: {c.data.buckets}")
    need(c.memory.sink >= 0 and c.memory.window >= 1, "memory.sink must be >= 0 and memory.window >= 1")
    # Metrics, reports and the checkpoint folder are written with local file APIs; multi-host orbax
    # needs one folder every host sees, so a bucket is mounted (gcsfuse), not given as a URL.
    need("://" not in c.run.output_dir, f"run.output_dir={c.run.output_dir!r}: URLs are not supported; mount the "
         "bucket (e.g. gcsfuse at /mnt/bucket) and give that path")
    for rule in c.optim.lr_scale:
        need(isinstance(rule, list) and len(rule) == 2 and isinstance(rule[0], str)
             and isinstance(rule[1], (int, float)) and rule[1] > 0,
             f"optim.lr_scale entries must be [module, factor > 0]: got {rule!r}")
    for rule in c.mesh.logical_axis_rules:
        need(isinstance(rule, list) and len(rule) == 2 and isinstance(rule[0], str),
             f"mesh.logical_axis_rules entries must be [logical_name, mesh_axes]: got {rule!r}")
    if not c.model.checkpoint:
        need(min(c.model.vocab_size, c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads,
                 c.model.head_dim, c.model.d_ff) > 0,
             "model.checkpoint is empty (random init) so every model shape key must be > 0")


def load_config(experiment: str | Path | None = None, overrides: Sequence[str] = (),
                config_dir: str | Path = CONFIG_DIR) -> Config:
    """base -> model -> task -> mesh presets -> experiment file -> key=value overrides."""
    config_dir = Path(config_dir)
    base = read_yaml_layer(config_dir / "base.yaml")
    exp = read_yaml_layer(experiment) if experiment else {}
    cli = parse_overrides(overrides)
    layers: list[tuple[str, dict[str, Any]]] = [(str(config_dir / "base.yaml"), base)]
    for selector, kind in _SELECTORS.items():
        name = cli.get(selector, exp.get(selector, base.get(selector, getattr(Config, selector))))
        path = _preset_path(kind, str(name), config_dir)
        preset = read_yaml_layer(path)
        if any(k in _SELECTORS for k in preset):
            raise ConfigError(f"{path} may not select other presets ({[k for k in preset if k in _SELECTORS]})")
        layers.append((str(path), preset))
    layers += [(str(experiment), exp), ("command line", cli)]

    merged: dict[str, Any] = {}
    where: dict[str, str] = {}
    model_keys: dict[str, str] = {}
    allow_model_override = bool(cli.get("override_model_config", exp.get("override_model_config",
                                                                            base.get("override_model_config", False))))
    for origin, layer in layers:
        for key, value in layer.items():
            if key in model_keys and not allow_model_override:
                raise ConfigError(f"config key {key!r} is set by the model file {model_keys[key]} and again by "
                                  f"{origin}; pass override_model_config=true to allow it")
            merged[key] = value
            where[key] = origin
        if f"{Path(config_dir) / 'models'}" in origin:
            model_keys.update({k: origin for k in layer if k in ARCH_KEYS})
    return build_config(merged, where)


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)
