"""Run the LiteRT graphs of one scenario with `ai-edge-litert`: state in NumPy, fed back by name.

`LiteRTModel` wraps the signatures (prefill_T, decode, compress); `Streamer` puts an input of any
length through them with the same schedule as `eijax.generate.Engine`: each run of tokens goes
in the largest chunk that fits in the room left in the cache (the tail in the smallest chunk that
holds it, padded), and the window is folded into memory whenever it is full and more tokens come.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from eijax.cli import InputError
from eijax.schedule import Chunk, plan_chunks, split_prime_point

META_SUFFIX = ".json"  # scenario + model facts written next to each .tflite by convert.to_litert
PRIOR_SUFFIX = ".prior.safetensors"  # the memory prior (mem_M_i, mem_z_i without batch), when the model has one


def prior_path(tflite: Path) -> Path:
    return Path(tflite).with_suffix(PRIOR_SUFFIX)


class SignatureCall:
    """One signature, called through NumPy views of its own input and output buffers.

    ai-edge-litert's SignatureRunner copies every input in and every output out into fresh arrays
    on each call; with a 26 MB state (SmolLM2, qa) that was half of a dynamic-int8 decode step.
    Here inputs are copied into the buffers once per call and outputs come back as read-only
    views, so a streaming loop (state out -> state in) costs one copy. A returned view is
    overwritten by the next call of the same signature: copy what you keep (logits are copied).
    The shapes are static, so the buffers are allocated once and the views stay valid.
    """

    def __init__(self, interpreter, name: str):
        self.runner = interpreter.get_signature_runner(name)
        self._wrapper = interpreter._interpreter  # per-subgraph tensor views; the public API has subgraph 0 only
        self._subgraph = self._wrapper.GetSubgraphIndexFromSignature(name)
        self._wrapper.AllocateTensors(self._subgraph)
        view = lambda d: self._wrapper.tensor(self._wrapper, d["index"], self._subgraph)
        self._inputs = {k: view(d) for k, d in self.runner.get_input_details().items()}
        self._outputs = {k: view(d) for k, d in self.runner.get_output_details().items()}
        for v in self._outputs.values():
            v.flags.writeable = False

    def get_input_details(self) -> dict:
        return self.runner.get_input_details()

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        """Writable views of the input buffers: a value passed back as the very same array is not copied."""
        return self._inputs

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        if inputs.keys() != self._inputs.keys():
            raise ValueError(f"inputs {sorted(inputs)} != the signature's {sorted(self._inputs)}")
        for k, value in inputs.items():
            if value is not self._inputs[k]:
                np.copyto(self._inputs[k], value)
        self._wrapper.Invoke(self._subgraph)
        return {k: np.array(v) if k == "logits" else v for k, v in self._outputs.items()}


def merge_decode(state: dict[str, np.ndarray], out: dict[str, np.ndarray], slots: np.ndarray) -> list[str]:
    """Write a decode call's outputs into `state` in place (rows at each row's slot `slots`, taken
    before the call); returns the names of the state tensors that changed. Graphs exported before
    decode returned rows (`k_cache_*` outputs, whole caches) are read too."""
    rows = np.arange(len(slots))
    changed = []
    for k, value in out.items():
        if k.startswith(("k_row_", "v_row_")):  # the token's own k / v, [B, 1, Hkv, d]
            name = k.replace("_row_", "_cache_")
            state[name][rows, slots] = value[rows, 0]
        elif k.startswith(("k_cache_", "v_cache_")):
            name = k
            state[name][rows, slots] = value[rows, slots]
        elif k in ("fill", "valid"):
            name = k
            np.copyto(state[name], value)
        else:  # unchanged by decode (older graphs returned memory and `written` too)
            continue
        changed.append(name)
    return changed


class LiteRTModel:
    def __init__(self, path: str | Path, num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        try:
            self.interpreter = Interpreter(model_path=str(self.path), num_threads=num_threads)
        except ValueError as e:  # "not a valid Flatbuffer buffer", "Could not open ..."
            raise InputError(f"{self.path} cannot be loaded as a LiteRT model ({e})") from e
        signatures = self.interpreter.get_signature_list()
        self.runners = {name: SignatureCall(self.interpreter, name) for name in signatures}
        self.chunks = tuple(sorted((int(m.group(1)) for n in signatures if (m := re.fullmatch(r"prefill_(\d+)", n))),
                                   reverse=True))
        if "decode" not in signatures or "compress" not in signatures or not self.chunks:
            raise InputError(f"{self.path} lacks prefill_T/decode/compress signatures: {sorted(signatures)}; "
                             "is it a convert.to_litert graph?")
        self.state_specs = self.runners["compress"].get_input_details()  # {state name: shape, dtype, ...}
        meta_path = self.path.with_suffix(META_SUFFIX)
        self.meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.cache_size = int(self.state_specs["valid"]["shape"][1])
        self.batch = int(self.state_specs["valid"]["shape"][0])
        self.sink = int(self.meta["sink"]) if "sink" in self.meta else self._probe_sink()
        self.prior = _load_prior(prior_path(self.path), self.state_specs)

    def _probe_sink(self) -> int:
        """The sink size read from the graph itself (compress of a full cache leaves fill = sink), so a
        .tflite without its .json still streams correctly."""
        state = self.init_state()
        state["fill"][:] = self.cache_size
        return int(self.runners["compress"](**state)["fill"][0])

    def init_state(self) -> dict[str, np.ndarray]:
        return {name: np.zeros(d["shape"], d["dtype"]) for name, d in self.state_specs.items()}

    def prime(self, state: dict) -> dict:
        """Memory := the prior, read from the next token on (eijax EdgeInfiniteLM.prime); unchanged
        when the graphs came without a prior file."""
        if self.prior is None:
            return state
        primed = {k: np.broadcast_to(v, state[k].shape).copy() for k, v in self.prior.items()}
        return {**state, **primed, "written": np.ones_like(state["written"])}

    def prime_point(self, n_tokens: int) -> int | None:
        """Where a fresh stream of `n_tokens` is primed: after the sink of an input longer than the cache."""
        return self.sink if self.prior is not None and n_tokens > self.cache_size else None

    def prefill(self, state: dict, tokens: np.ndarray, n_valid: np.ndarray) -> tuple[np.ndarray, dict]:
        """tokens int32 [B, T] (T one of self.chunks, or 1 for decode); returns (last logits [B, V], state)."""
        t = tokens.shape[1]
        if int(state["fill"][0]) + t > self.cache_size:
            raise ValueError(f"chunk of {t} at slot {int(state['fill'][0])} overflows the cache of {self.cache_size}; compress first")
        if t == 1:
            if isinstance(self.runners["decode"], SignatureCall):
                return self._decode(state, tokens)
            # a copying runner (ai-edge-litert's own; tests compare with it): merge into copies
            out = self.runners["decode"](tokens=tokens.astype(np.int32), **state)
            logits = out.pop("logits")
            state = {k: np.array(v) for k, v in state.items()}
            merge_decode(state, out, np.asarray(state["fill"]).astype(np.int64))
            return logits, state
        out = self.runners[f"prefill_{t}"](tokens=tokens.astype(np.int32), n_valid=n_valid.astype(np.int32), **state)
        logits = out.pop("logits")
        return logits, {**state, **out}

    def _decode(self, state: dict, tokens: np.ndarray) -> tuple[np.ndarray, dict]:
        """One token per row. Decode changes the state only at each row's slot `fill` (k/v caches,
        valid) and `fill` itself; memory and `written` change only at compress (DESIGN §1.6). So the
        state stays in decode's own input buffers and only those parts come back from its outputs:
        copying the whole 14 MB state in on every token was 8% of a dynamic-int8 decode step (perf,
        docs/performance.md). The returned arrays are those buffers: the next decode updates them."""
        run = self.runners["decode"]
        slots = np.asarray(state["fill"]).astype(np.int64).copy()
        out = run(tokens=tokens.astype(np.int32), **state)
        logits = np.asarray(out.pop("logits"))
        changed = merge_decode(run.inputs, out, slots)
        return logits, {**state, **{k: run.inputs[k] for k in changed}}

    def compress(self, state: dict) -> dict:
        return {**state, **self.runners["compress"](**state)}


class Streamer:
    """Batch-1 streaming over a LiteRTModel (mirrors eijax.generate.Engine)."""

    def __init__(self, model: LiteRTModel):
        self.model = model
        self.sizes = tuple(sorted(set(model.chunks) | {1}, reverse=True))

    def chunks(self, fill: int, n_tokens: int) -> Iterator[Chunk]:
        """The same schedule as eijax.generate (eijax.schedule.plan_chunks)."""
        return plan_chunks(fill, n_tokens, cache_size=self.model.cache_size, sink=self.model.sink, sizes=self.sizes)

    def prefill(self, state: dict, tokens: Sequence[int], prime_at: int | None = None) -> tuple[np.ndarray, dict]:
        """Any number of tokens in; returns (logits [V] of the last one, state). With `prime_at`,
        the memory starts from its prior before tokens[prime_at] (see LiteRTModel.prime_point)."""
        if not len(tokens):
            raise ValueError("prefill needs at least one token")
        if prime_at is not None:
            logits, state = self.prefill(state, tokens[:prime_at]) if prime_at else (None, state)
            state = self.model.prime(state)
            return self.prefill(state, tokens[prime_at:]) if prime_at < len(tokens) else (logits, state)
        logits = None
        for start, n, size, fold in self.chunks(int(state["fill"][0]), len(tokens)):
            if fold:
                state = self.model.compress(state)
            chunk = np.zeros((1, size), np.int32)
            chunk[0, :n] = tokens[start:start + n]
            logits, state = self.model.prefill(state, chunk, np.array([n], np.int32))
        return logits[0], state

    def decode_step(self, state: dict, token: int) -> tuple[np.ndarray, dict]:
        if int(state["fill"][0]) >= self.model.cache_size:
            state = self.model.compress(state)
        logits, state = self.model.prefill(state, np.array([[token]], np.int32), np.array([1], np.int32))
        return logits[0], state

    def generate(self, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = (),
                 question: Sequence[int] | None = None) -> Iterator[int]:
        """Greedy ids after `prompt` (with `question`: question-last, the document's window folded first)."""
        state = self.model.init_state()
        n_prompt = len(prompt) + len(question or [])
        prime_at = self.model.prime_point(n_prompt)
        if prompt and question and n_prompt > self.model.cache_size:
            in_doc, in_question = split_prime_point(prime_at, len(prompt))
            _, state = self.prefill(state, prompt, in_doc)
            state = self.model.compress(state)
            logits, state = self.prefill(state, question, in_question)
        else:
            logits, state = self.prefill(state, list(prompt) + list(question or []), prime_at)
        for i in range(max_new_tokens):
            token = int(np.argmax(logits))
            if token in stop_ids:
                return
            yield token
            if i + 1 < max_new_tokens:
                logits, state = self.decode_step(state, token)


def _load_prior(path: Path, specs: dict) -> dict[str, np.ndarray] | None:
    """The prior file's tensors, checked against the graphs' memory inputs (batch dim dropped)."""
    if not path.is_file():
        return None
    from safetensors.numpy import load_file

    prior = load_file(str(path))
    for name, value in prior.items():
        if name not in specs or tuple(specs[name]["shape"][1:]) != value.shape:
            raise InputError(f"{path}: {name} {value.shape} does not fit the graphs' state "
                             f"({tuple(specs[name]['shape'][1:]) if name in specs else 'no such input'})")
    return prior
