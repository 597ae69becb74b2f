"""saprmarks/dictionary_learning's state dicts (``ae.pt``): one converter per architecture both ways.

The class is named by ``config.json``'s ``trainer.dict_class``, never guessed from the keys; each converter
checks every key and shape it needs and refuses anything else in one line (``UserError``). Key layouts are
dictionary_learning 0.1.0's (``dictionary.py``, ``trainers/*.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from dictlearn.errors import UserError
from dictlearn.sae.base import SparseAutoencoder
from dictlearn.sae.batchtopk import BatchTopKSAE
from dictlearn.sae.gated import GatedSAE
from dictlearn.sae.jumprelu import JumpReLUSAE
from dictlearn.sae.matryoshka import MatryoshkaSAE
from dictlearn.sae.relu import ReLUSAE
from dictlearn.sae.topk import TopKSAE


def check_keys(state_dict: Mapping[str, Tensor], shapes: Mapping[str, tuple[str, ...]], what: str) -> None:
    """Exactly the keys of ``shapes``, each a tensor."""
    expected, found = sorted(shapes), sorted(state_dict) if isinstance(state_dict, Mapping) else []
    if found != expected:
        hint = " (a mid-training backup? its 'ae' entry is the state dict)" if "ae" in found else ""
        raise UserError(f"not a {what} state dict: expected keys {expected}, found {found}{hint}")
    not_tensors = [key for key in expected if not isinstance(state_dict[key], Tensor)]
    if not_tensors:
        raise UserError(f"not a {what} state dict: {', '.join(not_tensors)} should be tensors")


def sizes_from(
    state_dict: Mapping[str, Tensor], shapes: Mapping[str, tuple[str, ...]], key: str, what: str
) -> dict[str, int]:
    """The keys checked, then every shape checked against the sizes the 2-D ``key`` gives its letters."""
    check_keys(state_dict, shapes, what)
    weight = state_dict[key]
    if weight.ndim != 2:
        raise UserError(f"{what} state dict: {key} should be 2-D {list(shapes[key])}, found shape {list(weight.shape)}")
    sizes = dict(zip(shapes[key], weight.shape))
    for name, letters in shapes.items():
        want = tuple(sizes[letter] for letter in letters)
        if tuple(state_dict[name].shape) != want:
            sizes_text = ", ".join(f"{letter}={size}" for letter, size in sizes.items())
            raise UserError(
                f"{what} state dict: {name} should have shape {list(want)} ({sizes_text}), "
                f"found {list(state_dict[name].shape)}"
            )
    return sizes


def copy_weights_(
    sae: SparseAutoencoder, W_enc_FD: Tensor, b_enc_F: Tensor, W_dec_FD: Tensor, b_dec_D: Tensor
) -> SparseAutoencoder:
    """Set the four parameters every SAE with an encoder bias has, given in our layout (``W_enc`` and ``W_dec``
    (F, D)): what each format's reader does once it has its tensors in that layout. Returns ``sae``."""
    with torch.no_grad():
        sae.W_enc.copy_(W_enc_FD)
        sae.b_enc.copy_(b_enc_F)
        sae.W_dec.copy_(W_dec_FD)
        sae.b_dec.copy_(b_dec_D)
    return sae


class Converter(NamedTuple):
    dict_class: str
    """dictionary_learning's class name, as in ``config.json``'s ``trainer.dict_class``."""

    to_state_dict: Callable[[SparseAutoencoder], dict[str, Tensor]]
    from_state_dict: Callable[[Mapping[str, Tensor], dict[str, Any], torch.device | str | None], SparseAutoencoder]
    holds: Callable[[SparseAutoencoder], bool] = lambda sae: True
    """Whether the class, as its loader reads the file back, gives this particular SAE's codes."""


# AutoEncoderTopK: encoder = nn.Linear(D, F), decoder = nn.Linear(F, D, bias=False), b_dec, buffers k, threshold.
_TOPK_SHAPES = {
    "encoder.weight": ("F", "D"),
    "encoder.bias": ("F",),
    "decoder.weight": ("D", "F"),
    "b_dec": ("D",),
    "k": (),
    "threshold": (),
}


