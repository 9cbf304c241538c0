"""Constant-memory long-context generation (DESIGN §1.3, §1.4) and the baselines on the same path.

An input of any length streams through the fixed-size cache: jitted prefill in a few fixed chunk
sizes (the last chunk of a run is right-padded; the model advances `fill` by the valid count), the
window is folded into memory whenever it is full and more tokens come, then decoding goes on one
token at a time, folding again whenever the window fills. Nothing grows with the input length.

Methods (one code path, different `MemoryConfig`s, same parameters):
    edgeinfinite  sink + window + compressive memory (the model's own config, memory on)
    streaming     sink + window, memory off: the window is dropped when full (StreamingLLM-style,
                  block-wise rather than rolling, because slots are positions)
    full          plain attention over everything: sink=0, one window holding prompt + generation,
                  capped at the model's context (longer prompts lose their middle, as LongBench does)

Routing: a prompt that fits in sink + window is prefilled from slot 0 and never touches memory,
so it *is* the base model. Document + question mode uses the training layout (question-last): the
document streams, its partial window is folded into memory, and the question starts a fresh segment.

CLI:  python -m eijax.generate --model smollm2 --prompt "..." [--document FILE] [--method ...]
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import sys
import time
from typing import Any, Callable, Iterator, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eijax import cli
from eijax.config import MemoryConfig
from eijax.data.layout import drop_middle as truncate_middle  # the S-SFT fitting rule: keep head and tail
from eijax.model import EdgeInfiniteLM, State, split_caches, split_layers, stack_caches, with_memory_config
from eijax.schedule import Chunk, plan_chunks, split_prime_point
from eijax.tokenizer import PLAIN_TEMPLATE

Method = Literal["edgeinfinite", "streaming", "full"]
METHODS: tuple[str, ...] = ("edgeinfinite", "streaming", "full")
DEFAULT_CHUNKS: tuple[int, ...] = (256, 64, 16, 1)
DEFAULT_MODEL = "smollm2"


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0   # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()


class Generation(NamedTuple):
    tokens: list[int]          # generated ids (the stop token, if hit, is not included)
    prompt_tokens: int         # prompt length actually fed (after `full` truncation)
    route: str                 # "plain" (fits in sink + window) or "stream"
    time_to_first_token: float  # seconds from the start of prefill to the first sampled token
    seconds: float


# ------------------------------------------------------------------ methods and routing
def memory_config_for(method: str, base: MemoryConfig, total_tokens: int = 0, max_context: int = 8192) -> MemoryConfig:
    """The MemoryConfig that implements `method` (see module docstring)."""
    if method == "edgeinfinite":
        return dataclasses.replace(base, enabled=True)
    if method == "streaming":
        return dataclasses.replace(base, enabled=False)
    if method == "full":
        return dataclasses.replace(base, sink=0, window=max(1, min(total_tokens, max_context)), enabled=False)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def route(n_tokens: int, memory: MemoryConfig) -> str:
    """"plain" when the prompt fits in sink + window (memory is never written), else "stream"."""
    return "plain" if n_tokens <= memory.cache_size else "stream"


# ------------------------------------------------------------------ sampling
def sample_token(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits [B, V] -> ids [B]: greedy when temperature == 0, else temperature + nucleus (top-p).
    A cond, not a select: greedy (the default) skips the sort over the whole vocabulary."""

    def nucleus():
        scaled = logits / jnp.maximum(temperature, 1e-6)
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token: the top one is always kept
        kept = jnp.where(before < top_p, sorted_logits, -jnp.inf)
        pick = jax.random.categorical(key, kept, axis=-1)
        return jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)

    return jax.lax.cond(temperature > 0, nucleus, lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))


# ------------------------------------------------------------------ jitted pieces (params are arguments, not constants)
def _prefill_chunk(graphdef, params, state, tokens, valid, last):
    model = nnx.merge(graphdef, params)
    hidden, state = model.prefill(state, tokens, valid)
    return model.logits(hidden[:, last]), state


