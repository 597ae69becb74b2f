"""Read R's XDR serialisation ("X\\n", versions 2 and 3) and R lazy-load databases (``.rdb``/``.rdx``).

Enough of the format for data packages such as janeaustenr: vectors, lists, pairlists, symbols, attributes.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

# SEXP type codes from R's Rinternals.h, and the pseudo-types that only occur in serialisations
# (serialize.c). Names are kept so that an unsupported type can be reported by name.
SEXP_NAMES = {
    0: "NILSXP",
    1: "SYMSXP",
    2: "LISTSXP",
    3: "CLOSXP",
    4: "ENVSXP",
    5: "PROMSXP",
    6: "LANGSXP",
    7: "SPECIALSXP",
    8: "BUILTINSXP",
    9: "CHARSXP",
    10: "LGLSXP",
    13: "INTSXP",
    14: "REALSXP",
    15: "CPLXSXP",
    16: "STRSXP",
    17: "DOTSXP",
    18: "ANYSXP",
    19: "VECSXP",
    20: "EXPRSXP",
    21: "BCODESXP",
    22: "EXTPTRSXP",
    23: "WEAKREFSXP",
    24: "RAWSXP",
    25: "OBJSXP",
    238: "ATTRLISTSXP_OLD",
    239: "ALTREP_SXP",
    240: "ATTRLISTSXP",
    241: "ATTRLANGSXP",
    242: "BASEENV_SXP",
    243: "EMPTYENV_SXP",
    244: "BCREPREF",
    245: "BCREPDEF",
    246: "GENERICREFSXP",
    247: "CLASSREFSXP",
    248: "PERSISTSXP",
    249: "PACKAGESXP",
    250: "NAMESPACESXP",
    251: "BASENAMESPACE_SXP",
    252: "MISSINGARG_SXP",
    253: "UNBOUNDVALUE_SXP",
    254: "GLOBALENV_SXP",
    255: "REFSXP",
}
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19
NILVALUE_SXP, REFSXP = 254, 255
# Encoding bits of a CHARSXP's gp field (Defn.h): which codec its bytes are in.
BYTES_MASK, LATIN1_MASK, UTF8_MASK, ASCII_MASK = 1 << 1, 1 << 2, 1 << 3, 1 << 6
NA_INTEGER = -(2**31)

VECTOR_KINDS = {LGLSXP: "logical", INTSXP: "integer", REALSXP: "double", STRSXP: "character", VECSXP: "list"}


@dataclass(frozen=True)
class RSymbol:
    """An R symbol (a name), as found in pairlist tags and attribute names."""

    name: str


@dataclass
class RVector:
    """An R vector or pairlist: ``kind`` is R's ``typeof`` ("character", "integer", "logical", "double",
    "list" or "pairlist"); NA is ``None`` except in doubles (a NaN); ``attributes`` keeps R's names,
    class, row.names and the rest."""

    kind: str
    values: list
    attributes: dict[str, object] = field(default_factory=dict)

    @property
    def names(self) -> list[str | None] | None:
        """The ``names`` attribute, or None when the vector has none."""
        names = self.attributes.get("names")
        return names.values if isinstance(names, RVector) else None

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, key: int | str) -> object:
        """Index by position, or by name as R's ``x[["name"]]`` does."""
        if isinstance(key, str):
            names = self.names or []
            if key not in names:
                raise KeyError(key)
            return self.values[names.index(key)]
        return self.values[key]


