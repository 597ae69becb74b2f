"""openai/sparse_autoencoder state dicts (``<location>/autoencoders/<layer>.pt``, model.py at git 4965b94): TopK
(input layer-normalised, ``decode`` undoing it) and ReLU, both ways.

The file holds neither model nor hook: the path does. ``<location>`` (``resid_post_mlp``, optionally with a
``_v4``/``_v5_32k``/``_v5_128k`` suffix) maps onto a hook as the repository's README says; the layer is the
file name; the published files live under ``gpt2-small/``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import torch

from dictlearn.errors import UserError
from dictlearn.files import torch_save
from dictlearn.formats.dictionary_learning import copy_weights_, sizes_from
from dictlearn.sae.base import SparseAutoencoder
from dictlearn.sae.registry import ARCHITECTURES
from dictlearn.sae.topk import TopKSAE

# The repository README's locations -> TransformerLens sites.
LOCATIONS = {
    "mlp_post_act": "mlp.hook_post",
    "resid_delta_attn": "hook_attn_out",
    "resid_post_attn": "hook_resid_mid",
    "resid_delta_mlp": "hook_mlp_out",
    "resid_post_mlp": "hook_resid_post",
}
_VERSION_SUFFIX_RE = re.compile(r"_v\d+(?:_\d+k)?$")
_SHAPES = {
    "pre_bias": ("D",),
    "encoder.weight": ("F", "D"),
    "latent_bias": ("F",),
    "decoder.weight": ("D", "F"),
    "stats_last_nonzero": ("F",),
    "latents_activation_frequency": ("F",),
    "latents_mean_square": ("F",),
}
# What torch's state_dict recursion adds for the TopK module when a whole Autoencoder is saved
# (shared/fixtures/peer-formats/README.md): not weights, and the activation entry says the same.
_TOPK_MODULE_KEYS = ("activation.k", "activation.postact_fn")


def is_openai_state_dict(state_dict) -> bool:
    """Whether a loaded ``.pt`` says it is an OpenAI Autoencoder (its non-tensor ``activation`` entry)."""
    return isinstance(state_dict, dict) and isinstance(state_dict.get("activation"), str)


def model_and_hook(path: Path) -> tuple[str | None, str | None]:
    """(model, hook) from ``.../[gpt2-small/]<location>/autoencoders/<layer>.pt``; None where the path says
    nothing."""
    parts = path.parts
    model = "gpt2" if "gpt2-small" in parts else None
    location = _VERSION_SUFFIX_RE.sub("", path.parent.parent.name) if path.parent.name == "autoencoders" else ""
    if location not in LOCATIONS or not path.stem.isdigit():
        return model, None
    return model, f"blocks.{int(path.stem)}.{LOCATIONS[location]}"


def read_openai(path: Path, state_dict: dict, device=None) -> SparseAutoencoder:
    """An ``Autoencoder.state_dict()`` (as ``Autoencoder.from_state_dict`` reads it) -> our SAE."""
    activation = state_dict["activation"]
    settings = state_dict.get("activation_state_dict") or {}
    tensors = {key: value for key, value in state_dict.items() if key not in ("activation", "activation_state_dict")}
    what = f"OpenAI Autoencoder ({path})"
    if activation == "TopK":
        for key in _TOPK_MODULE_KEYS:
            tensors.pop(key, None)
        if settings.get("postact_fn", "ReLU") != "ReLU" or not isinstance(settings.get("k"), int):
            raise UserError(
                f"{path}: expected OpenAI TopK settings {{'k': <int>, 'postact_fn': 'ReLU'}}, found {dict(settings)}"
            )
    elif activation != "ReLU":
        raise UserError(f"{path}: OpenAI activation {activation!r} is not supported; expected 'TopK' or 'ReLU'")
    sizes = sizes_from(tensors, _SHAPES, "encoder.weight", what)
    dtype = tensors["encoder.weight"].dtype
    if activation == "TopK":
        # Autoencoder.from_state_dict turns the input layer norm on exactly for TopK.
        sae = TopKSAE(sizes["D"], sizes["F"], settings["k"], input_norm=True, dtype=dtype, device=device)
    else:
        sae = _relu_sae(sizes["D"], sizes["F"], dtype, device, path)
    return copy_weights_(
        sae, tensors["encoder.weight"], tensors["latent_bias"], tensors["decoder.weight"].T, tensors["pre_bias"]
    )


def _relu_sae(d_in: int, num_latents: int, dtype, device, path: Path) -> SparseAutoencoder:
    if "relu" not in ARCHITECTURES:
        raise UserError(f"{path}: an OpenAI ReLU autoencoder needs the relu architecture, which is not available yet")
    return ARCHITECTURES["relu"].sae_class(d_in, num_latents, dtype=dtype, device=device)


def location_of_hook(hook: str | None) -> tuple[str, int]:
    """(location, layer) of our hook name in OpenAI's naming, or ``UserError``."""
    match = re.match(r"^blocks\.(\d+)\.(.+)$", hook or "")
    by_site = {site: location for location, site in LOCATIONS.items()}
    if match is None or match.group(2) not in by_site:
        raise UserError(
            f"OpenAI's layout has no location for hook {hook}; it has {', '.join(f'blocks.L.{s}' for s in by_site)}"
        )
    return by_site[match.group(2)], int(match.group(1))


def write_openai(folder: Path, sae: SparseAutoencoder, hook: str | None) -> Path:
    """``<folder>/<location>/autoencoders/<layer>.pt`` as ``torch.save(ae.state_dict())`` of OpenAI's
    ``Autoencoder`` writes it (without the TopK module's two extra keys, so it loads with strict=True).
    OpenAI's TopK always normalises its input and its ReLU never does: anything else is refused."""
    normalised = bool(getattr(sae, "input_norm", False))
    if sae.architecture == "topk" and normalised and not sae.transcoder:
        activation, settings = "TopK", OrderedDict(k=int(sae.k), postact_fn="ReLU")
    elif sae.architecture == "relu" and sae.d_out == sae.d_in:
        activation, settings = "ReLU", OrderedDict()
    elif sae.architecture == "topk" and not sae.transcoder:
        raise UserError(
            "OpenAI's TopK Autoencoder always layer-normalises its input, which this TopK SAE does not; "
            "it cannot be written as an OpenAI file"
        )
    else:
        raise UserError(
            f"OpenAI's Autoencoder holds TopK (input-normalised) and ReLU SAEs, not a {sae.architecture} SAE"
        )
    location, layer = location_of_hook(hook)
    num_latents = sae.num_latents
    state_dict = {
        "pre_bias": sae.b_dec.detach().cpu().clone(),
        "encoder.weight": sae.W_enc.detach().cpu().clone(),
        "latent_bias": sae.b_enc.detach().cpu().clone(),
        "decoder.weight": sae.W_dec.detach().cpu().T.contiguous(),
        "stats_last_nonzero": torch.zeros(num_latents, dtype=torch.int64),
        "latents_activation_frequency": torch.zeros(num_latents, dtype=sae.dtype),
        "latents_mean_square": torch.zeros(num_latents, dtype=sae.dtype),
        "activation": activation,
        "activation_state_dict": settings,
    }
    path = folder / location / "autoencoders" / f"{layer}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch_save(path, state_dict)
    return path