def _score_chunk(graphdef, params, state, tokens, valid, targets):
    """Per-token negative log-likelihood of `targets` (next tokens) for one chunk."""
    model = nnx.merge(graphdef, params)
    hidden, state = model.prefill(state, tokens, valid)
    logp = jax.nn.log_softmax(model.logits(hidden), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return nll, state


def _compress(graphdef, params, state):
    return nnx.merge(graphdef, params).compress(state)


def _prime(graphdef, params, state):
    return nnx.merge(graphdef, params).prime(state)


def _decode_step(graphdef, params, layer_params, state, token, key, temperature, top_p):
    """Feed one token, sample the next (the caller folds a full window first: `Engine.decode`). The
    layers are unrolled over `layer_params` and the per-layer caches of `state` (`split_caches`).
    The key is split here, not eagerly on the host (an eager split cost ~6 ms a token); returns the
    key for the next step."""
    model = nnx.merge(graphdef, params)
    hidden, state = model.prefill_unrolled(layer_params, state, token[:, None])
    logits = model.logits(hidden[:, 0])
    key, sub = jax.random.split(key)
    return sample_token(logits, sub, temperature, top_p), logits, state, key


_BACKGROUND = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="eijax-compile")


class Engine:
    """One model under one MemoryConfig, with its compiled steps. State is passed in and returned.

    Batch 1: prompts are token lists. Chunk sizes are the fixed prefill shapes; each run of tokens
    goes in the largest chunk that fits in the room left in the cache (padded when it is the last).
    """

    def __init__(self, model: EdgeInfiniteLM, chunk_sizes: Sequence[int] = DEFAULT_CHUNKS,
                 layer_params: tuple[nnx.State, ...] | None = None):
        self.model = model
        self.memory_config = model.memory_config
        self.cache_size = model.memory_config.cache_size
        self.chunk_sizes = tuple(sorted({int(c) for c in chunk_sizes} | {1}, reverse=True))
        self.graphdef, self.params = nnx.split(model)
        g = self.graphdef
        # The state is donated: the old cache buffers are reused, so memory stays at one cache.
        self._prefill = jax.jit(functools.partial(_prefill_chunk, g), donate_argnums=1)
        self._score = jax.jit(functools.partial(_score_chunk, g), donate_argnums=1)
        self._compress = jax.jit(functools.partial(_compress, g), donate_argnums=1)
        self._prime = jax.jit(functools.partial(_prime, g), donate_argnums=1)
        # Decode runs unrolled over per-layer copies of the weights: 56 -> 36 ms a SmolLM2 token,
        # for the memory of a second copy of the layers (benchmarks/decode_step.py). Engines of
        # one model share it (`layer_params`, from `split_layers(model)`).
        self.layer_params = split_layers(model) if layer_params is None else layer_params
        self._decode = jax.jit(functools.partial(_decode_step, g), donate_argnums=2)
        self._decode_compiled: concurrent.futures.Future | None = None  # see prepare_decode
        self._split_caches = jax.jit(split_caches)  # (not donated: no output has an input's shape)
        self._stack_caches = jax.jit(stack_caches)
        self._sample = jax.jit(sample_token)  # the first token; eager, its cond would be traced on every call

    def init_state(self) -> State:
        return self.model.init_state(1)

    def warm_up(self) -> None:
        """Compile (or load from the persistent cache) every step this engine can run: each prefill
        chunk size, compress, the first-token sample and decode; the shapes are fixed, so nothing
        compiles afterwards (benchmarks time generation without compilation)."""
        state, n = self.init_state(), 0
        for size in self.chunk_sizes:
            if n + size > self.cache_size:
                state, n = self._compress(self.params, state), self.memory_config.sink
            logits, state = self._prefill(self.params, state, np.zeros((1, size), np.int32), np.ones((1, size), bool),
                                          jnp.int32(size - 1))
            n += size
        key, zero = jax.random.PRNGKey(0), jnp.float32(0)
        token = self._sample(logits, key, zero, jnp.float32(1))
        if self.model.primes:
            state = self._prime(self.params, state)
        state = self._split_caches(self._compress(self.params, state))
        _, _, state, _ = self._decode_executable()(self.params, self.layer_params, state, token, key, zero, jnp.float32(1))
        jax.block_until_ready(self._stack_caches(state))

    def prepare_decode(self) -> None:
        """Start compiling decode's step (or loading it from the persistent cache) in a background
        thread. Tracing and lowering the unrolled layers costs ~1 s of Python before the cache can
        even be looked up; started before the prompt's prefill, it overlaps it. Idempotent."""
        if self._decode_compiled is None:
            self._decode_compiled = _BACKGROUND.submit(self._compile_decode)

    def _compile_decode(self):
        state = jax.eval_shape(lambda: split_caches(self.init_state()))
        key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
        token, scalar = jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32)
        return self._decode.lower(self.params, self.layer_params, state, token, key, scalar, scalar).compile()

    def _decode_executable(self) -> Callable:
        self.prepare_decode()
        return self._decode_compiled.result()

    def _chunks(self, fill: int, n_tokens: int) -> Iterator[Chunk]:
        return plan_chunks(fill, n_tokens, cache_size=self.cache_size, sink=self.memory_config.sink,
                           sizes=self.chunk_sizes)

    def _feed(self, state: State, tokens: Sequence[int], step: Callable, extra: np.ndarray | None = None,
              prime_at: int | None = None):
        """Run `tokens` through the cache in chunks, folding when full; returns (outputs, state).
        `prime_at`: start the memory from its prior (EdgeInfiniteLM.prime) before tokens[prime_at]."""
        if prime_at is not None:
            head = (self._feed(state, tokens[:prime_at], step, None if extra is None else extra[:prime_at])
                    if prime_at else ([], state))
            tail, state = self._feed(self._prime(self.params, head[1]), tokens[prime_at:], step,
                                     None if extra is None else extra[prime_at:])
            return head[0] + tail, state
        outs = []
        fill = int(state.fill)
        for start, n, size, fold in self._chunks(fill, len(tokens)):
            if fold:
                state = self._compress(self.params, state)
                fill = min(fill, self.memory_config.sink)
            chunk = np.zeros((1, size), np.int32)
            chunk[0, :n] = tokens[start:start + n]
            valid = np.zeros((1, size), bool)
            valid[0, :n] = True
            if extra is None:
                out, state = step(self.params, state, chunk, valid, jnp.int32(n - 1))
            else:
                tgt = np.zeros((1, size), np.int32)
                tgt[0, :n] = extra[start:start + n]
                out, state = step(self.params, state, chunk, valid, tgt)
            outs.append((out, n))
            fill += n
        return outs, state

    def prefill(self, state: State, tokens: Sequence[int], prime_at: int | None = None) -> tuple[jax.Array, State]:
        """Stream tokens of any length in; returns (logits [1, V] of the last token, state). With
        `prime_at`, the memory starts from its prior before tokens[prime_at] (see `prime_point`)."""
        if not len(tokens):
            raise ValueError("prefill needs at least one token")
        outs, state = self._feed(state, tokens, self._prefill, prime_at=prime_at)
        return outs[-1][0], state

    def prime_point(self, n_tokens: int) -> int | None:
        """Where a fresh stream of `n_tokens` starts its memory from the prior: after the sink, for
        inputs longer than the cache (MemoryConfig.prior); None when it does not (short input, no prior)."""
        return self.memory_config.sink if self.model.primes and route(n_tokens, self.memory_config) == "stream" else None

    def compress(self, state: State) -> State:
        return self._compress(self.params, state)

    def score(self, state: State, tokens: Sequence[int]) -> tuple[np.ndarray, State]:
        """NLL of tokens[1:] given their prefixes, streamed through the cache: float [len-1]."""
        targets = np.append(np.asarray(tokens[1:], np.int32), 0)
        outs, state = self._feed(state, tokens, self._score, targets, prime_at=self.prime_point(len(tokens)))
        nll = np.concatenate([np.asarray(o)[0, :n] for o, n in outs])
        return nll[:-1], state

    def decode(self, state: State, logits: jax.Array, sampling: SamplingConfig) -> Iterator[int]:
        """Yield sampled ids, starting from the prompt's last logits; stops at a stop id or the budget."""
        key = jax.random.PRNGKey(sampling.seed)
        temperature, top_p = jnp.float32(sampling.temperature), jnp.float32(sampling.top_p)
        key, sub = jax.random.split(key)
        token = self._sample(logits, sub, temperature, top_p)
        # The fold decision is made here, on the host's copy of fill: a lax.cond over the state
        # inside the step made XLA allocate (and page-fault) buffers for the compress branch on
        # every token.
        fill = int(state.fill)
        state = self._split_caches(state)
        step = self._decode_executable()
        for i in range(sampling.max_new_tokens):
            t = int(np.asarray(token)[0])  # host copy; token[0] would dispatch an eager slice
            if t in sampling.stop_ids:
                return
            yield t
            if i + 1 == sampling.max_new_tokens:
                return
            if fill >= self.cache_size:
                state = self._split_caches(self._compress(self.params, self._stack_caches(state)))
                fill = self.memory_config.sink
            token, _, state, key = step(self.params, self.layer_params, state, token, key, temperature, top_p)
            fill += 1


