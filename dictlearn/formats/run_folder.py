"""Our run folder: ``ae.pt`` + ``config.json`` (+ metrics, plots, eval.json), readable by dictionary_learning.

``ae.pt`` is the state dict of the dictionary_learning class that holds the SAE exactly (its
``trainer.dict_class`` in ``config.json``), so that library's ``load_dictionary`` reads our runs; an SAE no
dictionary_learning class holds (a transcoder) is saved as our own state dict. ``config.json`` holds
dictionary_learning's ``trainer`` and ``buffer`` sections, our ``sae`` section (architecture, constructor
config, which layout ``ae.pt`` has, hooks) and the resolved params, so every result says how it was made.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dictlearn.errors import UserError
from dictlearn.files import read_torch, torch_save, write_json
from dictlearn.formats.dictionary_learning import from_dictionary_learning, holds_exactly, to_dictionary_learning
from dictlearn.lm.models import canonical_hook_name, same_model
from dictlearn.params import Params
from dictlearn.sae.base import SparseAutoencoder
from dictlearn.sae.registry import sae_from_state_dict

AE_FILE = "ae.pt"
CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
# Everything a training run writes into its folder: what --overwrite removes (and nothing else).
RUN_FILES = (AE_FILE, CONFIG_FILE, CHECKPOINT_FILE, METRICS_FILE, EVAL_FILE, "loss.png", "sparsity.png", "density.png")
# config.json's section of our own, beside dictionary_learning's "trainer" and "buffer".
SAE_SECTION = "sae"
PARAMS_SECTION = "dictlearn"

# dictionary_learning's trainer class for each architecture (its trainers/*.py), for config.json.
_TRAINER_CLASS = {
    "topk": "TopKTrainer",
    "batchtopk": "BatchTopKTrainer",
    "matryoshka": "MatryoshkaBatchTopKTrainer",
    "relu": "StandardTrainer",
    "jumprelu": "JumpReluTrainer",
    "gated": "GatedSAETrainer",
}


def num_latents_of(params: Params, d_in: int) -> int:
    return params.sae.num_latents or params.sae.expansion_factor * d_in


def default_run_name(params: Params, num_latents: int) -> str:
    """``<num_latents>_k<k>`` for TopK (the name earlier runs have), ``<architecture>_<num_latents>[_k<k>]`` for
    the others, with ``transcoder_`` in front of a transcoder's."""
    sae = params.sae
    name = f"{num_latents}_k{sae.k}" if sae.architecture == "topk" else f"{sae.architecture}_{num_latents}"
    if sae.architecture in ("batchtopk", "matryoshka"):
        name += f"_k{sae.k}"
    if getattr(sae, "recipe", None) == "april2024":
        name += "_april2024"
    if getattr(sae, "target_hook", None):
        name = f"transcoder_{name}"
    return name


def run_folder(params: Params, model_short_name: str, hook_name: str, d_in: int) -> Path:
    """``<output_dir>/<model>/<hook>/<run name>/``."""
    name = params.train.run_name or default_run_name(params, num_latents_of(params, d_in))
    return Path(params.train.output_dir) / model_short_name / hook_name / name