class _Reader:
    """One pass over one serialisation: a cursor into the bytes plus R's reference table."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        # Symbols (and environments, which this reader refuses) are written once; later uses are REFSXP
        # indices into the order of first appearance (serialize.c, AddReadRef).
        self.refs: list[object] = []
        self.native_encoding = "utf-8"

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"R serialisation truncated at byte {self.pos} (wanted {n} more)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        # Long vectors (2^31 elements or more) write -1 and then the length as two 32-bit halves.
        if n == -1:
            upper, lower = struct.unpack(">II", self.take(8))
            return (upper << 32) | lower
        return n

    def header(self) -> None:
        fmt = self.take(2)
        if fmt != b"X\n":
            raise ValueError(f"not an R XDR serialisation: format bytes {fmt!r} (only 'X\\n' is supported)")
        version, _writer_version, _min_reader_version = struct.unpack(">iii", self.take(12))
        if version == 3:
            self.native_encoding = self.take(self.int()).decode("ascii")
        elif version != 2:
            raise ValueError(f"unsupported R serialisation version {version} (expected 2 or 3)")

    def item(self) -> object:
        flags = self.int()
        sexp_type = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        # R writes NULL as NILVALUE_SXP; a bare NILSXP is accepted too, as R's reader does.
        if sexp_type in (NILVALUE_SXP, NILSXP):
            return None
        if sexp_type == REFSXP:
            # The index is packed into the flags unless it did not fit, then it follows (1-based).
            index = flags >> 8 or self.int()
            if not 1 <= index <= len(self.refs):
                raise ValueError(f"R serialisation refers to unknown reference {index}")
            return self.refs[index - 1]
        if sexp_type == SYMSXP:
            symbol = RSymbol(self.item())
            self.refs.append(symbol)
            return symbol
        if sexp_type == LISTSXP:
            return self.pairlist(has_attr, has_tag)
        if sexp_type == CHARSXP:
            return self.charsxp(levels)
        if sexp_type in VECTOR_KINDS:
            values = self.vector_values(sexp_type, self.length())
            attributes = self.attributes() if has_attr else {}
            return RVector(VECTOR_KINDS[sexp_type], values, attributes)
        name = SEXP_NAMES.get(sexp_type, "unknown")
        raise ValueError(f"unsupported R SEXP type {sexp_type} ({name}) at byte {self.pos - 4}")

    def pairlist(self, has_attr: bool, has_tag: bool) -> RVector:
        """A LISTSXP chain, read iteratively: each cell's CDR is the next cell's flags, so long pairlists
        would otherwise recurse once per element."""
        values, tags = [], []
        attributes: dict[str, object] = {}
        while True:
            if has_attr:
                attributes = self.attributes()
            tag = self.item() if has_tag else None
            tags.append(tag.name if isinstance(tag, RSymbol) else None)
            values.append(self.item())
            flags = self.int()
            if flags & 0xFF == NILVALUE_SXP:
                break
            if flags & 0xFF != LISTSXP:
                raise ValueError(f"pairlist tail of type {flags & 0xFF} is not supported")
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if any(tag is not None for tag in tags):
            attributes = {"names": RVector("character", tags), **attributes}
        return RVector("pairlist", values, attributes)

    def attributes(self) -> dict[str, object]:
        """Attributes are written as a tagged pairlist; return them as a name -> value dict."""
        attrs = self.item()
        if not isinstance(attrs, RVector) or attrs.kind != "pairlist" or attrs.names is None:
            raise ValueError("R attributes are not a tagged pairlist")
        return dict(zip(attrs.names, attrs.values))

    def charsxp(self, levels: int) -> str | bytes | None:
        n = self.int()
        if n == -1:
            return None  # NA_STRING
        raw = self.take(n)
        if levels & BYTES_MASK:
            return raw
        if levels & UTF8_MASK:
            return raw.decode("utf-8")
        if levels & LATIN1_MASK:
            return raw.decode("latin-1")
        if levels & ASCII_MASK:
            return raw.decode("ascii")
        return raw.decode(self.native_encoding)

    def vector_values(self, sexp_type: int, n: int) -> list:
        if sexp_type in (LGLSXP, INTSXP):
            ints = struct.unpack(f">{n}i", self.take(4 * n))
            if sexp_type == LGLSXP:
                return [None if v == NA_INTEGER else bool(v) for v in ints]
            return [None if v == NA_INTEGER else v for v in ints]
        if sexp_type == REALSXP:
            return list(struct.unpack(f">{n}d", self.take(8 * n)))
        # STRSXP elements are CHARSXP items; VECSXP elements are any item.
        return [self.item() for _ in range(n)]


def unserialize(data: bytes) -> object:
    """Decode one R XDR serialisation (what ``serialize(x, NULL)`` returns) into RVector/RSymbol/None."""
    reader = _Reader(data)
    reader.header()
    value = reader.item()
    if reader.pos != len(data):
        raise ValueError(f"R serialisation has {len(data) - reader.pos} trailing bytes")
    return value


def decompress_blob(blob: bytes, compressed: int) -> bytes:
    """Undo R_compress1/2/3 (serialize.c): 4 bytes big-endian length, then for schemes 2 and 3 a type byte
    ('Z' zlib, '2' bzip2, 'X' xz, '0' stored), then the compressed stream."""
    if len(blob) < 4:
        raise ValueError("lazy-load blob shorter than its 4-byte length header")
    (expected,) = struct.unpack(">I", blob[:4])
    try:
        out = _decompress_body(blob[4:], compressed)
    except (zlib.error, OSError, lzma.LZMAError) as err:
        # zlib, bz2 and lzma each raise their own type for corrupt input; callers expect ValueError.
        raise ValueError(f"lazy-load blob does not decompress: {err}") from err
    if len(out) != expected:
        raise ValueError(f"lazy-load blob decompressed to {len(out)} bytes, header says {expected}")
    return out


def _decompress_body(body: bytes, compressed: int) -> bytes:
    if compressed in (0, 1):
        return zlib.decompress(body)
    if compressed not in (2, 3):
        raise ValueError(f"unknown lazy-load compression scheme {compressed}")
    kind, body = body[:1], body[1:]
    if kind == b"Z":
        return zlib.decompress(body)
    if kind == b"2":
        return bz2.decompress(body)
    if kind == b"X":
        return lzma.decompress(body)
    if kind == b"0":
        return body
    raise ValueError(f"unknown lazy-load compression type byte {kind!r}")


def read_rds_bytes(data: bytes) -> object:
    """Decode a saveRDS-style file's bytes: gzip, bzip2, xz or plain around one serialisation."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    elif data[:3] == b"BZh":
        data = bz2.decompress(data)
    elif data[:6] == b"\xfd7zXZ\x00":
        data = lzma.decompress(data)
    return unserialize(data)


