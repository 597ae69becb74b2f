"""Comparing dictionaries: finding run folders, naming each by architecture and size, loading them on their
language model (once per model), and the comparison record."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dictlearn.analysis.dictionary_on_model import DictionaryOnModel, open_dictionary
from dictlearn.errors import UserError
from dictlearn.formats.run_folder import AE_FILE, check_dictionary_matches, load_dictionary
from dictlearn.lm.models import hook_width, resolve_hook
from dictlearn.params import Params

# The metrics a comparison keeps for each dictionary (SAEBench core names, plus fvu and absorption).
COMPARED = (
    "l0",
    "explained_variance",
    "fvu",
    "cossim",
    "l2_ratio",
    "relative_reconstruction_bias",
    "ce_loss_score",
    "kl_div_score",
    "frac_alive",
    "average_max_decoder_cosine_sim",
    "absorption_rate",
    "tokens",
    "lm_loss_tokens",
)


def find_dictionaries(paths: list[str]) -> list[Path]:
    """Each path is a run folder (it holds ae.pt) or a folder searched for run folders; sorted, no repeats."""
    found: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if (path / AE_FILE).is_file():
            found.append(path)
        elif path.is_dir():
            runs = sorted(ae.parent for ae in path.rglob(AE_FILE))
            if not runs:
                raise UserError(f"--dictionary: no {AE_FILE} in {path} or any folder below it")
            found += runs
        else:
            raise UserError(f"--dictionary: {path} is not a folder; give a run folder (with {AE_FILE}) or one above")
    return list(dict.fromkeys(found))


def architecture_of(config: dict) -> str:
    """``dictlearn.sae.architecture`` if config.json has it, else dictionary_learning's ``trainer.dict_class``
    (AutoEncoderTopK -> topk), else "topk" (every run before architectures were named)."""
    named = config.get("dictlearn", {}).get("sae", {}).get("architecture")
    if named:
        return str(named)
    dict_class = config.get("trainer", {}).get("dict_class")
    if dict_class:
        short = dict_class.removeprefix("AutoEncoder").removesuffix("AutoEncoder").removesuffix("SAE")
        return short.lower() or dict_class.lower()
    return "topk"


def dictionary_label(config: dict, num_latents: int) -> str:
    """'topk 4608 k32': the architecture, the number of latents and k where the config gives one."""
    k = config.get("trainer", {}).get("k")
    return f"{architecture_of(config)} {num_latents}" + (f" k{k}" if k else "")


def dictionaries_on_models(params: Params, folders: list[Path]) -> Iterator[tuple[Path, dict, DictionaryOnModel]]:
    """Each folder's (folder, config.json, dictionary on its model); a model shared with the previous folder is
    reused instead of loaded again, so a sweep on one model loads it once."""
    previous: DictionaryOnModel | None = None
    for folder in folders:
        sae, config = load_dictionary(folder)
        trained = config.get("trainer", {})
        if previous is not None and trained.get("lm_name", previous.params.model.name) == previous.params.model.name:
            folder_params = previous.params.with_overrides(hook=trained.get("submodule_name", params.hook))
            hook = resolve_hook(previous.lm.config, folder_params.hook)
            check_dictionary_matches(
                config,
                sae,
                model_name=folder_params.model.name,
                hook_name=hook.name,
                d_in=hook_width(previous.lm.config, hook),
            )
            opened = DictionaryOnModel(folder_params, previous.lm, hook, sae.to(previous.lm.device))
        else:
            opened = open_dictionary(params, folder)
        previous = opened
        yield folder, config, opened


def comparison_record(results: dict[str, dict]) -> dict:
    """comparison.json: for each dictionary (by folder) its label and the compared metrics."""
    return {
        folder: {"label": result["label"], **{name: result.get(name) for name in COMPARED}}
        for folder, result in results.items()
    }