# ------------------------------------------------------------------ high-level API
class Generator:
    """Generation with one of METHODS over a loaded model. Engines are built once per cache shape."""

    def __init__(self, model: EdgeInfiniteLM, method: str = "edgeinfinite", *, chunk_sizes: Sequence[int] = DEFAULT_CHUNKS,
                 max_context: int | None = None, full_bucket: int = 1024):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        self.model, self.method, self.chunk_sizes = model, method, tuple(chunk_sizes)
        self.max_context = int(max_context or model.config.max_position)
        self.full_bucket = full_bucket  # `full` rounds its cache up to a multiple of this (fewer compiles)
        self._engines: dict[MemoryConfig, Engine] = {}
        self._layer_params: tuple[nnx.State, ...] | None = None  # decode's per-layer weights, one copy for all engines

    def refresh_params(self) -> None:
        """Engines copy the parameters when built; call after the model's parameters change (training)."""
        self._layer_params = None
        for engine in self._engines.values():
            engine.params, engine.layer_params = nnx.state(self.model), self._shared_layer_params()

    def _shared_layer_params(self) -> tuple[nnx.State, ...]:
        if self._layer_params is None:
            self._layer_params = split_layers(self.model)
        return self._layer_params

    def engine_for(self, total_tokens: int) -> Engine:
        total = -(-total_tokens // self.full_bucket) * self.full_bucket if self.method == "full" else total_tokens
        mem = memory_config_for(self.method, self.model.memory_config, total, self.max_context)
        if mem not in self._engines:
            self._engines[mem] = Engine(with_memory_config(self.model, mem), self.chunk_sizes,
                                        self._shared_layer_params())
        return self._engines[mem]

    def _fit_full(self, parts: list[list[int]], max_new: int) -> list[list[int]]:
        """`full` only: shorten the first part (the document) in the middle so everything fits."""
        budget = self.max_context - max_new - sum(len(p) for p in parts[1:])
        if budget < 1:
            raise ValueError(f"max_new_tokens={max_new} plus the question leave no room in a context of {self.max_context}")
        return [truncate_middle(parts[0], budget), *parts[1:]]

    def prefill(self, prompt: Sequence[int], question: Sequence[int] | None = None, max_new_tokens: int = 0
                ) -> tuple[jax.Array, State, Engine, int, str]:
        """Prompt (or document + question) into a fresh state: (last logits, state, engine, n_prompt, route)."""
        parts = [p for p in ([list(prompt)] + ([list(question)] if question is not None else [])) if p]
        if not parts:
            raise ValueError("empty prompt")
        if self.method == "full":
            parts = self._fit_full(parts, max_new_tokens)
        n_prompt = sum(len(p) for p in parts)
        engine = self.engine_for(n_prompt + max_new_tokens)
        if max_new_tokens > 1:
            engine.prepare_decode()
        kind = route(n_prompt, engine.memory_config)
        state = engine.init_state()
        prime_at = engine.prime_point(n_prompt)
        if kind == "plain" or len(parts) == 1 or self.method == "full":
            logits, state = engine.prefill(state, [t for p in parts for t in p], prime_at)
        else:  # question-last: the document's partial window goes to memory; the question starts a segment
            doc, question = parts
            in_doc, in_question = split_prime_point(prime_at, len(doc))
            _, state = engine.prefill(state, doc, in_doc)
            state = engine.compress(state)
            logits, state = engine.prefill(state, question, in_question)
        return logits, state, engine, n_prompt, kind

    def generate(self, prompt: Sequence[int], sampling: SamplingConfig = SamplingConfig(), *,
                 question: Sequence[int] | None = None, on_token: Callable[[int], None] | None = None) -> Generation:
        """Generate after `prompt`; with `question`, prompt is a document and the question-last layout is used."""
        t0 = time.perf_counter()
        logits, state, engine, n_prompt, kind = self.prefill(prompt, question, sampling.max_new_tokens)
        tokens, ttft = [], None
        for t in engine.decode(state, logits, sampling):
            if ttft is None:
                ttft = time.perf_counter() - t0
            tokens.append(t)
            if on_token is not None:
                on_token(t)
        total = time.perf_counter() - t0
        return Generation(tokens, n_prompt, kind, ttft if ttft is not None else total, total)

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        """Per-token NLL of tokens[1:] (`full`: only the first max_context tokens are scored)."""
        tokens = list(tokens)[: self.max_context] if self.method == "full" else list(tokens)
        engine = self.engine_for(len(tokens))
        nll, _ = engine.score(engine.init_state(), tokens)
        return nll


# ------------------------------------------------------------------ model loading shared with eval
def load_model(name_or_path: str | None, memory: MemoryConfig, checkpoint: str | None = None) -> EdgeInfiniteLM:
    """A base model (HF folder, GGUF or registered name; gate at its initial value), or, with
    `checkpoint`, that training run's trained parameters on `name_or_path` (None: the base named in
    the run), failing with CheckpointMismatch when the run was trained for another architecture
    (the run's gate type, adapter and memory rule are kept; sink/window come from `memory`)."""
    if checkpoint:
        from eijax.trained import load_trained

        return load_trained(checkpoint, memory, base=name_or_path)
    from eijax.pretrained import load_pretrained

    return load_pretrained(name_or_path or DEFAULT_MODEL, memory)


def add_geometry_args(p) -> None:
    """--sink / --window, shared by the inference CLIs."""
    default = MemoryConfig()
    p.add_argument("--sink", type=int, help=f"sink tokens (default: the --checkpoint's training value, else {default.sink})")
    p.add_argument("--window", type=int,
                   help=f"window tokens (default: the --checkpoint's training value, else {default.window})")


def add_model_args(p, geometry: tuple[int, int] | None = None) -> None:
    """--model, --checkpoint, --sink, --window of the analysis CLIs (eijax.eval.*); `geometry` fixes
    the sink/window defaults instead of taking the checkpoint's."""
    p.add_argument("--model", help=f"registered name, HF folder or .gguf (default: the checkpoint's base, else {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", help="trained memory path (run folder, memory file or packaged name)")
    if geometry is None:
        add_geometry_args(p)
    else:
        p.add_argument("--sink", type=int, default=geometry[0], help=f"sink tokens (default {geometry[0]})")
        p.add_argument("--window", type=int, default=geometry[1], help=f"window tokens (default {geometry[1]})")


def load_for_cli(a) -> tuple[EdgeInfiniteLM, Any]:
    """(model, tokenizer) for the options of `add_model_args`."""
    from eijax.tokenizer import load_tokenizer

    source = base_model_source(a.model, a.checkpoint)
    return load_model(source, inference_memory(a.sink, a.window, a.checkpoint), a.checkpoint), load_tokenizer(source)


def inference_memory(sink: int | None, window: int | None, checkpoint: str | None) -> MemoryConfig:
    """The MemoryConfig for --sink/--window; unset ones come from the checkpoint's training geometry
    (a memory path trained at one window does not transfer to another), else MemoryConfig's defaults."""
    trained_sink, trained_window = MemoryConfig().sink, MemoryConfig().window
    if checkpoint:
        from eijax.trained import trained_geometry

        trained_sink, trained_window = trained_geometry(checkpoint)
    return MemoryConfig(sink=trained_sink if sink is None else sink, window=trained_window if window is None else window)


def base_model_source(model: str | None, checkpoint: str | None) -> str:
    """What `--model` means for the CLIs: the option if given, else the base model of the
    `--checkpoint` training run, else DEFAULT_MODEL."""
    if model:
        return model
    if not checkpoint:
        return DEFAULT_MODEL
    from eijax.trained import trained_base

    return trained_base(checkpoint)


def stop_ids(tokenizer, templated: bool = True) -> tuple[int, ...]:
    """End-of-sequence and end-of-turn (<|im_end|>, Gemma's <end_of_turn>, when the vocabulary has
    them) ids of a tokenizer. A prompt in the completion layout (`templated`, and the tokenizer's
    template is eijax.tokenizer.PLAIN_TEMPLATE) is answered by one paragraph, so a blank line
    ("\\n\\n" when it is one token) stops too: a base model would go on with "Answer: ..." again."""
    ids = {tokenizer.eos_token_id}
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    if convert is not None:
        ids.update(convert(t) for t in ("<|im_end|>", "<end_of_turn>"))
    if templated and getattr(tokenizer, "chat_template", None) == PLAIN_TEMPLATE:
        blank = tokenizer.encode("\n\n", add_special_tokens=False)
        if len(blank) == 1:
            ids.add(blank[0])
    unk = getattr(tokenizer, "unk_token_id", None)
    return tuple(i for i in ids if isinstance(i, int) and i >= 0 and i != unk)


def prompt_parts(tokenizer, question: str, document: str = "",
                 question_position: str = "last") -> tuple[list[int], list[int]]:
    """(document part, question part) in the chat layout used by S-SFT (eijax.data.records.render_parts):
    the document part ends with the document; the question part carries the rest of the prompt.
    `question_position="both"` also puts the question before the document (S-SFT's question-both)."""
    from eijax.data.records import QARecord, render_parts

    parts = render_parts(QARecord(document, question, ""), tokenizer, question_position)
    return parts.ctx, parts.query


@cli.main_guard
def main(argv: Sequence[str] | None = None) -> None:
    p = cli.ArgumentParser(prog="python -m eijax.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help=f"registered name, HF folder or .gguf file (default: the --checkpoint run's "
                                   f"base model, else {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", help="eijax training run (trained gate; must be for --model's architecture)")
    p.add_argument("--method", default="edgeinfinite", choices=METHODS)
    p.add_argument("--prompt", required=True, help="the user message (the question in document mode)")
    p.add_argument("--document", help="text file: document + question mode (question-last, as in S-SFT)")
    p.add_argument("--raw", action="store_true", help="no chat template")
    add_geometry_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    document = cli.existing_file(a.document, "--document").read_text(encoding="utf-8") if a.document else ""
    t_start = time.perf_counter()
    # A second start loads its compiled steps (all of them, however small) and the dequantised
    # weights (eijax.checkpoint.weight_cache) from ~/.cache/eijax instead of redoing the work.
    cli.enable_compilation_cache(min_compile_secs=0.0)

    from eijax.tokenizer import load_tokenizer

    source = base_model_source(a.model, a.checkpoint)
    # The tokenizer (importing transformers: ~1.5 s of Python) loads in a thread while the weights
    # are copied (NumPy and XLA release the GIL): on 2 cores the two overlap almost entirely.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        tokenizer_load = pool.submit(load_tokenizer, source)
        model = load_model(source, inference_memory(a.sink, a.window, a.checkpoint), a.checkpoint)
        tok = tokenizer_load.result()
    gen = Generator(model, a.method)
    loaded = time.perf_counter() - t_start
    if a.raw:
        prompt, question = tok.encode(document, add_special_tokens=False), tok.encode(a.prompt, add_special_tokens=False)
    else:
        prompt, question = prompt_parts(tok, a.prompt, document)
    sampling = SamplingConfig(a.max_new_tokens, a.temperature, a.top_p, a.seed, stop_ids(tok, templated=not a.raw))
    out = gen.generate(prompt, sampling, question=question,
                       on_token=lambda t: print(tok.decode([t]), end="", flush=True))
    print(f"\n[{a.method}] prompt {out.prompt_tokens} tokens, route {out.route}, loaded in {loaded:.2f}s, "
          f"first token {out.time_to_first_token:.2f}s, {len(out.tokens)} tokens in {out.seconds:.2f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
