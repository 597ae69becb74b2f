"""Writing a dictionary in any library's format (``convert_dictionary.py``): our run folder, dictionary_learning,
SAELens, sparsify and OpenAI. A target whose own classes cannot hold the dictionary exactly is refused in one
line (never a file that loads to other codes); our run folder holds every SAE we can read.
"""

from __future__ import annotations

from pathlib import Path

from dictlearn.errors import UserError
from dictlearn.files import check_output_folder, make_folder
from dictlearn.formats import openai, saelens, sparsify
from dictlearn.formats.detect import DictionaryInfo
from dictlearn.formats.dictionary_learning import holds_exactly
from dictlearn.formats.run_folder import converted_config, save_dictionary
from dictlearn.sae.base import SparseAutoencoder

TARGETS = ("ours", "dictionary_learning", "saelens", "sparsify", "openai")


def write_as(sae: SparseAutoencoder, info: DictionaryInfo, target: str, out: Path) -> Path:
    """Write ``sae`` (read from ``info.path``) in ``target``'s layout under ``out``; returns what to open."""
    if target not in TARGETS:
        raise UserError(f"--to: expected one of {', '.join(TARGETS)}, found {target!r}")
    if target == "dictionary_learning" and not holds_exactly(sae):
        raise UserError(
            f"dictionary_learning has no class that holds this {sae.architecture} SAE exactly "
            f"({_why_not_dictionary_learning(sae)}); convert it to 'ours' instead"
        )
    if target in ("ours", "dictionary_learning"):
        folder = make_folder(out, "--out")
        config = converted_config(
            sae, model=info.model, hook=info.hook, target_hook=info.target_hook, source=str(info.path)
        )
        save_dictionary(folder, sae, config)
        return folder
    # These writers refuse what their target cannot hold before they make any folder: a refusal leaves none.
    check_output_folder(out, "--out")
    if target == "saelens":
        return saelens.write_saelens(out, sae, info.model, info.hook)
    if target == "sparsify":
        return sparsify.write_sparsify(out, sae, info.hook, info.target_hook)
    return openai.write_openai(out, sae, info.hook)


def _why_not_dictionary_learning(sae: SparseAutoencoder) -> str:
    if getattr(sae, "transcoder", False):
        return "it is a transcoder"
    if getattr(sae, "input_norm", False):
        return "it layer-normalises its input"
    if sae.architecture == "relu":
        return "its decoder rows are not unit-norm, which that library's loader would renormalise, changing the codes"
    if sae.architecture == "gated":
        return (
            "its decoder rows are not unit-norm, by which GatedAutoEncoder's normalize_decoder option scales the codes"
        )
    return "no class of that architecture"
