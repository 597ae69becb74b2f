"""Text sources (a streamed hub dataset, local files, the embedded Austen corpus) and the token windows cut
from them.

Documents are tokenised, joined with the end-of-text token and cut into windows of ``context_size`` tokens
(each starting with BOS when asked), as SAELens and dictionary_learning do. Every ``held_out_every``-th
window is held out for evaluation, so training and evaluation never share text, for any source.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from dictlearn.errors import UserError
from dictlearn.params import DataParams

TEXT_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")


def resolve_files(paths: str | list[str]) -> list[Path]:
    """Expand files, folders and globs into a sorted list of supported files; raise if there are none."""
    found: list[Path] = []
    for entry in [paths] if isinstance(paths, str) else paths:
        p = Path(entry)
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES)
        elif p.is_file():
            if p.suffix not in TEXT_SUFFIXES:
                raise UserError(f"data.path: {p} is not a supported text file (use {', '.join(TEXT_SUFFIXES)})")
            found.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(entry), recursive=True))
            found += [m for m in matches if m.suffix in TEXT_SUFFIXES]
    if not found:
        raise UserError(f"data.path: no {'/'.join(TEXT_SUFFIXES)} files found at {paths!r}")
    return found


def _documents_in_file(path: Path, text_column: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{path}:{number}: not a JSON object per line") from None
                if not isinstance(record, dict):
                    raise UserError(f"{path}:{number}: expected a JSON object per line, found {type(record).__name__}")
                if text_column not in record:
                    raise UserError(f"{path}:{number}: no field {text_column!r} (set data.text_column)")
                yield str(record[text_column])
    else:
        import pandas as pd

        frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
        if text_column not in frame.columns:
            raise UserError(
                f"{path}: no column {text_column!r} (columns: {', '.join(map(str, frame.columns))}); "
                "set data.text_column"
            )
        yield from (str(t) for t in frame[text_column].dropna())


def _hub_documents(data: DataParams) -> Iterator[str]:
    import datasets

    try:
        stream = datasets.load_dataset(data.path, data.hub_config, split=data.split, streaming=True)
        for record in stream:
            if data.text_column not in record:
                raise UserError(
                    f"data.text_column: {data.text_column!r} is not a column of {data.path} "
                    f"(columns: {', '.join(record)})"
                )
            yield record[data.text_column]
    except (OSError, ValueError, ConnectionError) as err:
        raise UserError(
            f"data.path: could not stream hub dataset {data.path!r} ({str(err).splitlines()[0][:160]}); "
            "use source 'austen' or 'files' offline"
        ) from None


def check_source(data: DataParams) -> None:
    """Fail early, before any model loads, when local text is missing."""
    if data.source == "hub":
        if not isinstance(data.path, str):
            raise UserError("data.path: a hub source takes one dataset name, found a list")
        return
    try:
        resolve_files(data.path)
    except UserError:
        if data.source == "austen":
            raise UserError(f"data.path: the Austen corpus is not at {data.path!r}; run `make data` first") from None
        raise


def iter_documents(data: DataParams) -> Iterator[str]:
    """Yield documents (strings) from the configured source, streaming."""
    if data.source == "hub":
        yield from _hub_documents(data)
        return
    for path in resolve_files(data.path):
        yield from _documents_in_file(path, data.text_column)


PIECE_CHARS = 16384


def paragraph_pieces(document: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """Cut a long document after paragraph breaks into pieces of about ``size`` characters.

    Tokenising a novel in one call delays the first window by seconds. GPT-2-style pre-tokenisers (GPT-2,
    Pythia, SmolLM2) split "\n\n" before a word into two "\n" tokens, so cutting between the two newlines of a
    paragraph break gives the same tokens, piece by piece (tests check this on the embedded tokenizer).
    """
    start = 0
    while len(document) - start > size:
        cut = document.find("\n\n", start + size)
        if cut < 0:
            break
        yield document[start : cut + 1]
        start = cut + 1
    yield document[start:]


def iter_windows(documents: Iterator[str], tokenizer, data: DataParams) -> Iterator[list[int]]:
    """Concatenate tokenised documents (joined by EOS) and cut them into windows of ``context_size`` tokens."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    separator = tokenizer.eos_token_id
    body = data.context_size - (1 if data.prepend_bos else 0)
    if body < 1:
        raise UserError(f"data.context_size: must leave room for text after BOS, found {data.context_size}")
    pending: list[int] = []
    for document in documents:
        if pending and separator is not None:
            pending.append(separator)
        for piece in paragraph_pieces(document):
            pending.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
            start = 0
            while len(pending) - start >= body:
                chunk = pending[start : start + body]
                yield [bos, *chunk] if data.prepend_bos else chunk
                start += body
            pending = pending[start:]


def split_windows(windows: Iterator[list[int]], held_out_every: int, *, held_out: bool) -> Iterator[list[int]]:
    """Keep the training windows (``held_out=False``) or every ``held_out_every``-th one (``True``)."""
    for index, window in enumerate(windows):
        if (index % held_out_every == held_out_every - 1) == held_out:
            yield window


def first_windows(windows: Iterator[list[int]], data: DataParams, tokens: int) -> Iterator[list[int]]:
    """The leading windows that hold ``tokens`` text tokens, rounded up to a whole window."""
    per_window = data.context_size - int(data.prepend_bos)
    return islice(windows, -(-tokens // per_window))


def training_windows(data: DataParams, tokenizer) -> Iterator[list[int]]:
    return split_windows(iter_windows(iter_documents(data), tokenizer, data), data.held_out_every, held_out=False)


def held_out_windows(data: DataParams, tokenizer) -> Iterator[list[int]]:
    return split_windows(iter_windows(iter_documents(data), tokenizer, data), data.held_out_every, held_out=True)
