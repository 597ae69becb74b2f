"""A trained dictionary opened together with the language model and hook it was trained on.

The model and hook come from the dictionary's ``config.json`` unless the params file names them itself; a
named model or hook that differs from the dictionary's is refused before any weights load.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from dictlearn.formats.run_folder import check_dictionary_matches, load_dictionary
from dictlearn.lm.models import HookPoint, LanguageModel, hook_width, load_config, load_language_model, resolve_hook
from dictlearn.params import Params
from dictlearn.sae.topk import TopKSAE


class DictionaryOnModel(NamedTuple):
    params: Params  # the params with the dictionary's model and hook filled in
    lm: LanguageModel
    hook: HookPoint
    sae: TopKSAE  # on the model's device


def open_dictionary(params: Params, folder: str | Path) -> DictionaryOnModel:
    """Load the dictionary in ``folder``, check it against the model and hook, then load the model."""
    sae, config = load_dictionary(folder)
    trained = config.get("trainer", {})
    overrides = {}
    if "name" not in params.model.model_fields_set and trained.get("lm_name"):
        overrides["model"] = {"name": trained["lm_name"]}
    if "hook" not in params.model_fields_set and trained.get("submodule_name"):
        overrides["hook"] = trained["submodule_name"]
    params = params.with_overrides(**overrides)
    model_config = load_config(params.model)
    hook = resolve_hook(model_config, params.hook)
    check_dictionary_matches(
        config, sae, model_name=params.model.name, hook_name=hook.name, d_in=hook_width(model_config, hook)
    )
    lm = load_language_model(params.model)
    return DictionaryOnModel(params, lm, hook, sae.to(lm.device))
