"""JSONL readers: every format, every bad-input case (each error names file, line and field), skip mode."""

from __future__ import annotations

import collections
import json
import os

import pytest

from rlhf_fast.data import (
    DataError,
    Demonstration,
    PretrainText,
    PromptRecord,
    Ranking,
    read_demonstrations,
    read_pretrain_text,
    read_prompts,
    read_rankings,
    write_jsonl,
)
from tests.data.conftest import render_chat

READERS = {
    "demonstrations": read_demonstrations,
    "rankings": read_rankings,
    "prompts": read_prompts,
    "pretrain": read_pretrain_text,
}
GOOD = {
    "demonstrations": {"prompt": "w1 w2", "response": "w3"},
    "rankings": {"prompt": "w1", "completions": ["w2", "w3"], "ranks": [0, 1]},
    "prompts": {"prompt": "w1"},
    "pretrain": {"text": "w1 w2"},
}


def ranking(completions, ranks, prompt="w1"):
    return json.dumps({"prompt": prompt, "completions": completions, "ranks": ranks})


# (reader, the bad line, the field the error must name, the DataError.kind it is counted under when skipped)
BAD_CASES = [
    ("demonstrations", '{"prompt": "w1", "response": ', "-", "malformed_json"),
    ("demonstrations", "[1, 2]", "-", "not_an_object"),
    ("demonstrations", b'{"prompt": "w1 \xff\xfe", "response": "w2"}', "-", "invalid_utf8"),
    ("demonstrations", '{"prompt": "w1"}', "response", "missing_field"),
    ("demonstrations", '{"response": "w1"}', "prompt", "missing_field"),
    ("demonstrations", '{"prompt": "w1", "response": 5}', "response", "wrong_type"),
    ("demonstrations", '{"prompt": ["w1"], "response": "w2"}', "prompt", "wrong_type"),
    ("demonstrations", '{"prompt": " \\n\\t ", "response": "w2"}', "prompt", "empty_text"),
    ("demonstrations", '{"prompt": "w1", "response": ""}', "response", "empty_text"),
    (
        "demonstrations",
        '{"prompt": "w1", "messages": [{"role": "user", "content": "w1"}]}',
        "messages",
        "conflicting_fields",
    ),
    ("rankings", '{"prompt": "w1", "completions": ["w2"], "ranks": [0]}', "completions", "bad_k"),
    ("rankings", ranking([f"w{i}" for i in range(10)], list(range(10))), "completions", "bad_k"),
    ("rankings", ranking(["w2", "w3", "w4"], [0, 1]), "ranks", "bad_ranks"),
    ("rankings", ranking(["w2", "w3"], [0, 0.5]), "ranks[1]", "bad_ranks"),
    ("rankings", ranking(["w2", "w3"], [True, 0]), "ranks[0]", "bad_ranks"),
    ("rankings", ranking(["w2", "w3"], [0, -1]), "ranks[1]", "bad_ranks"),
    ("rankings", ranking(["w2", "w3"], [1, 1]), "ranks", "all_tied"),
    ("rankings", ranking(["w2", "w3", " w2 "], [0, 1, 2]), "completions[2]", "duplicate_completion"),
    ("rankings", ranking(["w2", "  ", "w4"], [0, 1, 2]), "completions[1]", "empty_text"),
    ("rankings", ranking(["w2", 7], [0, 1]), "completions[1]", "wrong_type"),
    ("rankings", ranking(["w2", "w3"], [0, 1], prompt=""), "prompt", "empty_text"),
    ("rankings", '{"prompt": "w1", "completions": "w2 w3", "ranks": [0, 1]}', "completions", "wrong_type"),
    ("rankings", '{"prompt": "w1", "completions": ["w2", "w3"]}', "ranks", "missing_field"),
    ("rankings", '{"prompt": "w1", "chosen": "w2"}', "rejected", "missing_field"),
    ("rankings", '{"prompt": "w1", "chosen": "w2", "rejected": ""}', "rejected", "empty_text"),
    ("rankings", '{"prompt": "w1", "chosen": "w2", "rejected": "w2"}', "rejected", "duplicate_completion"),
    (
        "rankings",
        '{"prompt": "w1", "chosen": "w2", "rejected": "w3", "ranks": [0, 1]}',
        "ranks",
        "conflicting_fields",
    ),
    ("prompts", '{"text": "w1"}', "prompt", "missing_field"),
    ("prompts", '{"prompt": null}', "prompt", "wrong_type"),
    ("prompts", '"w1"', "-", "not_an_object"),
    ("pretrain", '{"text": ""}', "text", "empty_text"),
    ("pretrain", '{"text": 3.5}', "text", "wrong_type"),
    ("pretrain", b"\xc3\x28", "-", "invalid_utf8"),
]


