"""A harvest split over torchrun ranks: the shards a one-process harvest would write, planned from tokenising
alone, and each of N ranks writing shards r, r + N, ... of them into the one partial folder (rank 0 publishes).

Shard i holds rows ``[i * S, (i + 1) * S)`` of the one-process row stream, so every rank, knowing how many rows
each model batch gives, knows which batches (and which of their rows) make up any shard, and runs the model only
on the batches that overlap its own shards. The files, ``meta.json`` included, are those of one process. Each
rank records its complete shards in ``progress.rank{r}.json``; a killed harvest, rerun with any number of
processes, keeps every complete shard (one process's ``progress.json`` counts too) and writes only the others.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import torch

from dictlearn.activations.harvest import LiveActivations
from dictlearn.activations.store import (
    PROGRESS_FILES,
    StoreWriter,
    add_rows,
    partial_folder,
    progress_header,
    publish,
    remove_all_but,
    remove_partial,
    shard_file,
)
from dictlearn.errors import UserError
from dictlearn.files import make_folder, read_json, write_json


def rank_progress(rank: int) -> str:
    return f"progress.rank{rank}.json"


class HarvestPlan(NamedTuple):
    """Where a one-process harvest's rows come from and how they are cut."""

    offsets: list[int]  # the stream row each model batch starts at, then one past the last batch's rows
    shards: list[dict]  # meta.json's shard list: file, rows, end
    shard_tokens: int

    def pieces(self, indices: Iterable[int]) -> dict[int, list[tuple[int, int]]]:
        """The rows of shards ``indices`` as model batch -> ``(first_row, end_row)`` ranges within the batch, in
        stream order."""
        pieces: dict[int, list[tuple[int, int]]] = {}
        for index in indices:
            first = index * self.shard_tokens
            last = first + self.shards[index]["rows"]
            for batch in range(bisect_right(self.offsets, first) - 1, bisect_right(self.offsets, last - 1)):
                start, stop = self.offsets[batch], self.offsets[batch + 1]
                if min(last, stop) > max(first, start):
                    pieces.setdefault(batch, []).append((max(first, start) - start, min(last, stop) - start))
        return pieces


def plan_harvest(rows_per_batch: Iterable[int], max_tokens: int, shard_tokens: int) -> HarvestPlan:
    """The shards ``write_stores`` cuts from model batches of ``rows_per_batch`` rows when it stops at
    ``max_tokens`` rows (or the text's end): each ends at the batch holding its last row, and a short last
    shard of a text that ran out at the last batch's end, as ``StoreWriter`` records them."""
    offsets = [0]
    for rows in rows_per_batch:
        if offsets[-1] >= max_tokens:
            break
        offsets.append(offsets[-1] + rows)
    tokens = min(max_tokens, offsets[-1])
    shards = []
    for index, first in enumerate(range(0, tokens, shard_tokens)):
        last = min(first + shard_tokens, tokens)
        batch = bisect_right(offsets, last - 1) - 1
        if last - first < shard_tokens and tokens < max_tokens:
            batch = len(offsets) - 2  # the text ran out: one process's last batch, even one with no rows
        shards.append(
            {"file": shard_file(index), "rows": last - first, "end": {"batch": batch, "row": last - offsets[batch]}}
        )
    return HarvestPlan(offsets, shards, shard_tokens)


def claim_complete_shards(partial: Path, header: dict, shards: list[dict], resume: bool) -> set[int]:
    """Rank 0, before any rank writes: the indices of ``shards`` that a killed harvest (one process, or any
    number of ranks) with progress ``header`` left complete in ``partial``. Everything else there is removed
    (all of it without ``resume``), and those shards are recorded as rank 0's."""
    if not resume or partial.is_symlink():
        remove_partial(partial)
    make_folder(partial, "activation store")
    listed = []
    for record in partial.glob(PROGRESS_FILES):
        try:
            progress = read_json(record, "harvest progress")
        except UserError:
            continue
        if isinstance(progress, dict) and {key: progress.get(key) for key in header} == header:
            listed += progress.get("shards") if isinstance(progress.get("shards"), list) else []
    done = {i for i, shard in enumerate(shards) if shard in listed and (partial / shard["file"]).is_file()}
    remove_all_but(partial, {shards[i]["file"] for i in done})
    write_json(partial / rank_progress(0), {**header, "shards": [shards[i] for i in sorted(done)]})
    return done


class RankWriter(StoreWriter):
    """One rank's ``StoreWriter``: fed exactly the rows of shards ``files``, in order, it writes them into the
    partial folder rank 0 prepared and records them, after ``done``, in the rank's own progress file."""

    def __init__(self, path, meta, shard_tokens, dtype, *, rank: int, files: list[str], done: list[dict]):
        super().__init__(path, meta, shard_tokens, dtype)
        self.progress_path = self.partial / rank_progress(rank)
        self._files = iter(files)
        self.shards = list(done)

    def _open(self, resume: bool) -> None:
        """Rank 0 prepared the partial folder (``claim_complete_shards``)."""

    def _next_file(self) -> str:
        return next(self._files)


def write_stores_on_ranks(
    live: LiveActivations,
    stores: dict[str, tuple[Path, dict]],
    shard_tokens: int,
    dtype: torch.dtype,
    max_tokens: int,
    distributed,
    *,
    resume: bool,
    on_rows: Callable[[int], None] = lambda rows: None,
) -> tuple[dict[str, dict], int]:
    """``write_stores`` split over ``distributed``'s ranks, for hook name -> (store folder, meta): every rank
    calls it; rank r writes shards r, r + N, ... not already complete. Rank 0 publishes once every rank is done.
    Returns every store's meta and the rows a killed harvest had already written."""
    plan = plan_harvest(live.rows_per_batch(), max_tokens, shard_tokens)

    def claim() -> list[int]:
        done = [
            claim_complete_shards(partial_folder(path), progress_header(meta, shard_tokens, dtype), plan.shards, resume)
            for path, meta in stores.values()
        ]
        return sorted(set.intersection(*done))

    done = distributed.on_first(claim)
    mine = [i for i in range(distributed.rank, len(plan.shards), distributed.world_size) if i not in done]
    writers = {
        name: RankWriter(
            path,
            meta,
            shard_tokens,
            dtype,
            rank=distributed.rank,
            files=[plan.shards[i]["file"] for i in mine],
            done=[plan.shards[i] for i in done] if distributed.is_first else [],
        )
        for name, (path, meta) in stores.items()
    }
    pieces = plan.pieces(mine)
    try:
        for batch, chunk_set in live.chunk_sets_where(pieces.__contains__, stop=max(pieces, default=-1) + 1):
            for first_row, end_row in pieces[batch]:
                add_rows(writers, chunk_set, batch, first_row, end_row)
                on_rows(end_row - first_row)
        for writer in writers.values():
            writer.flush(plan.shards[-1]["end"] if plan.shards else {"batch": 0, "row": 0})
    except BaseException:
        for writer in writers.values():
            writer.close()
        raise
    distributed.wait_for_all()

    def publish_all() -> dict[str, dict]:
        metas = {}
        for name, (path, meta) in stores.items():
            missing = [s["file"] for s in plan.shards if not (partial_folder(path) / s["file"]).is_file()]
            if missing:
                raise UserError(f"activation store {path}: no rank wrote {', '.join(missing[:3])}; run it again")
            metas[name] = publish(path, meta, dtype, plan.shards)
        return metas

    return distributed.on_first(publish_all), sum(plan.shards[i]["rows"] for i in done)
