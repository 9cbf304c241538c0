"""S-SFT records: parsing (JSONL, Parquet) and rendering into three token parts.

A record is either
  * `QARecord(context, instruction, answer)` -- a long document, a question or task
    about it, and the reference answer; or
  * `ChatRecord(messages)` -- a chat whose last message (role "assistant") is the
    answer and everything before it is the prompt.

Rendering (`render_parts`) applies the tokenizer's chat template and cuts the
rendered conversation into three token lists (DESIGN.md §1.5):

  ctx_part    everything up to and including the context text: the template's
              header (system turn, "<|im_start|>user\\n", ...) then the context.
  query_part  the rest of the prompt, through the generation prompt
              (e.g. "\\n\\nWhat is ...?<|im_end|>\\n<|im_start|>assistant\\n").
  answer_part the answer text and the end-of-turn token. Whatever the template
              puts after the first end-of-turn (`eos_token_id`) is dropped (for
              ChatML that is the trailing "\\n"): generation stops at eos, so the
              stream the model is trained on ends where decoding ends. If the
              rendered answer contains no eos, one is appended.

User content for a QARecord:
  question_position="last": context + "\\n\\n" + instruction
  question_position="both": instruction + "\\n\\n" + context + "\\n\\n" + instruction
  (an empty context gives just the instruction). For "both", the first copy of the
  instruction is part of ctx_part.

For a ChatRecord the split is at the start of the *final user message's content*:
ctx_part = system turn and all earlier turns plus the final user turn's header;
query_part = the final user content and the rest of the prompt. Put long documents
in a QARecord (or in earlier turns) if they should go through memory and be
eligible for middle truncation; a single huge user message is all query.

Tokenisation: the rendered string is cut at those two character boundaries and each
piece is tokenised on its own (`encode(piece, add_special_tokens=False)`). So that
the boundaries fall between non-space text and a newline or special token, where BPE
tokenizers (SmolLM2's included) do not merge, leading/trailing whitespace is
stripped from the context, instruction and answer of a QARecord, and from the final
user content and the answer of a ChatRecord (`normalize`); everything else is kept
verbatim. Then ctx + query + answer equals tokenising the whole (normalised)
conversation; tests check this on the real tokenizer. The cut is found by rendering
with a sentinel string in place of the context, so templates that add text around
the content are handled exactly.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Union

from eijax.cli import MissingInput, UserError

log = logging.getLogger(__name__)

OnError = Literal["skip", "raise"]
QuestionPosition = Literal["last", "both"]

_SENTINEL = "\u2063<<eijax-context-here>>\u2063"  # never appears in real text


class RecordError(UserError, ValueError):
    """A record (JSONL line, Parquet row, dict) that is malformed."""


@dataclass(frozen=True)
class QARecord:
    context: str
    instruction: str
    answer: str


@dataclass(frozen=True)
class ChatRecord:
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs; last is the answer

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


Record = Union[QARecord, ChatRecord]


@dataclass(frozen=True)
class RecordParts:
    """Token ids of the three parts of a rendered record."""

    ctx: list[int]
    query: list[int]
    answer: list[int]


@dataclass
class LoadedRecords:
    records: list[Record] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "file:line: reason" per skipped item


# ---------------------------------------------------------------- parsing


def parse_record(obj: Any) -> Record:
    """Validates one JSON object; raises RecordError(reason). Extra keys are ignored."""
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj and obj["messages"] is not None:
        return _parse_chat(obj["messages"])
    missing = [k for k in ("context", "instruction", "answer") if k not in obj]
    if missing:
        raise RecordError(
            f"missing key(s) {missing}: need 'context', 'instruction', 'answer' or 'messages'"
        )
    for k in ("context", "instruction", "answer"):
        if not isinstance(obj[k], str):
            raise RecordError(f"'{k}' must be a string, got {type(obj[k]).__name__}")
    if not obj["instruction"]:
        raise RecordError("'instruction' is empty")
    if not obj["answer"]:
        raise RecordError("'answer' is empty")
    return QARecord(obj["context"], obj["instruction"], obj["answer"])


def _parse_chat(messages: Any) -> ChatRecord:
    if not isinstance(messages, (list, tuple)) or len(messages) < 2:
        raise RecordError("'messages' must be a list of at least 2 messages")
    pairs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise RecordError(f"messages[{i}] must be an object with string 'role' and 'content'")
        pairs.append((m["role"], m["content"]))
    if pairs[-1][0] != "assistant":
        raise RecordError("the last message must have role 'assistant' (it is the answer)")
    if not any(r == "user" for r, _ in pairs[:-1]):
        raise RecordError("no 'user' message before the answer")
    return ChatRecord(tuple(pairs))


def _keep_or_raise(out: LoadedRecords, where: str, reason: str, on_error: OnError) -> None:
    msg = f"{where}: {reason}"
    if on_error == "raise":
        raise RecordError(msg)
    log.warning("skipping malformed record %s", msg)
    out.skipped.append(msg)


def read_jsonl(path: str | os.PathLike, on_error: OnError = "raise",
               out: LoadedRecords | None = None) -> LoadedRecords:
    """Reads one JSONL file. Blank lines are ignored; bad lines report `file:line: reason`."""
    out = out if out is not None else LoadedRecords()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.records.append(parse_record(json.loads(line)))
            except json.JSONDecodeError as e:
                _keep_or_raise(out, f"{path}:{lineno}", f"bad JSON ({e.msg})", on_error)
            except RecordError as e:
                _keep_or_raise(out, f"{path}:{lineno}", str(e), on_error)
    return out


def read_parquet(path: str | os.PathLike, on_error: OnError = "raise",
                 out: LoadedRecords | None = None) -> LoadedRecords:
    """Reads a Parquet file with the JSONL columns; bad rows report `file:row N: reason`."""
    import pyarrow.parquet as pq  # only needed for Parquet sources

    out = out if out is not None else LoadedRecords()
    for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        try:
            out.records.append(parse_record(row))
        except RecordError as e:
            _keep_or_raise(out, f"{path}:row {i}", str(e), on_error)
    return out


def expand_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Files stay as given; a folder becomes its *.jsonl and *.parquet files, sorted."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix in (".jsonl", ".parquet"))
            if not found:
                raise MissingInput(f"data folder {p} has no *.jsonl or *.parquet files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise MissingInput(f"data file {p}: no such file or folder")
    return files


def load_records(paths: str | os.PathLike | Iterable[str | os.PathLike],
                 on_error: OnError = "raise") -> LoadedRecords:
    """Loads and validates every record of the given files/folders, in order."""
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    out = LoadedRecords()
    for p in expand_paths(paths):
        reader = read_parquet if p.suffix == ".parquet" else read_jsonl
        reader(p, on_error, out)
    if out.skipped:
        log.warning("skipped %d malformed record(s)", len(out.skipped))
    return out


# ---------------------------------------------------------------- rendering


def _user_content(rec: QARecord, position: QuestionPosition) -> str:
    """User content with the sentinel where the context goes."""
    if not rec.context:
        return _SENTINEL + rec.instruction
    if position == "last":
        return f"{_SENTINEL}\n\n{rec.instruction}"
    if position == "both":
        return f"{rec.instruction}\n\n{_SENTINEL}\n\n{rec.instruction}"
    raise ValueError(f"question_position must be 'last' or 'both', got {position!r}")


def normalize(rec: Record) -> Record:
    """Strips the whitespace that would touch a part boundary (see the module docstring)."""
    if isinstance(rec, QARecord):
        return QARecord(rec.context.strip(), rec.instruction.strip(), rec.answer.strip())
    msgs = list(rec.messages)
    last_user = max(i for i, (role, _) in enumerate(msgs[:-1]) if role == "user")
    msgs[last_user] = ("user", msgs[last_user][1].strip())
    msgs[-1] = ("assistant", msgs[-1][1].strip())
    return ChatRecord(tuple(msgs))


def _messages_with_sentinel(rec: Record, position: QuestionPosition):
    """(prompt messages with the sentinel, answer text, text that replaces the sentinel)."""
    rec = normalize(rec)
    if isinstance(rec, QARecord):
        return [{"role": "user", "content": _user_content(rec, position)}], rec.answer, rec.context
    msgs = rec.as_dicts()
    prompt, answer = msgs[:-1], msgs[-1]["content"]
    last_user = max(i for i, m in enumerate(prompt) if m["role"] == "user")
    # The sentinel marks the start of the final user content: the content goes to query.
    prompt[last_user] = {"role": "user", "content": _SENTINEL + prompt[last_user]["content"]}
    return prompt, answer, ""


def render_text(rec: Record, tokenizer: Any,
                question_position: QuestionPosition = "last") -> tuple[str, str, str]:
    """The rendered conversation as (ctx_text, query_text, answer_text) strings."""
    prompt, answer, ctx_fill = _messages_with_sentinel(rec, question_position)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        prompt + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("chat template is not prefix-stable: the rendered conversation "
                         "does not start with the rendered prompt + generation prompt")
    if prompt_text.count(_SENTINEL) != 1:
        raise ValueError("chat template altered or duplicated the user content")
    head, tail = prompt_text.split(_SENTINEL)
    return head + ctx_fill, tail, full_text[len(prompt_text):]


def render_parts(rec: Record, tokenizer: Any,
                 question_position: QuestionPosition = "last") -> RecordParts:
    """Token ids of ctx_part, query_part, answer_part (see the module docstring)."""
    ctx_text, query_text, answer_text = render_text(rec, tokenizer, question_position)
    encode = tokenizer.encode
    answer = list(encode(answer_text, add_special_tokens=False))
    eos = tokenizer.eos_token_id
    if eos in answer:
        answer = answer[: answer.index(eos) + 1]
    else:
        answer.append(eos)
    return RecordParts(ctx=list(encode(ctx_text, add_special_tokens=False)),
                       query=list(encode(query_text, add_special_tokens=False)),
                       answer=answer)


def record_to_json(rec: Record) -> dict[str, Any]:
    """The JSONL form of a record (inverse of parse_record)."""
    if isinstance(rec, QARecord):
        return {"context": rec.context, "instruction": rec.instruction, "answer": rec.answer}
    return {"messages": rec.as_dicts()}


def as_record(item: Record | dict[str, Any]) -> Record:
    """Records pass through; dicts (e.g. synthetic samples) are parsed."""
    return item if isinstance(item, (QARecord, ChatRecord)) else parse_record(item)
