"""Deployment scenarios (DESIGN §1.6): the fixed shapes of one set of LiteRT graphs.

A scenario file (configs/scenarios/<name>.yaml) fixes sink S, window L, the prefill chunk sizes T
(one `prefill_T` signature each; `decode` is T = 1) and the decode batch, and whether memory is on
(off: the plain base model over sink + window, e.g. chat).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

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

    def __post_init__(self) -> None:
        if self.sink < 0 or self.window < 1:
            raise ValueError(f"scenario {self.name!r}: need sink >= 0 and window >= 1, got {self.sink}, {self.window}")
        if not self.prefill_chunks:
            raise ValueError(f"scenario {self.name!r}: prefill_chunks is empty")
        for t in self.prefill_chunks:
            if not isinstance(t, int) or t < 1:
                raise ValueError(f"scenario {self.name!r}: prefill chunk {t!r} is not a positive integer")
            if t > self.window:
                # After a compress only the window is free, so a bigger chunk could never run there.
                raise ValueError(f"scenario {self.name!r}: prefill chunk {t} is larger than the window "
                                 f"({self.window}); chunks must fit in the window")
        if len(set(self.prefill_chunks)) != len(self.prefill_chunks):
            raise ValueError(f"scenario {self.name!r}: repeated prefill chunk sizes {self.prefill_chunks}")
        if self.decode_batch < 1:
            raise ValueError(f"scenario {self.name!r}: decode_batch must be >= 1")

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
    """A scenario by name (configs/scenarios/<name>.yaml) or by the path of a YAML file."""
    import yaml

    path = Path(name_or_path)
    if not path.is_file():
        path = SCENARIO_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown scenario {str(name_or_path)!r}: no file {path}; "
                         f"known scenarios: {', '.join(available()) or '(none)'}, or pass a YAML path")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - _KEYS
    if unknown:
        raise ValueError(f"scenario {path}: unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    missing = {"sink", "window", "prefill_chunks"} - set(data)
    if missing:
        raise ValueError(f"scenario {path}: missing keys {sorted(missing)}")
    return Scenario(name=str(data.get("name", path.stem)), sink=int(data["sink"]), window=int(data["window"]),
                    prefill_chunks=tuple(data["prefill_chunks"]), decode_batch=int(data.get("decode_batch", 1)),
                    memory=bool(data.get("memory", True)), description=str(data.get("description", "")))
