"""Opening any library's dictionary: the format is read from the files' own metadata, never guessed from key names
where a file says what it is; the model and hook each format records are mapped onto our names.

| what is found                                        | format                                            |
|------------------------------------------------------|---------------------------------------------------|
| ``ae.pt`` + ``config.json`` (``sae`` section)        | ours (``dictlearn.formats.run_folder``)           |
| ``ae.pt`` + ``config.json`` (``trainer.dict_class``) | dictionary_learning, that class                   |
| ``checkpoints/ae_<step>.pt``, config one level up    | dictionary_learning mid-training save             |
| ``ae.pt`` alone (the published ``10_32768`` folders) | dictionary_learning ``AutoEncoder``, only when its keys are exactly that class's; model and hook from params |
| ``cfg.json`` + ``sae_weights.safetensors``           | SAELens, its ``architecture``                     |
| ``cfg.json`` + ``sae.safetensors``                   | sparsify (hookpoint = folder name)                |
| a ``.pt`` state dict with an ``activation`` entry    | openai/sparse_autoencoder                         |

A folder holding none of these but exactly one dictionary below it (a case folder holding ``trainer_0/``, a
sparsify run holding one hookpoint) opens that one. Remote names (``az://``, ``hf://``, ``openai:``) are fetched
first (``dictlearn.formats.remote``). Anything else is refused in one line naming the file and what was
expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from dictlearn.errors import UserError
from dictlearn.files import read_json, read_torch
from dictlearn.formats import openai, saelens, sparsify
from dictlearn.formats.dictionary_learning import BY_DICT_CLASS, from_dictionary_learning
from dictlearn.formats.remote import fetch, is_remote
from dictlearn.formats.run_folder import AE_FILE, CONFIG_FILE, SAE_SECTION, read_run_folder, trained_model_and_hook
from dictlearn.lm.models import canonical_hook_name
from dictlearn.sae.base import SparseAutoencoder

FORMATS = ("dictlearn", "dictionary_learning", "saelens", "sparsify", "openai")
# dictionary_learning AutoEncoder's keys: what a bare ae.pt must hold exactly to be read without a config.json.
AUTOENCODER_KEYS = ("bias", "decoder.weight", "encoder.bias", "encoder.weight")
_EXPECTED = (
    "expected a run folder (ae.pt + config.json), a dictionary_learning checkpoint (checkpoints/ae_<step>.pt), "
    "a SAELens folder (cfg.json + sae_weights.safetensors), a sparsify hookpoint folder (cfg.json + "
    "sae.safetensors) or an OpenAI autoencoder .pt"
)


class DictionaryInfo(NamedTuple):
    format: str
    """One of ``FORMATS``: whose layout the files have."""

    path: Path
    """The local file or folder read (after a remote fetch)."""

    model: str | None
    """The model the files name (None where the format does not record it)."""

    hook: str | None
    """The input hook in our (TransformerLens) names, None where the files do not say."""

    target_hook: str | None
    """A transcoder's output hook, else None."""

    note: str | None
    """One line for the user where something was taken from the params instead of the files."""

    config: dict
    """A run folder's config.json; for other formats, a config with our ``sae`` section filled from the files
    (``run_folder.trained_model_and_hook`` reads either)."""


def open_any(
    path: str | Path, params=None, device: torch.device | str = "cpu"
) -> tuple[SparseAutoencoder, DictionaryInfo]:
    """Read a dictionary of any supported format: (SAE, what the files say about it). ``params`` (optional)
    fills in the model and hook a format does not record, and the returned note says so."""
    spec = str(path)
    local = fetch(spec) if is_remote(spec) else Path(path)
    sae, info = _open_local(local, device)
    if info.model is None or info.hook is None:
        info = _fill_from_params(info, params)
    if info.config.get(SAE_SECTION) is None or info.format != "dictlearn":
        info = info._replace(config=_synthesised_config(sae, info, info.config))
    return sae, info


def _fill_from_params(info: DictionaryInfo, params) -> DictionaryInfo:
    missing = [name for name, value in (("model", info.model), ("hook", info.hook)) if value is None]
    if params is None:
        return info
    model = info.model or params.model.name
    hook = info.hook or canonical_hook_name(params.hook)
    taken = " and ".join(f"{name} {value!r}" for name, value in (("model", model), ("hook", hook)) if name in missing)
    note = f"note: {info.path} ({info.format}) does not record its {' or '.join(missing)}; using the params' {taken}"
    return info._replace(model=model, hook=hook, note=note)


def _synthesised_config(sae: SparseAutoencoder, info: DictionaryInfo, original: dict) -> dict:
    ours = {
        "architecture": sae.architecture,
        "config": sae.config(),
        "format": info.format,
        "model": info.model,
        "hook": info.hook,
        "target_hook": info.target_hook,
    }
    return {**original, SAE_SECTION: ours}


def _open_local(path: Path, device) -> tuple[SparseAutoencoder, DictionaryInfo]:
    if not path.exists():
        raise UserError(
            f"no dictionary at {path}: {AE_FILE} is missing; train one with training_script.py, or {_EXPECTED}"
        )
    if path.is_file():
        return _open_file(path, device)
    return _open_folder(path, device, depth=0)


def _kind_of_folder(folder: Path) -> str | None:
    names = {entry.name for entry in folder.iterdir()} if folder.is_dir() else set()
    if AE_FILE in names:
        return "run"
    if saelens.CFG_FILE in names and saelens.WEIGHTS_FILE in names:
        return "saelens"
    if sparsify.CFG_FILE in names and sparsify.WEIGHTS_FILE in names:
        return "sparsify"
    return None