def claim_run_folder(folder: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to train over another run's results: a folder holding a finished dictionary or a checkpoint is
    only trained into with ``--resume`` (a checkpoint) or ``--overwrite`` (which removes that run's files)."""
    finished, checkpoint = (folder / AE_FILE).is_file(), (folder / CHECKPOINT_FILE).is_file()
    if overwrite:
        for name in RUN_FILES:
            (folder / name).unlink(missing_ok=True)
        return
    if finished and not checkpoint:
        raise UserError(
            f"{folder} already holds a trained dictionary; evaluate.py --dictionary {folder} reads it, "
            "--overwrite trains it again, or set train.run_name for a run of its own"
        )
    if checkpoint and not resume:
        raise UserError(
            f"{folder} holds the checkpoint of an unfinished run; --resume continues it, --overwrite starts over"
        )


def dictionary_config(
    params: Params,
    sae: SparseAutoencoder,
    *,
    hook,
    target_hook=None,
    lr: float,
    steps: int,
    warmup_steps: int,
    decay_start: int,
    device: str,
) -> dict:
    """config.json: dictionary_learning's two sections (so its loaders read our runs), our ``sae`` section and
    the params."""
    sae_params = params.sae
    trainer = {
        "trainer_class": _TRAINER_CLASS.get(sae.architecture, "dictlearn"),
        "lr": lr,
        "steps": steps,
        "warmup_steps": warmup_steps,
        "decay_start": decay_start,
        "seed": params.train.seed,
        "activation_dim": sae.d_in,
        "dict_size": sae.num_latents,
        "device": device,
        "layer": hook.layer,
        "lm_name": params.model.name,
        "submodule_name": hook.name,
    }
    # The recipe's own fields under dictionary_learning's names (its loader passes trainer.k to TopK classes).
    for ours, theirs in (("k", "k"), ("aux_coef", "auxk_alpha"), ("l1_coefficient", "l1_penalty")):
        if hasattr(sae_params, ours):
            trainer[theirs] = getattr(sae_params, ours)
    buffer = {
        "d_submodule": sae.d_in,
        "io": "in" if hook.capture == "input" else "out",
        "n_ctxs": params.buffer.size_tokens // params.data.context_size,
        "ctx_len": params.data.context_size,
        "refresh_batch_size": params.buffer.model_batch_size,
        "out_batch_size": params.buffer.batch_size,
        "device": device,
    }
    ours = {
        "model": params.model.name,
        "hook": hook.name,
        "target_hook": target_hook.name if target_hook is not None else None,
    }
    return {"trainer": trainer, "buffer": buffer, SAE_SECTION: ours, PARAMS_SECTION: params.model_dump(mode="json")}


def converted_config(
    sae: SparseAutoencoder, *, model: str | None, hook: str | None, target_hook: str | None, source: str
) -> dict:
    """config.json for a dictionary converted from another file (``convert_dictionary.py``): dictionary_learning's
    fields that its loader and our opener read, and our ``sae`` section; no training params (there were none of
    ours)."""
    layer = int(hook.split(".")[1]) if hook and hook.startswith("blocks.") else None
    trainer = {
        "trainer_class": _TRAINER_CLASS.get(sae.architecture, "dictlearn"),
        "dict_class": to_dictionary_learning(sae)[0] if holds_exactly(sae) else f"dictlearn.{sae.architecture}",
        "activation_dim": sae.d_in,
        "dict_size": sae.num_latents,
        "layer": layer,
        "lm_name": model,
        "submodule_name": hook,
    }
    if hasattr(sae, "k"):
        trainer["k"] = int(sae.k)
    ours = {
        "architecture": sae.architecture,
        "config": sae.config(),
        "layout": "dictionary_learning" if holds_exactly(sae) else "dictlearn",
        "model": model,
        "hook": hook,
        "target_hook": target_hook,
        "converted_from": source,
    }
    return {"trainer": trainer, "buffer": {"d_submodule": sae.d_in, "io": "out"}, SAE_SECTION: ours}


def save_dictionary(folder: Path, sae: SparseAutoencoder, config: dict) -> None:
    """Write ``ae.pt`` (atomically, so a crash never leaves half a file) and ``config.json``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"cannot save dictionary to {folder}: the folder does not exist")
    if holds_exactly(sae):
        dict_class, state_dict = to_dictionary_learning(sae)
        layout = "dictionary_learning"
    else:
        dict_class, state_dict, layout = f"dictlearn.{sae.architecture}", sae.state_dict(), "dictlearn"
    # The file's own metadata says what ae.pt holds, whatever the caller's config says.
    ours = {**config.get(SAE_SECTION, {}), "architecture": sae.architecture, "config": sae.config(), "layout": layout}
    config = {**config, "trainer": {**config.get("trainer", {}), "dict_class": dict_class}, SAE_SECTION: ours}
    torch_save(folder / AE_FILE, {name: tensor.detach().cpu() for name, tensor in state_dict.items()})
    write_json(folder / CONFIG_FILE, config)


def load_dictionary(path: str | Path, device: torch.device | str = "cpu") -> tuple[SparseAutoencoder, dict]:
    """Read a dictionary of any format (``dictlearn.formats.detect.open_any``): (SAE, config), where config is
    a run folder's config.json, or for another library's files a config whose ``sae`` section gives what they
    say (model, hook, format)."""
    from dictlearn.formats.detect import open_any

    sae, info = open_any(path, device=device)
    return sae, info.config


def read_run_folder(
    ae_path: Path, config_path: Path, config: dict, device: torch.device | str = "cpu"
) -> tuple[SparseAutoencoder, dict]:
    """Read ``ae.pt`` (or a dictionary_learning checkpoint) whose class ``config`` names: ours (the ``sae``
    section says the layout) or dictionary_learning's (``trainer.dict_class``)."""
    state_dict = read_torch(ae_path, "dictionary weights", map_location=device if device is not None else "cpu")
    if not isinstance(state_dict, dict):
        raise UserError(f"{ae_path}: expected a state dict (names to tensors), found {type(state_dict).__name__}")
    ours = config.get(SAE_SECTION)
    trainer = config.get("trainer")
    if isinstance(ours, dict) and ours.get("layout") == "dictlearn":
        try:
            sae = sae_from_state_dict(ours["architecture"], ours["config"], state_dict, device=device)
        except (KeyError, TypeError, RuntimeError) as err:
            raise UserError(f"{ae_path} does not match its {config_path.name} sae section: {err}") from None
        return sae, config
    if not isinstance(trainer, dict) or "dict_class" not in trainer:
        raise UserError(f"{config_path}: no trainer.dict_class saying which dictionary class {ae_path.name} holds")
    return from_dictionary_learning(trainer["dict_class"], state_dict, trainer, device), config


def trained_model_and_hook(config: dict) -> tuple[str | None, str | None]:
    """The model and hook a run folder's config says the dictionary was trained on."""
    ours = config.get(SAE_SECTION) if isinstance(config.get(SAE_SECTION), dict) else {}
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    return ours.get("model") or trainer.get("lm_name"), ours.get("hook") or trainer.get("submodule_name")


def check_dictionary_matches(
    config: dict, sae: SparseAutoencoder, *, model_name: str, hook_name: str, d_in: int
) -> None:
    """Refuse a dictionary trained on another model, hook or width: one line saying which and how to fix. Hooks
    are compared by their TransformerLens names, models by ``same_model``."""
    trained_model, trained_hook = trained_model_and_hook(config)
    if sae.d_in != d_in:
        raise UserError(
            f"dictionary width {sae.d_in} does not match the activation width {d_in} at {hook_name} of {model_name}; "
            "use a dictionary trained on this model and hook"
        )
    if trained_model is not None and not same_model(trained_model, model_name):
        raise UserError(
            f"dictionary was trained on model {trained_model!r}, not {model_name!r}; set model.name to {trained_model!r}"
        )
    if trained_hook is not None and canonical_hook_name(trained_hook) != canonical_hook_name(hook_name):
        raise UserError(
            f"dictionary was trained at hook {trained_hook!r}, not {hook_name!r}; "
            f"set hook to {canonical_hook_name(trained_hook)!r}"
        )
