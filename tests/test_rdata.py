"""Tests of the R serialisation reader on hand-built bytes, and of the fetched Austen corpus."""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import struct
import zlib
from pathlib import Path

import pytest

from tools.rdata import (
    RSymbol,
    RVector,
    decompress_blob,
    read_lazyload_db,
    text_lines,
    unserialize,
)

AUSTEN_DIR = Path(__file__).resolve().parent.parent / "data" / "austen"

# Bytes written by hand after R's serialize.c:
# flags = type | is_object<<8 | has_attr<<9 | has_tag<<10 | gp<<12.
HEADER_V3 = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
HEADER_V2 = b"X\n" + struct.pack(">iii", 2, 0x040201, 0x020300)
NULL = struct.pack(">i", 254)
UTF8, LATIN1, ASCII = 1 << 3, 1 << 2, 1 << 6


def flags(sexp_type: int, attr: bool = False, tag: bool = False, gp: int = 0) -> bytes:
    return struct.pack(">i", sexp_type | attr << 9 | tag << 10 | gp << 12)


def charsxp(text: str | None, encoding: str = "utf-8", gp: int = UTF8) -> bytes:
    if text is None:
        return flags(9) + struct.pack(">i", -1)
    raw = text.encode(encoding)
    return flags(9, gp=gp) + struct.pack(">i", len(raw)) + raw


def strsxp(*items: bytes, attr: bool = False) -> bytes:
    return flags(16, attr=attr) + struct.pack(">i", len(items)) + b"".join(items)


def intsxp(*values: int, attr: bool = False) -> bytes:
    return flags(13, attr=attr) + struct.pack(f">i{len(values)}i", len(values), *values)


def symbol(name: str) -> bytes:
    return flags(1) + charsxp(name, gp=ASCII)


def ref(index: int) -> bytes:
    return struct.pack(">i", index << 8 | 255)


def tagged_cell(tag: bytes, value: bytes) -> bytes:
    """One LISTSXP cell with a tag; the caller appends the next cell or NULL."""
    return flags(2, tag=True) + tag + value


def test_character_vector_with_na_and_encodings():
    data = HEADER_V3 + strsxp(
        charsxp("plain", gp=ASCII),
        charsxp(None),
        charsxp("café", "latin-1", gp=LATIN1),
        charsxp("naïve ☃"),
        charsxp("native", gp=0),
    )
    value = unserialize(data)
    assert isinstance(value, RVector)
    assert value.kind == "character"
    assert value.values == ["plain", None, "café", "naïve ☃", "native"]
    assert value.attributes == {}


def test_integer_logical_and_double_vectors():
    na = -(2**31)
    assert unserialize(HEADER_V2 + intsxp(1, -2, na, 2**31 - 1)).values == [1, -2, None, 2**31 - 1]
    logical = unserialize(HEADER_V2 + flags(10) + struct.pack(">i3i", 3, 1, 0, na))
    assert (logical.kind, logical.values) == ("logical", [True, False, None])
    double = unserialize(HEADER_V2 + flags(14) + struct.pack(">i3d", 3, 1.5, -0.25, math.inf))
    assert (double.kind, double.values) == ("double", [1.5, -0.25, math.inf])


def test_named_list_with_attributes_and_back_reference():
    # list(a = c(x = 7L) with comment "c", b = "s") with class "foo": the symbols `names` and `comment` are
    # read first (inside `a`), so the list's own `names` is a REFSXP back-reference to symbol 1.
    inner = (
        intsxp(7, attr=True)
        + tagged_cell(symbol("names"), strsxp(charsxp("x")))
        + tagged_cell(symbol("comment"), strsxp(charsxp("c")))
        + NULL
    )
    outer_attrs = (
        tagged_cell(ref(1), strsxp(charsxp("a"), charsxp("b")))
        + tagged_cell(symbol("class"), strsxp(charsxp("foo")))
        + NULL
    )
    data = HEADER_V3 + flags(19, attr=True) + struct.pack(">i", 2) + inner + strsxp(charsxp("s")) + outer_attrs
    value = unserialize(data)
    assert value.kind == "list"
    assert value.names == ["a", "b"]
    assert value.attributes["class"].values == ["foo"]
    assert value["a"].values == [7]
    assert value["a"].names == ["x"]
    assert value["a"].attributes["comment"].values == ["c"]
    assert value["b"].values == ["s"]
    with pytest.raises(KeyError):
        value["c"]


def test_pairlist_tags_become_names_and_symbols_decode():
    data = HEADER_V2 + tagged_cell(symbol("k"), symbol("v")) + flags(2) + NULL + NULL
    value = unserialize(data)
    assert value.kind == "pairlist"
    assert value.values == [RSymbol("v"), None]
    assert value.names == ["k", None]


def test_null():
    assert unserialize(HEADER_V2 + NULL) is None