def assert_names(error: DataError, path, line: int, field: str) -> None:
    assert error.path == str(path)
    assert error.line == line
    assert error.field == field
    assert str(error).startswith(f"{path}:{line}: field '{field}': ")
    assert "\n" not in str(error)


@pytest.mark.parametrize("reader_name, bad_line, field, kind", BAD_CASES)
def test_bad_record_names_file_line_and_field(write_lines, reader_name, bad_line, field, kind):
    # A good line, a blank line (ignored, but counted in line numbers), then the bad one at line 3.
    path = write_lines([GOOD[reader_name], "", bad_line, GOOD[reader_name]])
    reader = READERS[reader_name]
    with pytest.raises(DataError) as caught:
        reader(path)
    assert_names(caught.value, path, 3, field)
    assert caught.value.kind == kind

    skipped = reader(path, on_bad_record="skip")
    assert len(skipped) == 2
    assert skipped.skipped == collections.Counter({kind: 1})
    assert_names(skipped.first_skipped[kind], path, 3, field)


@pytest.mark.parametrize("reader_name", sorted(READERS))
@pytest.mark.parametrize("content", [b"", b"\n  \n\n"], ids=["zero_bytes", "blank_lines"])
@pytest.mark.parametrize("on_bad_record", ["error", "skip"])
def test_empty_file_is_always_an_error(tmp_path, reader_name, content, on_bad_record):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match="empty") as caught:
        READERS[reader_name](path, on_bad_record=on_bad_record)
    assert_names(caught.value, path, 0, "-")


def test_file_with_only_bad_records_is_an_error_in_skip_mode(write_lines):
    path = write_lines(['{"prompt": ""}', "not json"])
    with pytest.raises(DataError, match="no valid records") as caught:
        read_prompts(path, on_bad_record="skip")
    assert_names(caught.value, path, 0, "-")
    assert "1 empty_text" in str(caught.value) and "1 malformed_json" in str(caught.value)


def test_skip_mode_counts_each_reason(write_lines, rng):
    good = [{"prompt": f"w{i}", "response": f"w{i + 1}"} for i in range(rng.randrange(3, 10))]
    bad = (
        ['{"prompt": "w1", "response": ""}'] * rng.randrange(1, 4)
        + ["{oops"] * rng.randrange(1, 4)
        + ['{"prompt": "w1"}'] * rng.randrange(1, 4)
        + [b"\xff"] * rng.randrange(1, 4)
    )
    lines = good + bad
    rng.shuffle(lines)
    path = write_lines(lines)
    result = read_demonstrations(path, on_bad_record="skip")
    assert [r.to_dict() for r in result] == [line for line in lines if isinstance(line, dict)]
    expected = collections.Counter(_kind(line) for line in bad)
    assert result.skipped == expected
    assert result.num_skipped == len(bad)
    first_line = {
        kind: min(i + 1 for i, line in enumerate(lines) if line in bad and _kind(line) == kind)
        for kind in expected
    }
    assert {kind: error.line for kind, error in result.first_skipped.items()} == first_line
    # Each kept record knows its own line.
    for record in result:
        assert lines[record.source.line - 1] == record.to_dict()


def _kind(line) -> str:
    """The skip reason of each bad line used in test_skip_mode_counts_each_reason."""
    return {b"\xff": "invalid_utf8", "{oops": "malformed_json", '{"prompt": "w1"}': "missing_field"}.get(
        line, "empty_text"
    )