def topk_to_state_dict(sae: SparseAutoencoder) -> dict[str, Tensor]:
    """dictionary_learning's ``AutoEncoderTopK`` keys, detached copies; ``threshold`` is the running estimate
    our ``TopKObjective`` keeps as that library's ``TopKTrainer`` does (-1 before its start step)."""
    return {
        "encoder.weight": sae.W_enc.detach().clone(),
        "encoder.bias": sae.b_enc.detach().clone(),
        "decoder.weight": sae.W_dec.detach().T.contiguous(),
        "b_dec": sae.b_dec.detach().clone(),
        "k": sae.k.detach().clone(),
        "threshold": sae.threshold.detach().clone(),
    }


def topk_layout_reader(sae_class: type[TopKSAE], dict_class: str):
    """The reader of a class with ``AutoEncoderTopK``'s keys (``AutoEncoderTopK``, ``BatchTopKSAE``) into
    ``sae_class``; ``threshold`` is kept (written back on export). Our TopK does not encode with it:
    ``AutoEncoderTopK.encode`` selects per row by default; BatchTopK's inference does."""

    def read(state_dict, trainer: dict[str, Any], device=None) -> TopKSAE:
        what = f"dictionary_learning {dict_class}"
        sizes = sizes_from(state_dict, _TOPK_SHAPES, "encoder.weight", what)
        dtype = state_dict["encoder.weight"].dtype
        sae = sae_class(sizes["D"], sizes["F"], int(state_dict["k"]), dtype=dtype, device=device)
        copy_weights_(
            sae,
            state_dict["encoder.weight"],
            state_dict["encoder.bias"],
            state_dict["decoder.weight"].T,
            state_dict["b_dec"],
        )
        with torch.no_grad():
            sae.threshold.copy_(state_dict["threshold"])
        return sae

    return read


topk_from_state_dict = topk_layout_reader(TopKSAE, "AutoEncoderTopK")


# --- L1 family: ReLU (AutoEncoder) and gated (GatedAutoEncoder) ---


def unit_norm_decoder(sae: SparseAutoencoder, atol: float = 1e-5) -> bool:
    """Whether every decoder row has unit norm (to ``atol``, float32 renormalisation's own error is ~1e-7)."""
    norms_F = torch.linalg.vector_norm(sae.W_dec.detach().float(), dim=1)
    return bool(torch.allclose(norms_F, torch.ones_like(norms_F), rtol=0, atol=atol))


# AutoEncoder: bias = the tied pre-encoder/decoder bias, encoder = nn.Linear(D, F), decoder = nn.Linear(F, D,
# bias=False).
_RELU_SHAPES = {"bias": ("D",), "encoder.weight": ("F", "D"), "encoder.bias": ("F",), "decoder.weight": ("D", "F")}


def relu_to_state_dict(sae: SparseAutoencoder) -> dict[str, Tensor]:
    """dictionary_learning's ``AutoEncoder`` keys, detached copies. Only for unit-norm decoder rows (bricken2023):
    ``AutoEncoder.from_pretrained`` renormalises the decoder columns on load (``normalize_decoder=True``),
    moving the norms into the encoder, which would keep x_hat but change the codes of an april2024 SAE. So
    ``holds`` refuses those, and the run folder saves them in our own layout instead."""
    return {
        "bias": sae.b_dec.detach().clone(),
        "encoder.weight": sae.W_enc.detach().clone(),
        "encoder.bias": sae.b_enc.detach().clone(),
        "decoder.weight": sae.W_dec.detach().T.contiguous(),
    }


def relu_from_state_dict(state_dict, trainer: dict[str, Any], device=None) -> ReLUSAE:
    """``AutoEncoder`` -> ``ReLUSAE``: codes = relu((x - bias) W_enc^T + encoder.bias), x_hat = codes W_dec + bias.
    The decoder is read as it is stored (a file written by dictionary_learning has unit-norm columns)."""
    what = "dictionary_learning AutoEncoder"
    sizes = sizes_from(state_dict, _RELU_SHAPES, "encoder.weight", what)
    sae = ReLUSAE(sizes["D"], sizes["F"], dtype=state_dict["encoder.weight"].dtype, device=device)
    return copy_weights_(
        sae,
        state_dict["encoder.weight"],
        state_dict["encoder.bias"],
        state_dict["decoder.weight"].T,
        state_dict["bias"],
    )


