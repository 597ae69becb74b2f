"""Sentence codes: sentences read from a CSV, run through the model to the hook in padded batches, averaged over
each sentence's text tokens (or kept token by token), and encoded with a dictionary.

Shape letters: B sentences in a batch, T tokens (padded), D activation width, R rows (sentences, or tokens in
per-token mode), K latents selected per row.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from dictlearn.activations.harvest import batched, special_token_ids
from dictlearn.errors import UserError
from dictlearn.lm.models import HookPoint, LanguageModel, capture_activations
from dictlearn.report.token_display import token_strings
from dictlearn.sae.base import SparseAutoencoder

# Rows listed by number in the note about skipped cells; the count covers the rest.
_LISTED_ROWS = 10


class SentenceTable(NamedTuple):
    sentences: list[str]
    groups: list[str] | None  # each sentence's group, when the CSV has the group column
    skipped_rows: list[int]  # spreadsheet row numbers (the header is row 1) of empty or non-text cells


def _is_text(cell: str) -> bool:
    """A cell with at least one letter; empty cells and bare numbers or punctuation are not sentences."""
    return any(ch.isalpha() for ch in cell)


def read_sentences(path: str | Path, column: str, group_column: str) -> SentenceTable:
    """Read the ``column`` of a UTF-8 CSV; every problem that stops the run is a ``UserError`` naming the fix."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise UserError(f"sentences CSV {path} not found; pass --csv PATH or set sentences.csv")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(
            f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); save the file as UTF-8"
        ) from None
    if not text.strip():
        raise UserError(f"{path} is empty; expected a header row with a {column!r} column, then one sentence a row")
    try:
        # Every cell as a string, and no cell turned into NaN: 'NA' or 'null' may be words in a sentence.
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.ParserError as err:
        raise UserError(f"{path}: not a valid CSV ({str(err).strip().splitlines()[0]})") from None
    if column not in frame.columns:
        raise UserError(
            f"{path}: no column {column!r} (columns: {', '.join(map(str, frame.columns))}); "
            "pass --column NAME or set sentences.column"
        )
    if frame.empty:
        raise UserError(f"{path} has a header but no rows; add one sentence a row under {column!r}")
    cells = [cell.strip() for cell in frame[column]]
    keep = [_is_text(cell) for cell in cells]
    if not any(keep):
        raise UserError(f"{path}: all {len(cells)} cells of column {column!r} are empty or non-text")
    groups = list(frame[group_column]) if group_column in frame.columns else None
    return SentenceTable(
        sentences=[cell for cell, kept in zip(cells, keep) if kept],
        groups=[g.strip() for g, kept in zip(groups, keep) if kept] if groups is not None else None,
        skipped_rows=[index + 2 for index, kept in enumerate(keep) if not kept],
    )


def skipped_note(table: SentenceTable, column: str) -> str | None:
    """The one-line note about skipped cells (not fatal), or None when none were skipped."""
    rows = table.skipped_rows
    if not rows:
        return None
    listed = ", ".join(map(str, rows[:_LISTED_ROWS])) + (", ..." if len(rows) > _LISTED_ROWS else "")
    return f"skipped {len(rows)} empty or non-text cell(s) in column {column!r} (CSV rows {listed})"


def truncated_note(truncated: int, context_size: int) -> str | None:
    if not truncated:
        return None
    return f"{truncated} sentence(s) longer than data.context_size={context_size} tokens were truncated to it"


