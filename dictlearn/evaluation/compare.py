"""Comparing dictionaries: finding run folders, naming each by architecture and size, loading them on their
language model (once per model), and the comparison record."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from dictlearn.analysis.dictionary_on_model import DictionaryOnModel, open_dictionary
from dictlearn.errors import UserError
from dictlearn.evaluation.evaluate import shared_pass_key
from dictlearn.formats.run_folder import AE_FILE
from dictlearn.params import Params
from dictlearn.sae.base import SparseAutoencoder

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


def dictionary_label(sae: SparseAutoencoder) -> str:
    """'topk 4608 k32': the architecture, the number of latents and k where the SAE has one."""
    k = sae.config().get("k")
    return f"{sae.architecture} {sae.num_latents}" + (f" k{k}" if k else "")


def dictionaries_on_models(params: Params, folders: list[Path]) -> Iterator[tuple[Path, DictionaryOnModel]]:
    """Each folder's dictionary on its model; a model shared with the previous folder is reused instead of
    loaded again, so a sweep on one model loads it once."""
    lm = None
    for folder in folders:
        opened = open_dictionary(params, folder, lm=lm)
        lm = opened.lm
        yield folder, opened


def dictionaries_in_groups(
    opened: Iterable[tuple[Path, DictionaryOnModel]],
) -> Iterator[list[tuple[Path, DictionaryOnModel]]]:
    """Runs of consecutive dictionaries that one held-out pass can evaluate together: the same loaded model and
    the same ``shared_pass_key``."""
    group: list[tuple[Path, DictionaryOnModel]] = []
    for folder, dictionary in opened:
        if group and not _one_pass(group[0][1], dictionary):
            yield group
            group = []
        group.append((folder, dictionary))
    if group:
        yield group


def _one_pass(a: DictionaryOnModel, b: DictionaryOnModel) -> bool:
    return a.lm is b.lm and shared_pass_key(a.hook, a.target_hook, a.params) == shared_pass_key(
        b.hook, b.target_hook, b.params
    )


def comparison_record(results: dict[str, dict]) -> dict:
    """comparison.json: for each dictionary (by folder) its label and the compared metrics."""
    return {
        folder: {"label": result["label"], **{name: result.get(name) for name in COMPARED}}
        for folder, result in results.items()
    }