# GatedAutoEncoder: encoder = nn.Linear(D, F, bias=False) (W_gate), decoder = nn.Linear(F, D, bias=False),
# decoder_bias, r_mag, gate_bias, mag_bias.
_GATED_SHAPES = {
    "encoder.weight": ("F", "D"),
    "decoder.weight": ("D", "F"),
    "decoder_bias": ("D",),
    "r_mag": ("F",),
    "gate_bias": ("F",),
    "mag_bias": ("F",),
}


def gated_to_state_dict(sae: SparseAutoencoder) -> dict[str, Tensor]:
    """dictionary_learning's ``GatedAutoEncoder`` keys, detached copies (its 0.1.0 encode and decode use the
    decoder as stored; later commits divide the codes by the decoder norms, the same codes for the unit-norm
    rows our gated objective keeps, which ``holds`` checks)."""
    return {
        "encoder.weight": sae.W_enc.detach().clone(),
        "decoder.weight": sae.W_dec.detach().T.contiguous(),
        "decoder_bias": sae.b_dec.detach().clone(),
        "r_mag": sae.r_mag.detach().clone(),
        "gate_bias": sae.b_gate.detach().clone(),
        "mag_bias": sae.b_mag.detach().clone(),
    }


def gated_from_state_dict(state_dict, trainer: dict[str, Any], device=None) -> GatedSAE:
    """``GatedAutoEncoder`` -> ``GatedSAE``: with e = (x - decoder_bias) W_enc^T,
    codes = [e + gate_bias > 0] * relu(exp(r_mag) * e + mag_bias), x_hat = codes W_dec + decoder_bias."""
    what = "dictionary_learning GatedAutoEncoder"
    sizes = sizes_from(state_dict, _GATED_SHAPES, "encoder.weight", what)
    sae = GatedSAE(sizes["D"], sizes["F"], dtype=state_dict["encoder.weight"].dtype, device=device)
    with torch.no_grad():
        sae.W_enc.copy_(state_dict["encoder.weight"])
        sae.W_dec.copy_(state_dict["decoder.weight"].T)
        sae.b_dec.copy_(state_dict["decoder_bias"])
        sae.r_mag.copy_(state_dict["r_mag"])
        sae.b_gate.copy_(state_dict["gate_bias"])
        sae.b_mag.copy_(state_dict["mag_bias"])
    return sae


# Our architecture name -> its dictionary_learning class. An SAE this table cannot hold exactly (a transcoder)
# is saved in our own layout instead (``dictlearn.formats.run_folder``).
CONVERTERS: dict[str, Converter] = {
    "topk": Converter("AutoEncoderTopK", topk_to_state_dict, topk_from_state_dict),
    "relu": Converter("AutoEncoder", relu_to_state_dict, relu_from_state_dict, unit_norm_decoder),
    "gated": Converter("GatedAutoEncoder", gated_to_state_dict, gated_from_state_dict, unit_norm_decoder),
}
BY_DICT_CLASS: dict[str, Converter] = {converter.dict_class: converter for converter in CONVERTERS.values()}


def holds_exactly(sae: SparseAutoencoder) -> bool:
    """Whether dictionary_learning has a class that gives this SAE's codes (transcoders and input-normalised SAEs:
    none; a ReLU SAE whose decoder rows are not unit-norm: none, see ``relu_to_state_dict``)."""
    return (
        sae.architecture in CONVERTERS
        and sae.d_out == sae.d_in
        and not getattr(sae, "transcoder", False)
        and not getattr(sae, "input_norm", False)
        and CONVERTERS[sae.architecture].holds(sae)
    )


def to_dictionary_learning(sae: SparseAutoencoder) -> tuple[str, dict[str, Tensor]]:
    """(dict_class, state dict) as dictionary_learning saves this SAE."""
    converter = CONVERTERS[sae.architecture]
    return converter.dict_class, converter.to_state_dict(sae)


def from_dictionary_learning(
    dict_class: str, state_dict: Mapping[str, Tensor], trainer: dict[str, Any], device=None
) -> SparseAutoencoder:
    if dict_class not in BY_DICT_CLASS:
        raise UserError(
            f"dictionary_learning class {dict_class!r} is not supported; supported: {', '.join(sorted(BY_DICT_CLASS))}"
        )
    return BY_DICT_CLASS[dict_class].from_state_dict(state_dict, trainer, device)


# --- BatchTopK, Matryoshka and JumpReLU ---

# BatchTopKSAE has AutoEncoderTopK's keys and layout; ``threshold`` is its inference threshold.


