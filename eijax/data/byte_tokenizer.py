"""A tiny deterministic byte-level tokenizer with a ChatML template, for tests.

It implements the part of the Hugging Face tokenizer interface the data layer uses
(`encode`, `decode`, `apply_chat_template`, `eos_token_id`, `pad_token_id`), so
tests run without loading a real vocabulary. Ids 0..255 are UTF-8 bytes; the
special tokens come after them. Every string round-trips exactly, and tokenising
two strings separately always equals tokenising their concatenation (bytes never
merge), which makes layout tests exact.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

PAD, IM_START, IM_END = "<pad>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END)
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


class ByteTokenizer:
    """Byte-level tokenizer: id = byte value, specials at 256, 257, 258."""

    pad_token_id = 256
    bos_token_id = None
    eos_token_id = 258  # <|im_end|>: ends every turn, as in SmolLM2
    vocab_size = 259

    def __init__(self, system_prompt: str | None = None):
        # Like SmolLM2, a default system turn is added when the chat has none.
        self.system_prompt = system_prompt

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        del add_special_tokens  # no BOS/EOS is ever added
        ids: list[int] = []
        for piece in _SPECIAL_SPLIT.split(text):
            if piece in SPECIAL_TOKENS:
                ids.append(256 + SPECIAL_TOKENS.index(piece))
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special_tokens:
                out.append(SPECIAL_TOKENS[i - 256])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        tokenize: bool = True,
        add_generation_prompt: bool = False,
        **unused: Any,
    ) -> str | list[int]:
        parts = []
        if self.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            parts.append(f"{IM_START}system\n{self.system_prompt}{IM_END}\n")
        for m in messages:
            parts.append(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n")
        if add_generation_prompt:
            parts.append(f"{IM_START}assistant\n")
        text = "".join(parts)
        return self.encode(text) if tokenize else text
