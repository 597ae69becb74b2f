"""SAELens folders (``cfg.json`` + ``sae_weights.safetensors``, SAELens 6.x): read every architecture we have a
class for, write the ones SAELens's own classes hold exactly.

SAELens keeps ``W_enc`` [D, F] and ``W_dec`` [F, D] (no transposes), and its input is ``x - b_dec`` only where
``apply_b_dec_to_input`` is true. Differences of convention that are exact linear identities are folded into
the weights on reading (shared/FORMATS.md, SAELens section):
- ``apply_b_dec_to_input`` that our class does not share: ``b_enc`` absorbs ``b_dec W_enc``;
- TopK's ``rescale_acts_by_decoder_norm`` (pre-activations times the decoder row norm, codes divided by it
  before decoding): the norms go into ``W_enc`` and ``b_enc`` and out of ``W_dec``, so the codes are SAELens's;
- a saved BatchTopK (architecture "jumprelu" with one threshold repeated) is a JumpReLU SAE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dictlearn.errors import UserError
from dictlearn.files import read_json, read_safetensors, write_json
from dictlearn.formats.dictionary_learning import copy_weights_, sizes_from
from dictlearn.sae.base import SparseAutoencoder
from dictlearn.sae.gated import GatedSAE
from dictlearn.sae.jumprelu import JumpReLUSAE
from dictlearn.sae.relu import ReLUSAE
from dictlearn.sae.topk import TopKSAE

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_VERSION = "6.54.12"

_SHAPES = {"W_enc": ("D", "F"), "b_enc": ("F",), "W_dec": ("F", "D"), "b_dec": ("D",)}
_JUMPRELU_SHAPES = {**_SHAPES, "threshold": ("F",)}
_GATED_SHAPES = {
    "W_enc": ("D", "F"),
    "b_gate": ("F",),
    "b_mag": ("F",),
    "r_mag": ("F",),
    "W_dec": ("F", "D"),
    "b_dec": ("D",),
}


def model_and_hook(cfg: dict) -> tuple[str | None, str | None]:
    """``metadata.model_name`` and ``metadata.hook_name`` (SAELens 6), or the top-level fields of SAELens 5."""
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    return metadata.get("model_name") or cfg.get("model_name"), metadata.get("hook_name") or cfg.get("hook_name")


def read_saelens(folder: Path, device=None) -> tuple[SparseAutoencoder, dict]:
    """(SAE, cfg) from a SAELens folder; an architecture or option we cannot reproduce exactly is refused."""
    cfg = read_json(folder / CFG_FILE, "SAELens cfg.json")
    architecture = cfg.get("architecture", "standard")
    normalize = cfg.get("normalize_activations") or "none"
    if normalize != "none":
        raise UserError(
            f"{folder / CFG_FILE}: normalize_activations {normalize!r} is not supported (its scale is not in the "
            "files); expected 'none'"
        )
    reader = _READERS.get(architecture)
    if reader is None:
        raise UserError(
            f"{folder / CFG_FILE}: SAELens architecture {architecture!r} is not supported; "
            f"expected one of {', '.join(sorted(_READERS))}"
        )
    tensors = read_safetensors(folder / WEIGHTS_FILE, "SAELens weights")
    what = f"SAELens {architecture} ({folder / WEIGHTS_FILE})"
    with torch.no_grad():
        sae = reader(tensors, cfg, what, device)
    return sae, cfg


def _fold_input_bias_(b_enc_F: Tensor, b_dec_D: Tensor, W_enc_DF: Tensor, *, theirs: bool, ours: bool) -> None:
    """Make ``b_enc`` give the same pre-activations when the encoder subtracts ``b_dec`` from x (``ours``) where
    SAELens did not (``theirs``), or the reverse: ``pre = (x - a b_dec) W_enc + b_enc`` for a in {0, 1}."""
    if theirs != ours:
        b_enc_F.add_((float(ours) - float(theirs)) * (b_dec_D @ W_enc_DF))


def _copy_saelens_weights_(sae: SparseAutoencoder, tensors, cfg, *, subtracts_b_dec: bool, rescale: bool = False):
    """SAELens's ``W_enc`` [D, F], ``b_enc``, ``W_dec``, ``b_dec`` into ``sae``, whose encoder subtracts ``b_dec``
    from x or not (``subtracts_b_dec``), folding in what SAELens does differently (module docstring): its own
    ``apply_b_dec_to_input``, and with ``rescale`` TopK's ``rescale_acts_by_decoder_norm``. Returns ``sae``."""
    W_enc_DF, b_enc_F, W_dec_FD = tensors["W_enc"].clone(), tensors["b_enc"].clone(), tensors["W_dec"].clone()
    if rescale:
        norms_F = torch.linalg.vector_norm(W_dec_FD, dim=1)
        W_enc_DF *= norms_F
        b_enc_F *= norms_F
        W_dec_FD /= norms_F[:, None]
    theirs = cfg.get("apply_b_dec_to_input", True)
    _fold_input_bias_(b_enc_F, tensors["b_dec"], W_enc_DF, theirs=theirs, ours=subtracts_b_dec)
    return copy_weights_(sae, W_enc_DF.T, b_enc_F, W_dec_FD, tensors["b_dec"])


def _read_standard(tensors, cfg, what, device) -> ReLUSAE:
    sizes = sizes_from(tensors, _SHAPES, "W_enc", what)
    sae = ReLUSAE(sizes["D"], sizes["F"], dtype=tensors["W_enc"].dtype, device=device)
    return _copy_saelens_weights_(sae, tensors, cfg, subtracts_b_dec=True)


