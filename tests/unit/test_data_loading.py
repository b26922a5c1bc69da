"""Loaders: local files and hub ids, and errors that name the file, row and column."""

import json

import pytest

from qed_lightning.data.loading import DataError, chat_messages, load_rows, nonempty_str, validate_rows


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_local_jsonl_and_parquet_load_the_same_rows(tmp_path):
    import datasets

    rows = [{"problem": "P1", "n": 1}, {"problem": "P2", "n": 2}]
    assert load_rows(str(_write_jsonl(tmp_path / "a.jsonl", rows))) == rows
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    assert load_rows(str(tmp_path / "a.parquet")) == rows


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "the file is empty"),
        (b'{"problem": "ok"}\n{"problem": \n', "line 2: not valid JSON"),
        (b'{"problem": "ok"}\n{"problem": "caf\xe9"}\n', "line 2: not valid UTF-8"),
        (b'{"problem": "ok"}\n[1, 2]\n', "line 2: expected a JSON object"),
    ],
)
def test_broken_files_name_the_file_and_line(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=expected) as err:
        load_rows(str(path))
    assert str(path) in str(err.value)


def test_missing_file_and_offline_hub_id_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such file"):
        load_rows(str(tmp_path / "nope.jsonl"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="local .jsonl/.json/.parquet") as err:
        load_rows("lm-provers/FineProofs-SFT")
    assert "lm-provers/FineProofs-SFT" in str(err.value)


def test_validate_rows_lists_every_bad_row_and_column():
    rows = [
        {"problem": "fine", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"problem": "", "messages": [{"role": "user", "content": "q"}]},
        {"problem": 3, "messages": "not a list"},
    ]
    with pytest.raises(DataError) as err:
        validate_rows(rows, {"problem": nonempty_str, "messages": chat_messages}, where="f.jsonl")
    msg = str(err.value)
    assert "f.jsonl: 4 malformed value(s)" in msg
    assert "row 1, column 'problem': empty string" in msg
    assert "row 1, column 'messages': no non-empty assistant message" in msg
    assert "row 2, column 'problem': expected a string, got int" in msg
    assert "row 2, column 'messages': expected a non-empty list" in msg
    assert "row 0" not in msg


def test_missing_column_is_reported_with_the_columns_present_and_mapping_fixes_it():
    rows = [{"Problem": "x"}]
    with pytest.raises(DataError, match=r"missing column\(s\) \['problem'\]; the file has \['Problem'\]"):
        validate_rows(rows, {"problem": nonempty_str}, where="bench.jsonl")
    validate_rows(rows, {"problem": nonempty_str}, where="bench.jsonl", columns={"problem": "Problem"})