def _open_folder(folder: Path, device, depth: int) -> tuple[SparseAutoencoder, DictionaryInfo]:
    kind = _kind_of_folder(folder)
    if kind == "run":
        return _open_file(folder / AE_FILE, device)
    if kind == "saelens":
        sae, cfg = _prefixed(folder, lambda: saelens.read_saelens(folder, device))
        model, hook = saelens.model_and_hook(cfg)
        return sae, _info("saelens", folder, model, hook, None, {"saelens": cfg})
    if kind == "sparsify":
        sae, cfg = _prefixed(folder, lambda: sparsify.read_sparsify(folder, device))
        hook, target_hook = sparsify.hooks_of_hookpoint(folder.name, bool(cfg.get("transcode", False)))
        return sae, _info("sparsify", folder, None, hook, target_hook, {"sparsify": cfg})
    if (folder / saelens.CFG_FILE).is_file():
        raise UserError(
            f"{folder}: has {saelens.CFG_FILE} but neither {saelens.WEIGHTS_FILE} (SAELens) nor "
            f"{sparsify.WEIGHTS_FILE} (sparsify)"
        )
    if (folder / CONFIG_FILE).is_file():
        raise UserError(f"no dictionary at {folder}: {AE_FILE} is missing beside {CONFIG_FILE}")
    candidates = _dictionaries_below(folder, depth)
    if len(candidates) == 1:
        found = candidates[0]
        return _open_file(found, device) if found.is_file() else _open_folder(found, device, depth + 1)
    if candidates:
        names = ", ".join(str(candidate.relative_to(folder)) for candidate in candidates[:6])
        raise UserError(f"{folder} holds {len(candidates)} dictionaries ({names}); give one of them")
    raise UserError(f"no dictionary at {folder}: {AE_FILE} is missing; {_EXPECTED}")


def _dictionaries_below(folder: Path, depth: int) -> list[Path]:
    """The dictionaries under ``folder`` (a few levels deep): folders of a known kind and ``.pt`` files, not
    looking inside a found one. A dictionary_learning ``checkpoints/`` folder belongs to its run."""
    if depth > 3:
        return []
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.suffix == ".pt":
            found.append(entry)
        elif entry.is_dir() and entry.name != "checkpoints":
            found.extend([entry] if _kind_of_folder(entry) else _dictionaries_below(entry, depth + 1))
    return found


def _info(format: str, path: Path, model, hook, target_hook, config: dict) -> DictionaryInfo:
    return DictionaryInfo(
        format,
        path,
        model,
        canonical_hook_name(hook) if hook else None,
        canonical_hook_name(target_hook) if target_hook else None,
        None,
        config,
    )


def _prefixed(path: Path, read):
    """Run ``read``; a ``UserError`` that does not name a file gets ``path`` in front."""
    try:
        return read()
    except UserError as err:
        message = str(err)
        if str(path) in message:
            raise
        raise UserError(f"{path}: {message}") from None


def _open_file(path: Path, device) -> tuple[SparseAutoencoder, DictionaryInfo]:
    if path.suffix == ".safetensors" or path.name in (saelens.CFG_FILE, CONFIG_FILE):
        return _open_folder(path.parent, device, depth=0)
    if path.suffix != ".pt":
        raise UserError(f"{path}: not a dictionary file; {_EXPECTED}")
    run_config = _run_config_for(path)
    if run_config is not None:
        config_path, config = run_config
        sae, config = _prefixed(path, lambda: read_run_folder(path, config_path, config, device))
        fmt = "dictlearn" if isinstance(config.get(SAE_SECTION), dict) else "dictionary_learning"
        model, hook = trained_model_and_hook(config)
        ours = config.get(SAE_SECTION) if isinstance(config.get(SAE_SECTION), dict) else {}
        return sae, _info(fmt, path, model, hook, ours.get("target_hook"), config)
    state_dict = read_torch(path, "dictionary weights", map_location=device)
    if openai.is_openai_state_dict(state_dict):
        sae = _prefixed(path, lambda: openai.read_openai(path, state_dict, device))
        model, hook = openai.model_and_hook(path)
        return sae, _info("openai", path, model, hook, None, {})
    if not isinstance(state_dict, dict):
        raise UserError(f"{path}: expected a state dict (names to tensors), found {type(state_dict).__name__}")
    found = sorted(state_dict)
    if tuple(found) != AUTOENCODER_KEYS:
        raise UserError(
            f"{path}: no {CONFIG_FILE} says which class this state dict is, and its keys are not dictionary_learning "
            f"AutoEncoder's {list(AUTOENCODER_KEYS)} (found {found[:8]}); {_EXPECTED}"
        )
    if "AutoEncoder" not in BY_DICT_CLASS:
        raise UserError(f"{path}: dictionary_learning AutoEncoder (ReLU) is not supported yet")
    sae = _prefixed(path, lambda: from_dictionary_learning("AutoEncoder", state_dict, {}, device))
    return sae, _info("dictionary_learning", path, None, None, None, {"trainer": {"dict_class": "AutoEncoder"}})


def _run_config_for(path: Path) -> tuple[Path, dict] | None:
    """The config.json that says what ``path`` holds: beside ``ae.pt``, or one level above
    ``checkpoints/ae_<step>.pt``; None when there is none."""
    if path.name == AE_FILE:
        config_path = path.parent / CONFIG_FILE
    elif path.parent.name == "checkpoints" and path.stem.startswith("ae_"):
        config_path = path.parent.parent / CONFIG_FILE
    else:
        return None
    if not config_path.is_file():
        return None
    return config_path, read_json(config_path, "dictionary config")