@pytest.mark.parametrize(
    "data, message",
    [
        (HEADER_V2 + flags(3), r"unsupported R SEXP type 3 \(CLOSXP\)"),
        (HEADER_V2 + flags(4), r"ENVSXP"),
        (b"A\n" + HEADER_V2[2:] + NULL, r"format bytes b'A\\n'"),
        (b"X\n" + struct.pack(">iii", 1, 0, 0) + NULL, r"version 1"),
        (HEADER_V2 + intsxp(1, 2)[:-2], r"truncated"),
        (HEADER_V2 + NULL + b"\0", r"1 trailing bytes"),
        (HEADER_V2 + ref(3), r"unknown reference 3"),
    ],
)
def test_bad_serialisations_raise_clear_errors(data, message):
    with pytest.raises(ValueError, match=message):
        unserialize(data)


def test_decompress_blob_schemes():
    payload = HEADER_V2 + intsxp(1, 2, 3)
    length = struct.pack(">I", len(payload))
    assert decompress_blob(length + zlib.compress(payload), 1) == payload
    assert decompress_blob(length + b"Z" + zlib.compress(payload), 2) == payload
    assert decompress_blob(length + b"2" + bz2.compress(payload), 2) == payload
    assert decompress_blob(length + b"X" + lzma.compress(payload), 3) == payload
    assert decompress_blob(length + b"0" + payload, 3) == payload
    with pytest.raises(ValueError, match="compression type byte b'Q'"):
        decompress_blob(length + b"Q" + payload, 3)
    with pytest.raises(ValueError, match="scheme 7"):
        decompress_blob(length + zlib.compress(payload), 7)
    with pytest.raises(ValueError, match="does not decompress"):
        decompress_blob(length + b"2" + zlib.compress(payload), 2)
    with pytest.raises(ValueError, match="header says 999"):
        decompress_blob(struct.pack(">I", 999) + zlib.compress(payload), 1)


def test_read_lazyload_db_round_trip(tmp_path):
    blobs = []
    for payload in (HEADER_V3 + strsxp(charsxp("line one"), charsxp(""), charsxp(None)), HEADER_V3 + NULL):
        blobs.append(struct.pack(">I", len(payload)) + zlib.compress(payload))
    (tmp_path / "Rdata.rdb").write_bytes(b"".join(blobs))
    names_sym = symbol("names")
    variables = (
        flags(19, attr=True)
        + struct.pack(">i", 2)
        + intsxp(0, len(blobs[0]))
        + intsxp(len(blobs[0]), len(blobs[1]))
        + tagged_cell(names_sym, strsxp(charsxp("book"), charsxp("nothing")))
        + NULL
    )
    references = flags(19, attr=True) + struct.pack(">i", 0) + tagged_cell(ref(1), strsxp()) + NULL
    compressed = flags(10) + struct.pack(">ii", 1, 1)
    index = (
        HEADER_V3
        + flags(19, attr=True)
        + struct.pack(">i", 3)
        + variables
        + references
        + compressed
        + tagged_cell(ref(1), strsxp(charsxp("variables"), charsxp("references"), charsxp("compressed")))
        + NULL
    )
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    db = read_lazyload_db(tmp_path / "Rdata.rdb")
    assert sorted(db) == ["book", "nothing"]
    assert db["nothing"] is None
    assert text_lines(db["book"]) == ["line one", "", ""]


def test_text_lines_reads_a_data_frame_text_column():
    frame = RVector(
        "list",
        [RVector("character", ["a", None]), RVector("integer", [1, 2])],
        {"names": RVector("character", ["text", "book"]), "class": RVector("character", ["data.frame"])},
    )
    assert text_lines(frame) == ["a", ""]
    with pytest.raises(ValueError, match="character vector or a data frame"):
        text_lines(RVector("integer", [1]))


@pytest.mark.slow
def test_fetched_austen_corpus():
    if not AUSTEN_DIR.is_dir():
        pytest.skip(f"{AUSTEN_DIR} is absent: run `.venv/bin/python tools/fetch_austen.py` first")
    texts = {path.stem: path.read_text(encoding="utf-8") for path in sorted(AUSTEN_DIR.glob("*.txt"))}
    expected = {
        "emma",
        "mansfieldpark",
        "northangerabbey",
        "persuasion",
        "prideprejudice",
        "sensesensibility",
    }
    assert set(texts) == expected
    total = sum(len(text) for text in texts.values())
    assert 3_800_000 < total < 4_300_000
    # The opening sentence must come out as one paragraph, not as two wrapped lines.
    opening = (
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife.\n"
    )
    assert opening in texts["prideprejudice"]
    assert "Emma Woodhouse, handsome, clever, and rich" in texts["emma"]
    for name, text in texts.items():
        paragraphs = text.split("\n\n")
        assert len(paragraphs) > 1000, name
        assert "\n" not in text.rstrip("\n").replace("\n\n", ""), f"{name} has a line break inside a paragraph"