batchtopk_from_state_dict = topk_layout_reader(BatchTopKSAE, "BatchTopKSAE")


# MatryoshkaBatchTopKSAE: nn.Parameters W_enc [D, F], W_dec [F, D]; buffers k, threshold, group_sizes [G].
_MATRYOSHKA_SHAPES = {
    "W_enc": ("D", "F"),
    "b_enc": ("F",),
    "W_dec": ("F", "D"),
    "b_dec": ("D",),
    "k": (),
    "threshold": (),
    "group_sizes": ("G",),
}


def matryoshka_to_state_dict(sae: SparseAutoencoder) -> dict[str, Tensor]:
    return {
        "W_enc": sae.W_enc.detach().T.contiguous(),
        "b_enc": sae.b_enc.detach().clone(),
        "W_dec": sae.W_dec.detach().clone(),
        "b_dec": sae.b_dec.detach().clone(),
        "k": sae.k.detach().clone(),
        "threshold": sae.threshold.detach().clone(),
        "group_sizes": sae.group_sizes.detach().clone(),
    }


def matryoshka_from_state_dict(state_dict, trainer: dict[str, Any], device=None) -> MatryoshkaSAE:
    """``MatryoshkaBatchTopKSAE`` -> ``MatryoshkaSAE``; the groups come from the ``group_sizes`` buffer, as that
    library's ``from_pretrained`` reads them."""
    what = "dictionary_learning MatryoshkaBatchTopKSAE"
    check_keys(state_dict, _MATRYOSHKA_SHAPES, what)
    group_sizes = state_dict["group_sizes"]
    if group_sizes.ndim != 1 or group_sizes.is_floating_point():
        raise UserError(
            f"{what} state dict: group_sizes should be 1-D integers, found {group_sizes.dtype} {list(group_sizes.shape)}"
        )
    weights = {key: value for key, value in state_dict.items() if key != "group_sizes"}
    shapes = {key: value for key, value in _MATRYOSHKA_SHAPES.items() if key != "group_sizes"}
    sizes = sizes_from(weights, shapes, "W_enc", what)
    sae = MatryoshkaSAE(
        sizes["D"],
        sizes["F"],
        int(state_dict["k"]),
        group_sizes.tolist(),
        dtype=state_dict["W_enc"].dtype,
        device=device,
    )
    sae.load_state_dict({**state_dict, "W_enc": state_dict["W_enc"].T})
    return sae


# JumpReluAutoEncoder: W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], threshold [F] (all nn.Parameters).
# Its ``apply_b_dec_to_input`` is a plain attribute, False and not saved: the encoder does not subtract b_dec.
_JUMPRELU_SHAPES = {"W_enc": ("D", "F"), "b_enc": ("F",), "W_dec": ("F", "D"), "b_dec": ("D",), "threshold": ("F",)}


def jumprelu_to_state_dict(sae: SparseAutoencoder) -> dict[str, Tensor]:
    return {
        "W_enc": sae.W_enc.detach().T.contiguous(),
        "b_enc": sae.b_enc.detach().clone(),
        "W_dec": sae.W_dec.detach().clone(),
        "b_dec": sae.b_dec.detach().clone(),
        "threshold": sae.threshold.detach().clone(),
    }


def jumprelu_from_state_dict(state_dict, trainer: dict[str, Any], device=None) -> JumpReLUSAE:
    what = "dictionary_learning JumpReluAutoEncoder"
    sizes = sizes_from(state_dict, _JUMPRELU_SHAPES, "W_enc", what)
    sae = JumpReLUSAE(sizes["D"], sizes["F"], dtype=state_dict["W_enc"].dtype, device=device)
    sae.load_state_dict({**state_dict, "W_enc": state_dict["W_enc"].T})
    return sae


CONVERTERS |= {
    "batchtopk": Converter("BatchTopKSAE", topk_to_state_dict, batchtopk_from_state_dict),
    "matryoshka": Converter("MatryoshkaBatchTopKSAE", matryoshka_to_state_dict, matryoshka_from_state_dict),
    "jumprelu": Converter("JumpReluAutoEncoder", jumprelu_to_state_dict, jumprelu_from_state_dict),
}
BY_DICT_CLASS |= {converter.dict_class: converter for converter in CONVERTERS.values()}

# --- end of BatchTopK, Matryoshka and JumpReLU ---