def test_on_bad_record_is_checked(write_lines):
    path = write_lines([GOOD["prompts"]])
    with pytest.raises(ValueError, match="on_bad_record"):
        read_prompts(path, on_bad_record="ignore")


def test_every_plain_format_round_trips(tmp_path, rng):
    demos = [Demonstration(f"w{i} w{i + 1}", f"w{rng.randrange(400)} w{i}") for i in range(5)]
    rankings = []
    for i in range(6):
        k = rng.randrange(2, 10)
        ranks = [rng.randrange(k) for _ in range(k)]
        ranks[0], ranks[1] = 0, 1  # never all tied
        rankings.append(Ranking(f"w{i}", tuple(f"w{10 * i + j} w{j}" for j in range(k)), tuple(ranks)))
    prompts = [PromptRecord(f"w{i}") for i in range(4)]
    texts = [PretrainText(f"w{i} hello world") for i in range(3)]
    for records, reader in (
        (demos, read_demonstrations),
        (rankings, read_rankings),
        (prompts, read_prompts),
        (texts, read_pretrain_text),
    ):
        path = tmp_path / f"{reader.__name__}.jsonl"
        assert write_jsonl(path, records) == len(records)
        result = reader(path)
        assert result.records == records
        assert [r.source.line for r in result] == list(range(1, len(records) + 1))
        assert result.path == str(path) and not result.skipped and not result.extra_fields


def test_pair_format_is_a_ranking_of_two(write_lines):
    path = write_lines(
        [
            {"prompt": "w1", "chosen": "w2 w3", "rejected": "w4"},
            {"prompt": "w5", "completions": ["w6", "w7", "w8"], "ranks": [1, 0, 1]},
        ]
    )
    first, second = read_rankings(path)
    assert first == Ranking("w1", ("w2 w3", "w4"), (0, 1))
    assert second.ranks == (1, 0, 1) and second.k == 3  # ties allowed


def test_unknown_fields_are_ignored_and_counted(write_lines):
    path = write_lines(
        [
            {"prompt": "w1", "response": "w2", "id": 1, "respones": "x"},
            {"prompt": "w1", "response": "w2", "id": 2},
        ]
    )
    result = read_demonstrations(path)
    assert len(result) == 2
    assert result.extra_fields == collections.Counter({"id": 2, "respones": 1})
    # A demonstrations file also serves as a prompts file: "response" is then an ignored extra field.
    prompts = read_prompts(path)
    assert [p.prompt for p in prompts] == ["w1", "w1"]
    assert prompts.extra_fields["response"] == 2


def test_byte_order_mark_and_crlf_are_tolerated(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "w1"}\r\n{"prompt": "w2"}\r\n')
    assert [p.prompt for p in read_prompts(path)] == ["w1", "w2"]


def test_text_is_kept_exactly(write_lines):
    path = write_lines([{"prompt": "  w1\n", "response": " w2 "}])
    (record,) = read_demonstrations(path)
    assert (record.prompt, record.response) == ("  w1\n", " w2 ")


# ------------------------------------------------------------------------------------------------- chat


def test_chat_demonstration_renders_prompt_through_template(write_lines, chat_tokenizer):
    messages = [
        {"role": "system", "content": "w1 w2"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "w3"},
        {"role": "user", "content": "world"},
        {"role": "assistant", "content": "w4 w5"},
    ]
    path = write_lines([GOOD["demonstrations"], {"messages": messages}])
    plain, chat = read_demonstrations(path, tokenizer=chat_tokenizer)
    assert plain.prompt == "w1 w2"
    assert chat.response == "w4 w5"
    assert chat.prompt == render_chat(messages[:-1])
    assert chat.prompt == chat_tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    assert chat.source.line == 2