def read_lazyload_db(rdb_path: str | Path) -> dict[str, object]:
    """Read every variable of an R lazy-load database: ``rdb_path`` names the ``.rdb``; its ``.rdx`` index
    sits beside it. Returns name -> decoded value (RVector, RSymbol or None)."""
    rdb_path = Path(rdb_path)
    index = read_rds_bytes(rdb_path.with_suffix(".rdx").read_bytes())
    if not isinstance(index, RVector) or index.names is None or "variables" not in index.names:
        raise ValueError(f"{rdb_path.with_suffix('.rdx')} is not a lazy-load index (no 'variables')")
    if len(index["references"]) > 0:
        raise ValueError("lazy-load database holds environments (references), which are not supported")
    # `compressed` is TRUE/FALSE (zlib) or the scheme number 2 (bzip2) or 3 (xz), stored as logical or double.
    compressed_flag = index["compressed"].values[0]
    if compressed_flag is None or (isinstance(compressed_flag, float) and math.isnan(compressed_flag)):
        raise ValueError("lazy-load index has NA for 'compressed'")
    compressed = int(compressed_flag)
    rdb = rdb_path.read_bytes()
    variables = index["variables"]
    out = {}
    for name, where in zip(variables.names, variables.values):
        offset, length = (int(v) for v in where.values)
        out[name] = unserialize(decompress_blob(rdb[offset : offset + length], compressed))
    return out


def text_lines(value: object) -> list[str]:
    """The lines of a text held either as a character vector or as a data frame with a ``text`` column;
    NA lines become empty strings."""
    if isinstance(value, RVector) and value.kind == "list" and "text" in (value.names or []):
        value = value["text"]
    if not isinstance(value, RVector) or value.kind != "character":
        raise ValueError("expected a character vector or a data frame with a 'text' column")
    # Lines flagged as raw bytes are not expected in text; decode them rather than print b'...'.
    return [
        "" if line is None else line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
        for line in value.values
    ]
