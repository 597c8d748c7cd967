"""Readers: every schema, every local file type, the datasets path, bad input, bounded memory."""

import json
import tracemalloc
from pathlib import Path

import datasets
import pytest

from hsd.data import DataReport, RecordError, detect_format, extract_tuples, read_conversations
from hsd.data.testing import synthetic_wildchat_rows

FIXTURES = Path(__file__).parent / "data"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_wildchat_rows_from_a_datasets_dataset():
    rows = synthetic_wildchat_rows(4, seed=1)
    convs = list(read_conversations(datasets.Dataset.from_list(rows)))
    assert [c.id for c in convs] == [r["conversation_hash"] for r in rows]
    second = convs[1]
    assert second.messages == [{"role": m["role"], "content": m["content"]} for m in rows[1]["conversation"]]
    assert (second.source_model, second.language, second.user_key) == ("gpt-4-0314", "English", "ip1")
    assert second.metadata["format"] == "wildchat" and second.metadata["turn"] == rows[1]["turn"]


def test_wildchat_v1_schema_with_conversation_id():
    row = {"conversation_id": "v1-9", "model": "gpt-3.5-turbo", "toxic": False, "language": "English",
           "conversation": [{"role": "user", "content": "Hi", "toxic": False}, {"role": "assistant", "content": "Yo"}]}
    (conv,) = read_conversations([row])
    assert conv.id == "v1-9" and conv.metadata["format"] == "wildchat"


def test_each_fixture_format_is_detected_and_normalised():
    expected = {
        "wildfeedback.jsonl": ("wildfeedback", "wf-1", "user-42"),
        "lmsys.jsonl": ("lmsys", "lmsys-1", None),
        "sharegpt.json": ("sharegpt", "sg-1", None),
        "messages.jsonl": ("messages", "m-1", None),
        "tuples.jsonl": ("tuples", "t-1", "u7"),
    }
    for name, (fmt, record_id, user_key) in expected.items():
        (conv, *_) = read_conversations(f"{FIXTURES}/{name}")
        assert conv.metadata["format"] == fmt, name
        assert (conv.id, conv.user_key) == (record_id, user_key), name
        assert all(set(m) == {"role", "content"} for m in conv.messages)
        assert {m["role"] for m in conv.messages} <= {"system", "user", "assistant"}


def test_sharegpt_system_and_aliases():
    (conv,) = read_conversations(f"{FIXTURES}/sharegpt.json")
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_openai_text_parts_are_joined():
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]}
    (conv,) = read_conversations([row])
    assert conv.messages[0]["content"] == "Hello"


def test_tuple_rows_target_only_the_completion():
    (conv,) = read_conversations(f"{FIXTURES}/tuples.jsonl")
    (t,) = extract_tuples([conv])
    assert conv.response_indices == (len(conv.messages) - 2,)
    assert (t.y, t.o) == (conv.messages[-2]["content"], conv.messages[-1]["content"])
    assert t.turn_index == 1  # the prompt holds one earlier assistant reply, which is context only


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet"])
def test_local_files_and_the_datasets_builders_agree(tmp_path, suffix):
    rows = synthetic_wildchat_rows(5, seed=2)
    path = tmp_path / f"chats.{suffix}"
    dataset = datasets.Dataset.from_list(rows)
    if suffix == "jsonl":
        write_jsonl(path, rows)
    elif suffix == "json":
        path.write_text(json.dumps(rows))
    else:
        dataset.to_parquet(str(path))
    direct = [c.messages for c in read_conversations(path)]
    assert direct == [c.messages for c in read_conversations(dataset)]
    builder = "parquet" if suffix == "parquet" else "json"
    via_hub_code = [c.messages for c in read_conversations(builder, data_files=str(path), streaming=True)]
    assert via_hub_code == direct
    assert [c.messages for c in read_conversations(tmp_path)] == direct  # a directory of files


def test_format_can_be_forced_and_is_validated():
    rows = [{"messages": [{"role": "user", "content": "Hi"}]}]
    with pytest.raises(RecordError, match=r"row 0: .*missing field 'conversations'"):
        list(read_conversations(rows, format="sharegpt"))
    with pytest.raises(ValueError, match="unknown format"):
        list(read_conversations(rows, format="alpaca"))
    with pytest.raises(RecordError, match="cannot detect the format"):
        detect_format({"instruction": "x", "output": "y"})