def test_chat_prompt_drops_a_trailing_assistant_message(write_lines, chat_tokenizer):
    conversation = [{"role": "user", "content": "w1"}]
    path = write_lines(
        [{"messages": conversation}, {"messages": conversation + [{"role": "assistant", "content": "w2"}]}]
    )
    first, second = read_prompts(path, tokenizer=chat_tokenizer)
    assert first.prompt == second.prompt == render_chat(conversation)


CHAT_CASES = [
    # (reader, messages value, field, kind)
    ("demonstrations", [{"role": "user", "content": "w1"}], "messages[0].role", "bad_messages"),
    ("demonstrations", [{"role": "assistant", "content": "w1"}], "messages", "bad_messages"),
    (
        "demonstrations",
        [{"role": "user", "content": "w1"}, {"role": "assistant", "content": " "}],
        "messages[1].content",
        "empty_text",
    ),
    (
        "demonstrations",
        [{"role": "user"}, {"role": "assistant", "content": "w2"}],
        "messages[0].content",
        "missing_field",
    ),
    (
        "demonstrations",
        [{"content": "w1"}, {"role": "assistant", "content": "w2"}],
        "messages[0].role",
        "missing_field",
    ),
    (
        "demonstrations",
        [{"role": "user", "content": ["w1"]}, {"role": "assistant", "content": "w2"}],
        "messages[0].content",
        "wrong_type",
    ),
    ("demonstrations", ["w1", {"role": "assistant", "content": "w2"}], "messages[0]", "wrong_type"),
    ("demonstrations", [], "messages", "bad_messages"),
    ("demonstrations", {"role": "user"}, "messages", "wrong_type"),
    (
        "demonstrations",
        [{"role": "tool", "content": "w1"}, {"role": "assistant", "content": "w2"}],
        "messages",
        "chat_template_failed",
    ),
    ("prompts", [{"role": "assistant", "content": "w1"}], "messages", "bad_messages"),
    ("prompts", [{"role": "tool", "content": "w1"}], "messages", "chat_template_failed"),
]


@pytest.mark.parametrize("reader_name, messages, field, kind", CHAT_CASES)
def test_bad_chat_record_names_file_line_and_field(
    write_lines, chat_tokenizer, reader_name, messages, field, kind
):
    path = write_lines([GOOD[reader_name], {"messages": messages}])
    with pytest.raises(DataError) as caught:
        READERS[reader_name](path, tokenizer=chat_tokenizer)
    assert_names(caught.value, path, 2, field)
    assert caught.value.kind == kind
    result = READERS[reader_name](path, tokenizer=chat_tokenizer, on_bad_record="skip")
    assert len(result) == 1 and result.skipped == collections.Counter({kind: 1})


