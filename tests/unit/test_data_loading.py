"""Loaders and row checks: local files and hub ids, every unreadable line and bad value named by its 1-based line
and column, and the `error` / `skip` policies."""

import json

import pytest

from qed_lightning.data.loading import DataError, Table, lone_surrogate, load_rows, load_table
from qed_lightning.data.validation import RowPolicy, chat_messages, find_rejects, nonempty_str, validate_rows


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_local_jsonl_json_and_parquet_load_the_same_rows(tmp_path):
    import datasets

    rows = [{"problem": "P1", "n": 1}, {"problem": "P2", "n": 2}]
    assert load_rows(str(_write_jsonl(tmp_path / "a.jsonl", rows))) == rows
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    assert load_rows(str(tmp_path / "a.json")) == rows
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    assert load_rows(str(tmp_path / "a.parquet")) == rows


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    rows = [{"problem": "P1"}, {"problem": "P2"}]
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # what Windows editors write
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode("utf-8"))
    assert load_rows(str(tmp_path / "bom.jsonl")) == rows and load_rows(str(tmp_path / "bom.json")) == rows
    assert load_table(str(tmp_path / "bom.jsonl")).positions == [1, 2]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "the file is empty"),
        (b'{"problem": "ok"}\n{"problem": \n', "line 2: not valid JSON"),
        (b'{"problem": "ok"}\n{"problem": "caf\xe9"}\n',
         r"line 2: not valid UTF-8 \(invalid continuation byte\) at character 17"),
        (b'{"problem": "ok"}\n[1, 2]\n', "line 2: expected a JSON object per line, got an array"),
    ],
)
def test_broken_files_name_the_file_and_line(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=expected) as err:
        load_rows(str(path))
    assert str(path) in str(err.value)


def test_lone_surrogates_are_found_with_line_and_character():
    # `{"a": "x\ud800y"}`: the escape starts at character 9; a high-low pair is one character, not an error
    assert lone_surrogate('{"a": "x\\ud800y"}') == (9, "\\ud800")
    assert lone_surrogate('{"a": "\\ud83d\\ude00"}') is None
    assert lone_surrogate('{"a": "\\\\ud800"}') is None  # an escaped backslash followed by text
    # after the 18 characters `{"a": "ok", "b": "`
    assert lone_surrogate('{"a": "ok", "b": "\\udc00"}') == (19, "\\udc00")


def test_every_unreadable_line_is_located_and_blank_lines_still_count(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"problem": "a"}\n\n[1]\n{"problem": "x\\ud800"}\n{"problem": "caf\xe9"}\n{"problem": "b"}\n')
    table = load_table(str(path))
    assert table.rows == [{"problem": "a"}, {"problem": "b"}] and table.positions == [1, 6]
    found = [(r.position, r.column, r.reason.split(" (")[0].split(" at ")[0]) for r in table.unreadable]
    assert found == [(3, None, "expected a JSON object per line, got an array"),
                     (4, "problem", "lone surrogate \\ud800"), (5, None, "not valid UTF-8")]
    assert "at character 15" in table.unreadable[1].reason  # after the 14 characters `{"problem": "x`
    with pytest.raises(DataError, match=r"3 line\(s\) cannot be read:\n  line 3: .*\n"
                                        r"  line 4, column 'problem': .*\n  line 5: "):
        load_rows(str(path))


def test_missing_file_and_offline_hub_id_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such file"):
        load_rows(str(tmp_path / "nope.jsonl"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="local .jsonl/.json/.parquet") as err:
        load_rows("lm-provers/FineProofs-SFT")
    assert "lm-provers/FineProofs-SFT" in str(err.value)


def _table(rows):
    return Table("f.jsonl", "line", rows, list(range(1, len(rows) + 1)))


def test_validate_rows_lists_every_bad_row_and_column_by_line():
    rows = [
        {"problem": "fine", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"problem": "", "messages": [{"role": "user", "content": "q"}]},
        {"problem": 3, "messages": "not a list"},
        {"messages": None, "extra": "ignored"},
    ]
    with pytest.raises(DataError) as err:
        validate_rows(_table(rows), {"problem": nonempty_str, "messages": chat_messages})
    msg = str(err.value)
    assert msg.startswith("f.jsonl: 3 of 4 rows are invalid (lines of the file):")
    assert "line 2, column 'problem': empty string" in msg
    assert "line 2, column 'messages': no non-empty assistant message" in msg
    assert "line 3, column 'problem': expected a string, got int" in msg
    assert "line 3, column 'messages': expected a non-empty list" in msg
    assert "line 4, column 'problem': missing column 'problem'" in msg
    assert "line 4, column 'messages': null value" in msg
    assert "line 1" not in msg and "extra" not in msg


def test_a_column_no_row_has_is_reported_with_the_columns_present_and_mapping_fixes_it():
    table = _table([{"Problem": "x"}])
    with pytest.raises(DataError, match=r"missing column\(s\) \['problem'\]; the file has \['Problem'\]"):
        validate_rows(table, {"problem": nonempty_str})
    validate_rows(table, {"problem": nonempty_str}, columns={"problem": "Problem"})


def test_skip_writes_every_reject_and_error_lists_them(tmp_path):
    table = _table([{"problem": "a"}, {"problem": ""}, {"problem": "c"}, {}, {"problem": "e"}])
    rejects = find_rejects(table, {"problem": nonempty_str})
    with pytest.raises(DataError,
                       match=r"2 of 5 rows are invalid[\s\S]*data.on_invalid_row=skip to train on the other 3"):
        RowPolicy("error").apply("f.jsonl", rejects, table.total, tmp_path)
    assert RowPolicy("skip", 0.4).apply("f.jsonl", rejects, table.total, tmp_path) == {2, 4}
    written = [json.loads(line) for line in (tmp_path / "data_rejects.jsonl").read_text().splitlines()]
    assert written == [
        {"file": "f.jsonl", "line": 2, "column": "problem", "reason": "empty string", "row": {"problem": ""}},
        {"file": "f.jsonl", "line": 4, "column": "problem", "reason": "missing column 'problem'", "row": {}}]
    with pytest.raises(DataError, match=r"40.0% of the rows are invalid, more than data.max_invalid_fraction=0.3"):
        RowPolicy("skip", 0.3).apply("f.jsonl", rejects, table.total, tmp_path)
