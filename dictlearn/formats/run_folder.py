"""A trained dictionary's folder: ``ae.pt`` (dictionary_learning's AutoEncoderTopK keys), ``config.json``
(dictionary_learning's ``trainer``/``buffer`` sections plus our resolved params), atomic writes, and the check
that a dictionary is only used on the model and hook it was trained on."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dictlearn.errors import UserError
from dictlearn.files import write_json
from dictlearn.params import Params
from dictlearn.sae.topk import TopKSAE

AE_FILE = "ae.pt"
CONFIG_FILE = "config.json"


def num_latents_of(params: Params, d_in: int) -> int:
    return params.sae.num_latents or params.sae.expansion_factor * d_in


def run_folder(params: Params, model_short_name: str, hook_name: str, d_in: int) -> Path:
    """``<output_dir>/<model>/<hook>/<num_latents>_k<k>/`` unless params name the run."""
    name = params.train.run_name or f"{num_latents_of(params, d_in)}_k{params.sae.k}"
    return Path(params.train.output_dir) / model_short_name / hook_name / name


def dictionary_config(
    params: Params, *, d_in: int, hook, lr: float, steps: int, warmup_steps: int, decay_start: int, device: str
) -> dict:
    """config.json: dictionary_learning's two sections (so its loaders read our runs) plus our params."""
    num_latents = num_latents_of(params, d_in)
    trainer = {
        "trainer_class": "TopKTrainer",
        "dict_class": "AutoEncoderTopK",
        "lr": lr,
        "steps": steps,
        "auxk_alpha": params.sae.aux_coef,
        "warmup_steps": warmup_steps,
        "decay_start": decay_start,
        "seed": params.train.seed,
        "activation_dim": d_in,
        "dict_size": num_latents,
        "k": params.sae.k,
        "device": device,
        "layer": hook.layer,
        "lm_name": params.model.name,
        "submodule_name": hook.name,
    }
    buffer = {
        "d_submodule": d_in,
        "io": "in" if hook.capture == "input" else "out",
        "n_ctxs": params.buffer.size_tokens // params.data.context_size,
        "ctx_len": params.data.context_size,
        "refresh_batch_size": params.buffer.model_batch_size,
        "out_batch_size": params.buffer.batch_size,
        "device": device,
    }
    return {"trainer": trainer, "buffer": buffer, "dictlearn": params.model_dump(mode="json")}


def save_dictionary(folder: Path, sae: TopKSAE, config: dict) -> None:
    sae.save(folder / AE_FILE)
    write_json(folder / CONFIG_FILE, config)


def load_dictionary(folder: str | Path, device: torch.device | str = "cpu") -> tuple[TopKSAE, dict]:
    """Read ``ae.pt`` and ``config.json`` from a dictionary folder."""
    folder = Path(folder)
    if not (folder / AE_FILE).is_file():
        raise UserError(f"no dictionary at {folder}: {AE_FILE} is missing; train one with training_script.py")
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"dictionary {folder} has no {CONFIG_FILE}; it says which model and hook it was trained on")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{folder / CONFIG_FILE}: not valid JSON ({err.msg} at line {err.lineno})") from None
    return TopKSAE.load(folder / AE_FILE, device=device), config


def check_dictionary_matches(config: dict, sae: TopKSAE, *, model_name: str, hook_name: str, d_in: int) -> None:
    """Refuse a dictionary trained on another model, hook or width: one line saying which and how to fix."""
    trainer = config.get("trainer", {})
    trained_model, trained_hook = trainer.get("lm_name"), trainer.get("submodule_name")
    if sae.d_in != d_in:
        raise UserError(
            f"dictionary width {sae.d_in} does not match the activation width {d_in} at {hook_name} of {model_name}; "
            "use a dictionary trained on this model and hook"
        )
    if trained_model is not None and trained_model != model_name:
        raise UserError(
            f"dictionary was trained on model {trained_model!r}, not {model_name!r}; set model.name to {trained_model!r}"
        )
    if trained_hook is not None and trained_hook != hook_name:
        raise UserError(
            f"dictionary was trained at hook {trained_hook!r}, not {hook_name!r}; set hook to {trained_hook!r}"
        )