def tokenize_sentences(
    tokenizer, sentences: list[str], max_tokens: int, prepend_bos: bool
) -> tuple[list[list[int]], int]:
    """Token ids per sentence, BOS first when asked (as in training windows), cut to ``max_tokens``; also how
    many sentences were cut."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    body = max_tokens - int(prepend_bos)
    if body < 1:
        raise UserError(f"data.context_size: must leave room for text after BOS, found {max_tokens}")
    ids = tokenizer(sentences, add_special_tokens=False)["input_ids"]
    truncated = sum(len(sentence) > body for sentence in ids)
    return [([bos] if prepend_bos else []) + sentence[:body] for sentence in ids], truncated


def pad_right(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids padded on the right, and the (B, T) attention mask.

    Right padding keeps every real token at the position it has alone, and causal attention never lets a real
    token see the padding after it, so a sentence's activations do not depend on its batch."""
    length = max(len(ids) for ids in token_lists)
    input_ids_BT = torch.full((len(token_lists), length), pad_id, dtype=torch.long)
    mask_BT = torch.zeros(len(token_lists), length, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        input_ids_BT[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask_BT[row, : len(ids)] = 1
    return input_ids_BT, mask_BT


def mean_over_tokens(acts_BTD: torch.Tensor, text_BT: torch.Tensor) -> torch.Tensor:
    """(B, D) average of each row's activations over its text positions (padding and BOS excluded)."""
    weights_BT1 = text_BT.to(acts_BTD.dtype).unsqueeze(-1)
    return (acts_BTD * weights_BT1).sum(1) / weights_BT1.sum(1).clamp_min(1)


class SentenceCodes(NamedTuple):
    sentence_R: torch.Tensor  # (R,) index of each row's sentence
    position_R: torch.Tensor  # (R,) token position in the sentence (BOS is 0); -1 for a whole sentence
    token_R: list[str]  # the row's token text; '' for a whole sentence
    tokens_R: torch.Tensor  # (R,) text tokens the row averages (1 in per-token mode)
    x_RD: torch.Tensor  # (R, D) activations at the hook, float32 on the CPU
    top_acts_RK: torch.Tensor  # (R, K) the dictionary's selected activations
    top_indices_RK: torch.Tensor  # (R, K) and their latents


def _hook_batches(
    lm: LanguageModel, hook: HookPoint, token_lists: list[list[int]], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch: (B, T) ids, (B, T) text mask (real tokens that are not BOS/EOS/padding), (B, T, D) activations."""
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    excluded = special_token_ids(lm.tokenizer)
    for batch in batched(token_lists, batch_size):
        input_ids_BT, mask_BT = pad_right(batch, pad_id)
        with torch.inference_mode():
            acts_BTD = capture_activations(lm.model, hook, input_ids_BT.to(lm.device), mask_BT.to(lm.device))
        text_BT = mask_BT.bool() & ~torch.isin(input_ids_BT, excluded)
        yield input_ids_BT, text_BT, acts_BTD.float().cpu()


def encode_sentences(
    lm: LanguageModel,
    hook: HookPoint,
    sae: SparseAutoencoder,
    token_lists: list[list[int]],
    batch_size: int,
    per_token: bool,
) -> SentenceCodes:
    """Activations at the hook for every sentence (averaged, or one row per text token) and their sparse codes."""
    parts = []
    first = 0
    for input_ids_BT, text_BT, acts_BTD in _hook_batches(lm, hook, token_lists, batch_size):
        if per_token:
            b_R, t_R = text_BT.nonzero(as_tuple=True)
            parts.append((b_R + first, t_R, input_ids_BT[b_R, t_R], torch.ones_like(b_R), acts_BTD[b_R, t_R]))
        else:
            b_R = torch.arange(len(text_BT))
            no_token_R = torch.full_like(b_R, -1)
            parts.append((b_R + first, no_token_R, no_token_R, text_BT.sum(1), mean_over_tokens(acts_BTD, text_BT)))
        first += len(text_BT)
    sentence_R, position_R, token_id_R, tokens_R, x_RD = (torch.cat(column) for column in zip(*parts))
    with torch.inference_mode():
        codes = sae.encode(x_RD.to(sae.W_enc.device, sae.W_enc.dtype))
        top_acts_RK, top_indices_RK = codes.values, codes.indices
    text = token_strings(lm.tokenizer, token_id_R.tolist()) if per_token else {-1: ""}
    token_R = [text[i] for i in token_id_R.tolist()]
    return SentenceCodes(sentence_R, position_R, token_R, tokens_R, x_RD, top_acts_RK.cpu(), top_indices_RK.cpu())
