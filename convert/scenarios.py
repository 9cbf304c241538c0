"""Deployment scenarios (DESIGN §1.6): the fixed shapes of one set of LiteRT graphs.

A scenario file (configs/scenarios/<name>.yaml) fixes sink S, window L, the prefill chunk sizes T
(one `prefill_T` signature each; `decode` is T = 1) and the decode batch, and whether memory is on
(off: the plain base model over sink + window, e.g. chat).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from eijax.cli import InputError, yaml_problem
from eijax.config import MemoryConfig

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "configs" / "scenarios"
_KEYS = {"name", "description", "sink", "window", "prefill_chunks", "decode_batch", "memory"}


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    sink: int
    window: int
    prefill_chunks: tuple[int, ...]
    decode_batch: int = 1
    memory: bool = True
    description: str = ""

    def __post_init__(self) -> None:  # InputError: a scenario usually comes from the user's YAML
        if self.sink < 0 or self.window < 1:
            raise InputError(f"scenario {self.name!r}: need sink >= 0 and window >= 1, got {self.sink}, {self.window}")
        if not self.prefill_chunks:
            raise InputError(f"scenario {self.name!r}: prefill_chunks is empty")
        for t in self.prefill_chunks:
            if not isinstance(t, int) or t < 1:
                raise InputError(f"scenario {self.name!r}: prefill chunk {t!r} is not a positive integer")
            if t > self.window:
                # After a compress only the window is free, so a bigger chunk could never run there.
                raise InputError(f"scenario {self.name!r}: prefill chunk {t} is larger than the window "
                                 f"({self.window}); chunks must fit in the window")
        if len(set(self.prefill_chunks)) != len(self.prefill_chunks):
            raise InputError(f"scenario {self.name!r}: repeated prefill chunk sizes {self.prefill_chunks}")
        if self.decode_batch < 1:
            raise InputError(f"scenario {self.name!r}: decode_batch must be >= 1")

    @property
    def cache_size(self) -> int:
        return self.sink + self.window

    @property
    def chunks(self) -> tuple[int, ...]:
        """Prefill chunk sizes, largest first (without the decode size 1)."""
        return tuple(sorted((t for t in self.prefill_chunks if t != 1), reverse=True))

    def memory_config(self, base: MemoryConfig | None = None) -> MemoryConfig:
        """The model's MemoryConfig with this scenario's sink, window and memory switch."""
        return dataclasses.replace(base or MemoryConfig(), sink=self.sink, window=self.window, enabled=self.memory)


def available() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A scenario by name (configs/scenarios/<name>.yaml) or by the path of a YAML file.
    Every mistake in the file (YAML syntax, unknown or missing keys, wrong types) is an InputError
    naming the file and the key."""
    import yaml

    path = Path(name_or_path)
    if not path.is_file():
        path = SCENARIO_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise InputError(f"unknown scenario {str(name_or_path)!r}: no file {path}; "
                         f"known scenarios: {', '.join(available()) or '(none)'}, or pass a YAML path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"scenario {path} is not valid YAML ({yaml_problem(e)})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise InputError(f"scenario {path} must be a mapping of keys ({', '.join(sorted(_KEYS))}), "
                         f"got {type(data).__name__}")
    unknown = set(data) - _KEYS
    if unknown:
        raise InputError(f"scenario {path}: unknown keys {sorted(map(str, unknown))}; allowed: {sorted(_KEYS)}")
    missing = {"sink", "window", "prefill_chunks"} - set(data)
    if missing:
        raise InputError(f"scenario {path}: missing keys {sorted(missing)}")

    def integer(key: str, value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"scenario {path}: {key} must be an integer, got {value!r}")
        return value

    chunks = data["prefill_chunks"]
    if not isinstance(chunks, list):
        raise InputError(f"scenario {path}: prefill_chunks must be a list of chunk sizes such as [128, 16], "
                         f"got {chunks!r}")
    memory = data.get("memory", True)
    if not isinstance(memory, bool):
        raise InputError(f"scenario {path}: memory must be true or false, got {memory!r}")
    return Scenario(name=str(data.get("name", path.stem)), sink=integer("sink", data["sink"]),
                    window=integer("window", data["window"]),
                    prefill_chunks=tuple(integer("prefill_chunks entry", t) for t in chunks),
                    decode_batch=integer("decode_batch", data.get("decode_batch", 1)),
                    memory=memory, description=str(data.get("description", "")))
