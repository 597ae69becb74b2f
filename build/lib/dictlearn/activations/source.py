"""Wiring shared by the scripts: the training data source (live from the model, or the on-disk store)
feeding the shuffled buffer."""

from __future__ import annotations

from pathlib import Path

from dictlearn.activations.buffer import ShuffledBuffer
from dictlearn.activations.harvest import LiveActivations
from dictlearn.activations.store import META, ActivationStore, harvest_identity
from dictlearn.errors import UserError
from dictlearn.lm.models import HookPoint, LanguageModel, hook_width
from dictlearn.lm.text import training_windows
from dictlearn.params import Params


def training_buffer(params: Params, lm: LanguageModel, hook: HookPoint, store_folder: Path) -> ShuffledBuffer:
    """The shuffled buffer over live activations or over the store, as ``train.source`` says."""
    d_in = hook_width(lm.config, hook)
    if params.train.source == "store":
        if not (store_folder / META).is_file():
            raise UserError(
                f"train.source is 'store' but there is no activation store at {store_folder}; "
                "run get_activations.py first, or set train.source to 'live'"
            )
        store = ActivationStore(store_folder)
        wanted, found = harvest_identity(params, hook.name, d_in), store.meta.get("identity", {})
        differing = [key for key in wanted if found.get(key) != wanted[key]]
        if differing:
            raise UserError(
                f"activation store {store_folder} was harvested with other {', '.join(differing)} settings; "
                "run get_activations.py with these params (or --overwrite)"
            )
        source = store.iter_chunks
    else:
        live = LiveActivations(
            lm,
            hook,
            lambda: training_windows(params.data, lm.tokenizer),
            params.buffer.model_batch_size,
            params.buffer.exclude_special_tokens,
        )
        source = live.iter_chunks
    return ShuffledBuffer(
        source,
        d_in=d_in,
        size=params.buffer.size_tokens,
        batch_size=params.buffer.batch_size,
        refill_fraction=params.buffer.refill_fraction,
        seed=params.train.seed,
    )