BAD_RECORDS = [
    ({"messages": [{"role": "user"}]}, r"message 0: missing field\(s\) \['content'\]"),
    ({"messages": [{"role": "tool", "content": "{}"}]}, r"message 0: unknown role 'tool'"),
    ({"messages": [{"role": "user", "content": 5}]}, r"message 0: content must be a string, got int"),
    ({"messages": [{"role": "user", "content": None}]}, r"content must be a string, got NoneType"),
    ({"messages": "hello"}, r"messages must be a list"),
    ({"id": "x9", "messages": ["hello"]}, r"record 1 \(id='x9'\), message 0: expected a mapping"),
]


@pytest.mark.parametrize("bad, message", BAD_RECORDS)
def test_bad_records_raise_naming_the_record_or_are_counted(bad, message):
    good = {"messages": [{"role": "user", "content": "Hi"}]}
    with pytest.raises(RecordError, match=message):
        list(read_conversations([good, bad], format="messages"))
    report = DataReport()
    convs = list(read_conversations([good, bad, good], format="messages", on_error="skip", report=report))
    assert len(convs) == 2 and report.skipped_records["invalid_record"] == 1 and report.records_read == 3


def test_invalid_utf8_and_invalid_json_lines(tmp_path, caplog):
    path = tmp_path / "broken.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "Hi"}]}).encode()
    path.write_bytes(good + b"\n" + b'{"messages": [\xff]}\n' + b"\n" + b'{"messages": [}\n' + good + b"\n")
    with pytest.raises(RecordError, match=r"broken.jsonl line 2: invalid UTF-8"):
        list(read_conversations(path))
    report = DataReport()
    with caplog.at_level("WARNING", logger="hsd.data"):
        convs = list(read_conversations(path, on_error="skip", report=report))
    assert len(convs) == 2
    assert report.skipped_records == {"invalid_utf8": 1, "invalid_json": 1}
    assert "broken.jsonl line 4: invalid JSON" in caplog.text