def _read_topk(tensors, cfg, what, device) -> TopKSAE:
    sizes = sizes_from(tensors, _SHAPES, "W_enc", what)
    k = cfg.get("k")
    if not isinstance(k, int) or isinstance(k, bool):
        raise UserError(f"{what}: cfg.json should give k as an integer, found {k!r}")
    sae = TopKSAE(sizes["D"], sizes["F"], k, dtype=tensors["W_enc"].dtype, device=device)
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    return _copy_saelens_weights_(sae, tensors, cfg, subtracts_b_dec=True, rescale=rescale)


def _read_jumprelu(tensors, cfg, what, device) -> JumpReLUSAE:
    sizes = sizes_from(tensors, _JUMPRELU_SHAPES, "W_enc", what)
    sae = JumpReLUSAE(sizes["D"], sizes["F"], dtype=tensors["W_enc"].dtype, device=device)
    _copy_saelens_weights_(sae, tensors, cfg, subtracts_b_dec=False)
    sae.threshold.copy_(tensors["threshold"])
    return sae


def _read_gated(tensors, cfg, what, device) -> GatedSAE:
    """codes = [s W_enc + b_gate > 0] * relu(s (W_enc exp(r_mag)) + b_mag): ``GatedSAE``'s rule."""
    sizes = sizes_from(tensors, _GATED_SHAPES, "W_enc", what)
    b_gate_F, b_mag_F = tensors["b_gate"].clone(), tensors["b_mag"].clone()
    theirs = cfg.get("apply_b_dec_to_input", True)
    _fold_input_bias_(b_gate_F, tensors["b_dec"], tensors["W_enc"], theirs=theirs, ours=True)
    _fold_input_bias_(b_mag_F, tensors["b_dec"], tensors["W_enc"] * tensors["r_mag"].exp(), theirs=theirs, ours=True)
    sae = GatedSAE(sizes["D"], sizes["F"], dtype=tensors["W_enc"].dtype, device=device)
    sae.W_enc.copy_(tensors["W_enc"].T)
    sae.b_gate.copy_(b_gate_F)
    sae.b_mag.copy_(b_mag_F)
    sae.r_mag.copy_(tensors["r_mag"])
    sae.W_dec.copy_(tensors["W_dec"])
    sae.b_dec.copy_(tensors["b_dec"])
    return sae


_READERS = {"standard": _read_standard, "topk": _read_topk, "jumprelu": _read_jumprelu, "gated": _read_gated}


def saelens_tensors(sae: SparseAutoencoder) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(cfg fields, tensors) of the SAELens class that holds ``sae`` exactly, or ``UserError`` in one line."""
    if getattr(sae, "transcoder", False) or getattr(sae, "input_norm", False):
        kind, why = (
            (f"a {sae.architecture} transcoder", " (its transcoders are ReLU and JumpReLU)")
            if getattr(sae, "transcoder", False)
            else ("an input-normalised (OpenAI TopK) SAE", "")
        )
        raise UserError(f"SAELens has no class that holds {kind} exactly{why}; convert it to 'ours' instead")
    if sae.architecture == "gated":
        return {"architecture": "gated", "apply_b_dec_to_input": True}, {
            "W_enc": sae.W_enc.detach().T.contiguous(),
            "b_gate": sae.b_gate.detach().clone(),
            "b_mag": sae.b_mag.detach().clone(),
            "r_mag": sae.r_mag.detach().clone(),
            "W_dec": sae.W_dec.detach().clone(),
            "b_dec": sae.b_dec.detach().clone(),
        }
    tensors = {
        "W_enc": sae.W_enc.detach().T.contiguous(),
        "b_enc": sae.b_enc.detach().clone(),
        "W_dec": sae.W_dec.detach().clone(),
        "b_dec": sae.b_dec.detach().clone(),
    }
    if sae.architecture == "relu":
        return {"architecture": "standard", "apply_b_dec_to_input": True}, tensors
    if sae.architecture == "topk":
        return {
            "architecture": "topk",
            "k": int(sae.k),
            "apply_b_dec_to_input": True,
            "rescale_acts_by_decoder_norm": False,
        }, tensors
    if sae.architecture == "jumprelu":
        return {"architecture": "jumprelu", "apply_b_dec_to_input": False}, {
            **tensors,
            "threshold": sae.threshold.detach().clone(),
        }
    if sae.architecture in ("batchtopk", "matryoshka"):
        # What SAELens's own BatchTopK save writes: its inference rule relu(h) * [h > t] with t >= 0 is ours
        # (``BatchTopKSAE.select_by_threshold`` clamps an unset threshold at 0).
        threshold = sae.threshold.detach().clamp_min(0).expand(sae.num_latents).clone()
        return {"architecture": "jumprelu", "apply_b_dec_to_input": True}, {**tensors, "threshold": threshold}
    raise UserError(f"SAELens has no class for a {sae.architecture} SAE; convert it to 'ours' instead")


def write_saelens(folder: Path, sae: SparseAutoencoder, model: str | None, hook: str | None) -> Path:
    """``cfg.json`` and ``sae_weights.safetensors`` as SAELens's ``save_model`` writes them."""
    from safetensors.torch import save_file

    fields, tensors = saelens_tensors(sae)
    cfg = {
        "d_in": sae.d_in,
        "d_sae": sae.num_latents,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "device": "cpu",
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"model_name": model, "hook_name": hook, "sae_lens_version": SAELENS_VERSION},
        **fields,
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.cpu().contiguous() for name, tensor in tensors.items()}, str(folder / WEIGHTS_FILE))
    write_json(folder / CFG_FILE, cfg)
    return folder
