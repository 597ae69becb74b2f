"""Text sources and token windows."""

from __future__ import annotations

import json

import pytest

from dictlearn.errors import UserError
from dictlearn.lm.text import check_source, iter_documents, iter_windows, split_windows
from dictlearn.params import DataParams


def test_windows_start_with_bos_and_join_documents_with_eos(toy_tokenizer):
    data = DataParams(source="files", path="unused", context_size=4)
    windows = list(iter_windows(iter(["a b c d", "e f"]), toy_tokenizer, data))
    # BOS + 3 tokens per window; documents joined by EOS (1); the short tail is dropped.
    assert windows == [[0, 3, 4, 5], [0, 6, 1, 7]]


def test_held_out_windows_are_disjoint_from_training():
    windows = [[i] for i in range(10)]
    train = list(split_windows(iter(windows), 3, held_out=False))
    held = list(split_windows(iter(windows), 3, held_out=True))
    assert held == [[2], [5], [8]]
    assert sorted(train + held) == windows


def test_local_files_of_each_kind(tmp_path):
    (tmp_path / "a.txt").write_text("one two")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "three"}) + "\n\n" + json.dumps({"body": "four"}) + "\n")
    (tmp_path / "c.csv").write_text("body,other\nfive,x\n,y\nsix,z\n")
    data = DataParams(source="files", path=str(tmp_path), text_column="body")
    docs = list(iter_documents(data))
    assert docs[0] == "one two" and docs[1:3] == ["three", "four"] and docs[3:] == ["five", "six"]


def test_missing_column_and_missing_files_are_clear(tmp_path):
    (tmp_path / "c.csv").write_text("sentence\nhello\n")
    with pytest.raises(UserError, match=r"no column 'text' \(columns: sentence\); set data.text_column"):
        list(iter_documents(DataParams(source="files", path=str(tmp_path / "c.csv"))))
    with pytest.raises(UserError, match="no .txt/.jsonl/.csv/.parquet files found"):
        check_source(DataParams(source="files", path=str(tmp_path / "none")))
    with pytest.raises(UserError, match="run `make data` first"):
        check_source(DataParams(source="austen", path=str(tmp_path / "none")))


def test_long_documents_are_tokenised_in_pieces_with_the_same_tokens():
    from transformers import AutoTokenizer

    from dictlearn.lm.models import CACHE_DIR
    from dictlearn.lm.text import paragraph_pieces

    paragraphs = [f"Paragraph {i}: she said, 'It is {i} o\u2019clock.'\n  And then-- nothing." for i in range(400)]
    document = "\n\n".join(paragraphs)
    pieces = list(paragraph_pieces(document, size=1000))
    assert len(pieces) > 10 and "".join(pieces) == document
    assert all(p.endswith("\n") and nxt.startswith("\n") for p, nxt in zip(pieces, pieces[1:]))
    folder = CACHE_DIR / "smollm2-135m"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("the embedded tokenizer is cached by the first use of the embedded model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    whole = tokenizer(document, add_special_tokens=False)["input_ids"]
    pieced = [t for p in pieces for t in tokenizer(p, add_special_tokens=False)["input_ids"]]
    assert pieced == whole


def test_a_jsonl_line_that_is_not_an_object_is_one_line(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps(["two"]) + "\n")
    with pytest.raises(UserError, match=r"b.jsonl:2: expected a JSON object per line, found list$"):
        list(iter_documents(DataParams(source="files", path=str(tmp_path / "b.jsonl"))))