def test_invalid_json_file_and_unsupported_suffix(tmp_path):
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(RecordError, match=r"bad.json: invalid JSON"):
        list(read_conversations(tmp_path / "bad.json"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported file type"):
        list(read_conversations(tmp_path / "notes.txt"))


def test_limit_stops_early():
    assert len(list(read_conversations(synthetic_wildchat_rows(9), limit=4))) == 4


def test_thousand_conversations_stream_in_bounded_memory(tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", synthetic_wildchat_rows(1000, seed=7, words=(20, 40)))
    file_size = path.stat().st_size
    report = DataReport()
    tracemalloc.start()
    count = sum(1 for _ in extract_tuples(read_conversations(path, report=report), report=report))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert report.records_read == 1000 and count == report.tuples_kept > 1000
    assert peak < file_size / 20, f"peak {peak} bytes for a {file_size}-byte file: not streaming"


def test_missing_local_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing.parquet: no such file"):
        list(read_conversations(tmp_path / "missing.parquet"))
    with pytest.raises(FileNotFoundError, match=r"shards: no such file or directory"):
        list(read_conversations(str(tmp_path / "shards")))  # an absolute path, not a hub name


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_utf8_byte_order_mark_does_not_lose_the_first_record(tmp_path, suffix):
    rows = [{"messages": [{"role": "user", "content": "Hi"}]}, {"messages": [{"role": "user", "content": "Yo"}]}]
    text = "".join(json.dumps(r) + "\n" for r in rows) if suffix == ".jsonl" else json.dumps(rows)
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [c.messages[0]["content"] for c in read_conversations(path)] == ["Hi", "Yo"]


# ---- bad inputs: each with its error or its count (under on_error="skip") ----------------------


HI = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}


def read_skipping(source, **kw):
    report = DataReport()
    convs = list(read_conversations(source, on_error="skip", report=report, **kw))
    return convs, report


def test_a_lone_surrogate_in_json_content_is_a_record_error_not_a_tokenizer_crash(tmp_path):
    path = tmp_path / "surrogate.jsonl"
    # JSON's \u escapes: a pair is one emoji; half a pair is not Unicode.
    path.write_text(json.dumps(HI) + "\n"
                    + '{"messages": [{"role": "user", "content": "smile \\ud83d please"}]}\n'
                    + '{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}]}\n')
    with pytest.raises(RecordError, match=r"surrogate.jsonl line 2: .*message 0: holds a lone UTF-16 surrogate U\+D83D"):
        list(read_conversations(path))
    convs, report = read_skipping(path)
    assert [c.messages[0]["content"] for c in convs] == ["Hi", "smile \U0001F600"]
    assert report.skipped_records == {"invalid_text": 1}
    assert report.skipped_locations == {"invalid_text": [f"{path} line 2"]}
    for bad in ({"id": "x\udc00", **HI}, {"language": "\ud800", **HI}):  # other text fields too
        assert read_skipping([bad])[1].skipped_records == {"invalid_text": 1}


def test_hand_built_conversations_are_checked():
    from hsd.data import Conversation

    with pytest.raises(RecordError, match=r"conversation 'c', message 0: expected"):
        Conversation(messages=[{"role": "user", "content": None}], id="c")
    with pytest.raises(RecordError, match=r"message 1: expected"):
        Conversation(messages=[{"role": "user", "content": "u"}, {"role": "gpt", "content": "a"}], id="c")
    with pytest.raises(RecordError, match=r"Conversation.id must be a string, got NoneType"):
        Conversation(messages=[], id=None)
    with pytest.raises(RecordError, match=r"lone UTF-16 surrogate"):
        Conversation(messages=[{"role": "user", "content": "\udfff"}], id="c")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_corrupt_parquet_file_is_named(tmp_path, damage):
    good = tmp_path / "good.parquet"
    datasets.Dataset.from_list([HI] * 3).to_parquet(str(good))
    data = good.read_bytes()
    bad = tmp_path / "bad.parquet"
    bad.write_bytes({"garbage": b"not a parquet file at all", "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(RecordError, match=rf"{bad}: not a readable parquet file \("):
        list(read_conversations(bad))
    # In a directory of shards, the corrupt one is counted and the others are read.
    convs, report = read_skipping(tmp_path)
    assert len(convs) == 3
    assert report.skipped_records == {"unreadable_file": 1} and report.skipped_locations["unreadable_file"] == [str(bad)]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_utf16_and_utf32_files_are_decoded(tmp_path, encoding, suffix):
    rows = [HI, {"messages": [{"role": "user", "content": "naïve café ✓ \U0001F600"}]}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows) if suffix == ".jsonl" else json.dumps(rows)
    path = tmp_path / f"wide{suffix}"
    path.write_bytes(text.encode(encoding))  # "utf-16"/"utf-32" write a byte order mark, "-le"/"-be" do not
    assert [c.messages for c in read_conversations(path)] == [c.messages for c in read_conversations(rows)]


def test_jsonl_saved_as_json_is_read_as_json_lines(tmp_path):
    path = tmp_path / "actually_lines.json"
    path.write_text(json.dumps(HI) + "\n" + "{broken\n" + json.dumps(HI) + "\n")
    with pytest.raises(RecordError, match=r"actually_lines.json line 2: invalid JSON"):
        list(read_conversations(path))
    convs, report = read_skipping(path)
    assert len(convs) == 2 and report.skipped_records == {"invalid_json": 1}
    # One object on one line is a JSON document, not JSON Lines: it must hold records.
    single = tmp_path / "single.json"
    single.write_text(json.dumps(HI))
    with pytest.raises(RecordError, match=r"single.json: a .json file must hold a list of records.*holds one dict"):
        list(read_conversations(single))
    assert read_skipping(single)[1].skipped_records == {"unreadable_file": 1}


def test_an_unparsable_json_file_is_skipped_whole_under_skip(tmp_path):
    (tmp_path / "a.json").write_text("[{")
    write_jsonl(tmp_path / "b.jsonl", [HI])
    convs, report = read_skipping(tmp_path)
    assert len(convs) == 1 and report.skipped_records == {"unreadable_file": 1}


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_an_empty_input_warns(tmp_path, caplog, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with caplog.at_level("WARNING", logger="hsd.data"):
        assert list(read_conversations(path)) == []
    assert "empty.jsonl: the input holds no records" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hsd.data"):
        assert list(read_conversations([HI], limit=0)) == []  # asked for nothing: no warning
    assert caplog.text == ""


def test_a_negative_limit_is_an_error_at_the_call():
    with pytest.raises(ValueError, match=r"limit must be an int >= 0 or None, got -1"):
        read_conversations([HI], limit=-1)
    with pytest.raises(ValueError, match="on_error"):
        read_conversations([HI], on_error="ignore")


def test_skipped_records_keep_their_locations_bounded(tmp_path):
    path = tmp_path / "many_bad.jsonl"
    path.write_text("{\n" * 30 + json.dumps(HI) + "\n")
    convs, report = read_skipping(path)
    assert len(convs) == 1 and report.skipped_records == {"invalid_json": 30}
    assert report.skipped_locations["invalid_json"] == [f"{path} line {i}" for i in range(1, 21)]
    assert f"{path} line 1, {path} line 2, {path} line 3, ..." in report.summary()