@pytest.mark.parametrize("reader", [read_demonstrations, read_prompts])
def test_chat_record_needs_a_chat_template(write_lines, tokenizer, reader):
    path = write_lines(
        [{"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}]
    )
    with pytest.raises(DataError, match="pass tokenizer") as caught:
        reader(path)
    assert_names(caught.value, path, 1, "messages")
    with pytest.raises(DataError, match="no chat template") as caught:
        reader(path, tokenizer=tokenizer)
    assert_names(caught.value, path, 1, "messages")
    assert caught.value.kind == "no_chat_template"


# ------------------------------------------------------------------------------------------------ write


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "nested" / "out.jsonl"
    write_jsonl(path, [{"prompt": "w1"}, PromptRecord("w2")])
    before = path.read_bytes()
    assert [json.loads(line) for line in before.decode().splitlines()] == [{"prompt": "w1"}, {"prompt": "w2"}]

    def failing():
        yield {"prompt": "w3"}
        raise RuntimeError("generator failed halfway")

    with pytest.raises(RuntimeError, match="halfway"):
        write_jsonl(path, failing())
    assert path.read_bytes() == before  # the old file is untouched
    assert os.listdir(path.parent) == ["out.jsonl"]  # and no temporary file is left behind
    with pytest.raises(ValueError, match=r"records\[1\]"):
        write_jsonl(path, [{"prompt": "w3"}, 42])
    assert path.read_bytes() == before
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_write_jsonl_keeps_unicode_readable(tmp_path):
    path = tmp_path / "u.jsonl"
    write_jsonl(path, [{"text": "héllo wörld ✓"}])
    assert "héllo wörld ✓" in path.read_text(encoding="utf-8")
    assert read_pretrain_text(path)[0].text == "héllo wörld ✓"


def test_data_error_survives_pickling():
    import pickle

    error = DataError("a.jsonl", 3, "prompt", "empty", kind="empty_text")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.line, copy.field, copy.reason, copy.kind, str(copy)) == (
        error.path,
        error.line,
        error.field,
        error.reason,
        error.kind,
        str(error),
    )


# ------------------------------------------------------------------------------------ hostile input


def test_a_giant_line_is_refused_unread(tmp_path):
    """A line over the byte limit is an error naming its line, read in bounded memory (never held whole),
    and the lines after it keep their numbers."""
    import tracemalloc

    path = tmp_path / "giant.jsonl"
    with open(path, "wb") as file:
        file.write(json.dumps(GOOD["demonstrations"]).encode() + b"\n")
        file.write(b'{"prompt": "' + b"w1 " * 10_000_000 + b'", "response": "w2"}\n')  # 30 MB
        file.write(b"not json\n")
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as caught:
            read_demonstrations(path, max_record_bytes=4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_names(caught.value, path, 2, "-")
    assert caught.value.kind == "record_too_large" and "4096" in str(caught.value)
    assert peak < 8 * 2**20, peak
    skipped = read_demonstrations(path, max_record_bytes=4096, on_bad_record="skip")
    assert skipped.skipped == collections.Counter({"record_too_large": 1, "malformed_json": 1})
    assert skipped.first_skipped["malformed_json"].line == 3


@pytest.mark.parametrize("size", [99, 100, 101])
def test_the_byte_limit_counts_the_record_without_its_line_break(write_lines, size):
    record = '{"text": "' + "w" * (size - 12) + '"}'
    assert len(record) == size
    path = write_lines([record])
    if size <= 100:
        assert len(read_pretrain_text(path, max_record_bytes=100)) == 1
    else:
        with pytest.raises(DataError, match="101 bytes"):
            read_pretrain_text(path, max_record_bytes=100)


@pytest.mark.parametrize(
    "line, field",
    [
        ('{"prompt": "w1", "response": "w2", "prompt": "w3"}', "prompt"),
        ('{"messages": [{"role": "user", "content": "a", "role": "system"}], "response": "w2"}', "role"),
    ],
)
def test_duplicate_keys_are_refused(write_lines, line, field):
    path = write_lines([GOOD["demonstrations"], line])
    with pytest.raises(DataError, match="duplicate") as caught:
        read_demonstrations(path)
    assert_names(caught.value, path, 2, field)
    assert caught.value.kind == "duplicate_key"


@pytest.mark.parametrize(
    "reader_name, line, field",
    [
        ("demonstrations", '{"prompt": "w1 \\ud800", "response": "w2"}', "prompt"),
        (
            "rankings",
            '{"prompt": "w1", "completions": ["w2", "\\udfff w3"], "ranks": [0, 1]}',
            "completions[1]",
        ),
        ("prompts", '{"messages": [{"role": "user", "content": "x\\ud83d"}]}', "messages[0].content"),
        ("pretrain", '{"text": "\\ud800"}', "text"),
        ("prompts", '{"prompt": "w1", "\\ud800": 1}', "\\ud800"),
    ],
)
def test_a_lone_surrogate_is_invalid_text_naming_the_field(write_lines, reader_name, line, field):
    path = write_lines([GOOD[reader_name], line])
    with pytest.raises(DataError, match="surrogate") as caught:
        READERS[reader_name](path)
    assert_names(caught.value, path, 2, field)
    str(caught.value).encode("utf-8")  # the message itself prints anywhere


def test_a_surrogate_pair_escape_is_valid_text(write_lines):
    path = write_lines(['{"prompt": "w1 \\ud83d\\ude00", "response": "w2"}'])
    assert read_demonstrations(path)[0].prompt == "w1 \U0001f600"
