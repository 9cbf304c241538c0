"""Load the tokenizer of a checkpoint (Hugging Face folder or GGUF file), offline only."""

from __future__ import annotations

import functools
from pathlib import Path

from eijax.checkpoint.gguf_file import read_gguf_metadata
from eijax.checkpoint.registry import resolve_model

# llama.cpp pre-tokenizer types that isolate every numeric character before the GPT-2 split
# (llama-vocab.cpp groups these together). transformers' GGUF converter knows no split for them
# and falls back to the plain GPT-2 split, which keeps numerals such as "²³" or "١٢" together and
# so tokenises them differently from llama.cpp and from the original tokenizer.json.
_DIGIT_ISOLATING_PRE_TOKENIZERS = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})


def load_tokenizer(name_or_path: str | Path):
    """Return a `transformers.PreTrainedTokenizerFast` for a model name, HF folder or .gguf file.

    Never touches the network. The result is cached per resolved path and shared between callers:
    do not mutate it.
    """
    return _load_tokenizer_cached(resolve_model(name_or_path).resolve())


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(path: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # heavy import, only when used

    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"No tokenizer.json in {path}")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    elif path.suffix.lower() == ".gguf":
        tokenizer = AutoTokenizer.from_pretrained(
            path.parent, gguf_file=path.name, local_files_only=True, trust_remote_code=False)
        _isolate_digits_like_llama_cpp(tokenizer, path)
    else:
        raise ValueError(f"{path} is neither a .gguf file nor a Hugging Face model folder")
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(f"{path} gave a {type(tokenizer).__name__}, not a fast (tokenizers) tokenizer")
    return tokenizer


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
