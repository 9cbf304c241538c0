"""Load the tokenizer of a checkpoint (Hugging Face folder or GGUF file), offline only.

GGUFs: transformers converts the vocabulary on every load (Gemma 3's 262K tokens without merges
take 30-60 s, SmolLM2's several seconds), so the converted tokenizer is saved once under the eijax cache folder
(`registry.cache_dir()`, keyed by the file's path, size, mtime and the transformers version) and
reloaded from there (about 5 s).

A checkpoint that brings no chat template (gemma-3-270m's GGUF: a base model) gets the completion
layout `PLAIN_TEMPLATE`, which base models follow; every chat template a checkpoint brings is kept.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from eijax.checkpoint.gguf_file import check_gguf, read_gguf_metadata
from eijax.checkpoint.registry import cache_dir, resolve_model
from eijax.cli import InputError, MissingInput

# llama.cpp pre-tokenizer types that isolate every numeric character before the GPT-2 split
# (llama-vocab.cpp groups these together). transformers' GGUF converter knows no split for them
# and falls back to the plain GPT-2 split, which keeps numerals such as "²³" or "١٢" together and
# so tokenises them differently from llama.cpp and from the original tokenizer.json.
_DIGIT_ISOLATING_PRE_TOKENIZERS = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})

# The completion layout, for checkpoints that bring no chat template (base models such as
# gemma-3-270m, whose GGUF has none): each message's text as a paragraph, an answer after "Answer:".
# A base model continues it: gemma-3-270m with full attention answers the passkey 60/60 at 1K-4K in
# this layout; given Gemma 3's chat turns it restated the question (0/6 at 1K).
# Prefix-stable, as eijax.data.records needs: the prompt ends with "Answer:", the answer follows it.
PLAIN_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ 'Answer: ' + (message['content'] | trim) + eos_token + '\\n\\n' }}"
    "{%- else -%}"
    "{{ (message['content'] | trim) + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Answer:' }}{%- endif -%}")


def load_tokenizer(name_or_path: str | Path):
    """Return a `transformers.PreTrainedTokenizerFast` for a model name, HF folder or .gguf file.

    Never touches the network. The result is cached per resolved path and shared between callers:
    do not mutate it.
    """
    return _load_tokenizer_cached(resolve_model(name_or_path).resolve())


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(path: Path):
    if path.suffix.lower() == ".gguf":
        check_gguf(path)  # transformers' own reader fails on a cut-off file with a bare struct/numpy error
    from transformers import PreTrainedTokenizerFast  # heavy import, only when used

    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise MissingInput(f"No tokenizer.json in {path}")
        from transformers import AutoTokenizer  # a folder's own tokenizer class may add behaviour
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    elif path.suffix.lower() == ".gguf":
        tokenizer = _gguf_tokenizer(path)
    else:
        raise InputError(f"{path} is neither a .gguf file nor a Hugging Face model folder")
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(f"{path} gave a {type(tokenizer).__name__}, not a fast (tokenizers) tokenizer")
    if not tokenizer.chat_template:
        tokenizer.chat_template = PLAIN_TEMPLATE
    return tokenizer


def _gguf_tokenizer(path: Path):
    # Every GGUF's converted tokenizer is cached: Gemma 3's takes 30-60 s to rebuild (no merges in
    # the file), and even SmolLM2's ~5-10 s would be most of a generate start.
    cached = _tokenizer_cache_folder(path)
    if (cached / "tokenizer.json").is_file():
        # the generic fast class: AutoTokenizer imports torch (~4 s of a generate start) and the
        # folder is one we wrote (encodings, chat template and special ids are the same, tested)
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(cached, local_files_only=True, trust_remote_code=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        path.parent, gguf_file=path.name, local_files_only=True, trust_remote_code=False)
    _isolate_digits_like_llama_cpp(tokenizer, path)
    _save_to_cache(tokenizer, cached)
    return tokenizer


def _tokenizer_cache_folder(path: Path) -> Path:
    import transformers

    st = path.stat()
    # "|2": caches written before the completion layout hold Gemma 3's chat template for gemma-3-270m
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}|2"
    return cache_dir() / "tokenizers" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _save_to_cache(tokenizer, folder: Path) -> None:
    """Write to a temporary folder, then rename: a concurrent reader sees all of it or nothing.
    A cache that cannot be written only costs time."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass


def _isolate_digits_like_llama_cpp(tokenizer, gguf_path: Path) -> None:
    from tokenizers import pre_tokenizers

    pre_type = read_gguf_metadata(gguf_path, ["tokenizer.ggml.pre"]).get("tokenizer.ggml.pre")
    backend = tokenizer.backend_tokenizer
    # Only patch the plain ByteLevel fallback; a split transformers chose on purpose is kept.
    if pre_type in _DIGIT_ISOLATING_PRE_TOKENIZERS and isinstance(backend.pre_tokenizer,
                                                                 pre_tokenizers.ByteLevel):
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])


def clear_tokenizer_cache() -> None:
    """Forget cached tokenizers (e.g. after a checkpoint file was replaced)."""
    _load_tokenizer_cached.cache_clear()
