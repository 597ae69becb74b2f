"""Wiring shared by the scripts: the training data source (live from the model, or the on-disk stores)
feeding shuffled buffers, one per group of hooks read side by side (a hook, or a transcoder's input and
target), all from one forward per model batch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from dictlearn.activations.buffer import ChunkSource, ShuffledBuffer
from dictlearn.activations.harvest import WHOLE, ActivationChunk, LiveActivations, Part, SharedPass
from dictlearn.activations.store import META, ActivationStore, harvest_identity, store_folder
from dictlearn.errors import UserError
from dictlearn.lm.models import HookPoint, LanguageModel, hook_width
from dictlearn.lm.text import training_windows
from dictlearn.params import Params


def _store_of(params: Params, lm: LanguageModel, hook: HookPoint) -> ActivationStore:
    folder = store_folder(params, lm.short_name, hook.name)
    if not (folder / META).is_file():
        raise UserError(
            f"train.source is 'store' but there is no activation store at {folder}; "
            "run get_activations.py first, or set train.source to 'live'"
        )
    store = ActivationStore(folder)
    wanted, found = harvest_identity(params, hook.name, hook_width(lm.config, hook)), store.meta.get("identity", {})
    differing = [key for key in wanted if found.get(key) != wanted[key]]
    if differing:
        raise UserError(
            f"activation store {folder} was harvested with other {', '.join(differing)} settings; "
            "run get_activations.py with these params (or --overwrite)"
        )
    return store


def _stores_side_by_side(stores: list[ActivationStore], part: Part) -> ChunkSource:
    """Shard i of ``part`` of every store, concatenated along the width (the stores were cut at the same rows)."""

    def chunks(start: int) -> Iterator[ActivationChunk]:
        for parts in zip(*(store.iter_chunks(start, part) for store in stores), strict=True):
            if any(not torch.equal(part.token_ids, parts[0].token_ids) for part in parts):
                names = ", ".join(str(store.path) for store in stores)
                raise UserError(
                    f"activation stores {names} hold different tokens; harvest them with the same params and "
                    "store.shard_tokens (get_activations.py with both hooks)"
                )
            yield ActivationChunk(torch.cat([part.acts for part in parts], dim=1), parts[0].token_ids)

    return chunks


def training_buffers(
    params: Params, lm: LanguageModel, groups: Sequence[Sequence[HookPoint]], part: Part = WHOLE
) -> list[ShuffledBuffer]:
    """A shuffled buffer per group of hooks (rows ``[hook | hook ...]``), over live activations from one shared
    forward or over the stores, as ``train.source`` says. Every buffer has the same size, batch size and seed,
    so they serve rows of the same tokens in the same order.

    With a ``part`` of the data (rank ``part.index`` of ``part.count`` data-parallel ranks: model batches or
    shards ``index``, ``index + count``, ...) the buffers hold ``buffer.size_tokens / count`` rows (memory per
    rank stays fixed) and serve ``buffer.batch_size / count`` rows a step, so a step of all ranks is one global
    batch; a batch size that does not split evenly is refused."""
    if params.buffer.batch_size % part.count:
        raise UserError(
            f"buffer.batch_size: {params.buffer.batch_size} rows do not split evenly over {part.count} processes; "
            f"use a multiple of {part.count}"
        )
    size, batch_size = params.buffer.size_tokens // part.count, params.buffer.batch_size // part.count
    if params.train.source == "store":
        stores = {hook.name: _store_of(params, lm, hook) for group in groups for hook in group}
        sources = [_stores_side_by_side([stores[hook.name] for hook in group], part) for group in groups]
    else:
        hooks = list({hook.name: hook for group in groups for hook in group}.values())
        live = LiveActivations(
            lm,
            hooks,
            lambda: training_windows(params.data, lm.tokenizer),
            params.buffer.model_batch_size,
            params.buffer.exclude_special_tokens,
        )
        shared = SharedPass(lambda start: live.iter_chunk_sets(start, part))
        sources = [shared.source([hook.name for hook in group]) for group in groups]
    return [
        ShuffledBuffer(
            source,
            d_in=sum(hook_width(lm.config, hook) for hook in group),
            size=size,
            batch_size=batch_size,
            refill_fraction=params.buffer.refill_fraction,
            seed=params.train.seed,
        )
        for group, source in zip(groups, sources, strict=True)
    ]
