"""Opening a dictionary: the one function every ``--dictionary`` script uses.

Any format is read (``dictlearn.formats.detect.open_any``: our run folders, dictionary_learning, SAELens,
sparsify, OpenAI, remote names). The dictionary's own model and hook are used (from its files); when they differ from what the params name,
the returned ``note`` says so in one line, for the script to print before it starts. Hooks are compared
resolved (``resid_out_layer6`` is ``blocks.6.hook_resid_post``) and models by identity (the embedded
``smollm2-135m`` is the hub's ``HuggingFaceTB/SmolLM2-135M-Instruct``). A dictionary whose width does not
match its hook on that model is refused before any weights load.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from dictlearn.errors import UserError
from dictlearn.formats.detect import open_any
from dictlearn.lm.models import (
    HookPoint,
    LanguageModel,
    hook_width,
    load_config,
    load_language_model,
    resolve_hook,
    same_model,
)
from dictlearn.params import Params
from dictlearn.sae.base import SparseAutoencoder


class DictionaryAtHook(NamedTuple):
    params: Params  # the params with the dictionary's model and hook filled in
    hook: HookPoint
    target_hook: HookPoint | None  # a transcoder's output hook
    sae: SparseAutoencoder  # on the CPU
    note: str | None  # one line when the dictionary's model or hook differs from the params'


class DictionaryOnModel(NamedTuple):
    params: Params
    lm: LanguageModel
    hook: HookPoint
    sae: SparseAutoencoder  # on the model's device
    note: str | None
    target_hook: HookPoint | None = None


def dictionary_at_hook(params: Params, folder: str | Path, model_config=None) -> DictionaryAtHook:
    """Load the dictionary in ``folder`` and resolve its model and hook (the model's config alone is loaded,
    unless given); refuse it when its width does not match that hook."""
    sae, info = open_any(folder, params)
    trained_model, trained_hook = info.model, info.hook
    model_name = params.model.name
    # Only a model or hook the params file names itself is worth a note when the dictionary's differs.
    model_named, hook_named = "name" in params.model.model_fields_set, "hook" in params.model_fields_set
    changes = []
    if trained_model and not same_model(trained_model, model_name):
        if model_named:
            changes.append(f"model {trained_model!r} (params: {model_name!r})")
        model_name = trained_model
    params = params.with_overrides(model={"name": model_name})
    if model_config is None:
        model_config = load_config(params.model)
    params_hook_name = params.hook if isinstance(params.hook, str) else ",".join(params.hook)
    hook = resolve_hook(model_config, trained_hook or params_hook_name)
    try:
        params_hook = resolve_hook(model_config, params_hook_name).name
    except UserError:
        params_hook = params_hook_name
    if hook.name != params_hook and hook_named:
        changes.append(f"hook {hook.name} (params: {params_hook_name})")
    params = params.with_overrides(hook=hook.name)
    width = hook_width(model_config, hook)
    if sae.d_in != width:
        raise UserError(
            f"dictionary {folder} has width {sae.d_in}, but {hook.name} of {model_name} has width {width}; "
            "use a dictionary trained on this model and hook"
        )
    target_hook = resolve_hook(model_config, info.target_hook) if info.target_hook else None
    if target_hook is not None and hook_width(model_config, target_hook) != sae.d_out:
        raise UserError(
            f"dictionary {folder} reconstructs width {sae.d_out}, but {target_hook.name} of {model_name} has width "
            f"{hook_width(model_config, target_hook)}; use a dictionary trained on this model"
        )
    notes = [info.note] if info.note else []
    if changes:
        notes.append(f"note: {folder} was trained on {' and '.join(changes)}; using the dictionary's")
    note = " ".join(notes) or None
    return DictionaryAtHook(params, hook, target_hook, sae, note)


def open_dictionary(params: Params, folder: str | Path, lm: LanguageModel | None = None) -> DictionaryOnModel:
    """``dictionary_at_hook``, then the language model (``lm`` when it is the dictionary's model already), with
    the SAE moved to the model's device."""
    opened = None
    if lm is not None:
        opened = dictionary_at_hook(params.with_overrides(model={"name": lm.name}), folder, lm.config)
        if opened.params.model.name != lm.name:  # trained on another model: resolve against that one
            opened = None
    if opened is None:
        opened = dictionary_at_hook(params, folder)
        lm = load_language_model(opened.params.model)
    return DictionaryOnModel(opened.params, lm, opened.hook, opened.sae.to(lm.device), opened.note, opened.target_hook)
