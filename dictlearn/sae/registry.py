"""Architecture name (``sae.architecture`` in params) -> the SAE class, how to build it, and its objective.

Nothing outside ``dictlearn.sae`` asks which class an SAE is: the trainer runs ``build_objective``'s result,
the analyses use the ``SparseAutoencoder`` interface, and ``formats`` rebuilds a class by its name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from dictlearn.errors import UserError
from dictlearn.sae.base import Objective, SparseAutoencoder
from dictlearn.sae.batchtopk import BatchTopKObjective, BatchTopKSAE
from dictlearn.sae.gated import DEFAULT_L1_COEFFICIENT as GATED_L1_COEFFICIENT
from dictlearn.sae.gated import GatedObjective, GatedSAE
from dictlearn.sae.jumprelu import JumpReLUObjective, JumpReLUSAE
from dictlearn.sae.matryoshka import MatryoshkaObjective, MatryoshkaSAE, group_sizes_from_fractions
from dictlearn.sae.relu import APRIL2024_DECODER_NORM, DEFAULT_L1_COEFFICIENT, ReLUObjective, ReLUSAE
from dictlearn.sae.topk import TopKFamilySAE, TopKObjective, TopKSAE, threshold_beta, threshold_start_step


def default_aux_k(d_in: int) -> int:
    """Gao et al. 2024, A.2: k_aux = d_model / 2."""
    return max(1, d_in // 2)


def default_lr(num_latents: int) -> float:
    """2e-4 / sqrt(num_latents / 2**14): Gao et al. 2024 (section 2.3) scale the learning rate as 1/sqrt(n);
    dictionary_learning's TopK trainer and sparsify use this form."""
    return 2e-4 / math.sqrt(num_latents / 2**14)


class Architecture(NamedTuple):
    sae_class: type[SparseAutoencoder]
    build: Callable[..., SparseAutoencoder]
    """``build(sae_params, d_in=, d_out=, num_latents=, dtype=, device=, seed=)``: a freshly initialised SAE."""

    objective: Callable[[Any, SparseAutoencoder, int], Objective]
    """``objective(sae_params, sae, total_steps)``: its training recipe."""

    default_lr: Callable[[int], float] = default_lr
    """The recipe's learning rate for ``num_latents`` latents when ``train.lr`` is unset."""


def _build_topk_family(sae_class: type[TopKFamilySAE]) -> Callable[..., SparseAutoencoder]:
    """The builder of a TopK-family class whose constructor takes (d_in, num_latents, k) and the transcoder fields."""

    def build(sae_params, *, d_in, d_out, num_latents, dtype, device, seed):
        return sae_class(
            d_in,
            num_latents,
            sae_params.k,
            d_out=d_out,
            skip_connection=sae_params.skip_connection,
            dtype=dtype,
            device=device,
            seed=seed,
        )

    return build


def _topk_objective(sae_params, sae: SparseAutoencoder, total_steps: int) -> Objective:
    start = threshold_start_step(None, total_steps)
    return TopKObjective(
        sae_params.aux_k or default_aux_k(sae.d_in),
        sae_params.aux_coef,
        start,
        threshold_beta(None, start, total_steps),
    )


def penalty_family_lr(num_latents: int) -> float:
    """1e-3 at every width, the default of dictionary_learning's StandardTrainer and StandardTrainerAprilUpdate,
    for the recipes with a sparsity penalty (ReLU, gated, JumpReLU). The April 2024 update's 5e-5, Rajamanoharan
    et al.'s 5e-5 (gated; GatedSAETrainer) and 7e-5 (JumpReLU; JumpReluTrainer) belong to runs of billions of
    tokens; in runs of a few hundred steps they leave the SAE near its initialisation (Adam moves each weight by
    about the learning rate a step), so set ``train.lr`` to them for long runs."""
    return 1e-3


def _build_relu(sae_params, *, d_in, d_out, num_latents, dtype, device, seed):
    decoder_norm = APRIL2024_DECODER_NORM if sae_params.recipe == "april2024" else 1.0
    return ReLUSAE(d_in, num_latents, decoder_norm=decoder_norm, dtype=dtype, device=device, seed=seed)


def _relu_objective(sae_params, sae: SparseAutoencoder, total_steps: int) -> Objective:
    return ReLUObjective(
        sae_params.recipe,
        sae_params.l1_coefficient or DEFAULT_L1_COEFFICIENT[sae_params.recipe],
        sae_params.l1_warmup_fraction,
        total_steps,
        resample_every=sae_params.resample_every,
        resample_rows=sae_params.resample_rows,
    )


def _build_gated(sae_params, *, d_in, d_out, num_latents, dtype, device, seed):
    return GatedSAE(d_in, num_latents, dtype=dtype, device=device, seed=seed)


def _gated_objective(sae_params, sae: SparseAutoencoder, total_steps: int) -> Objective:
    return GatedObjective(sae_params.l1_coefficient or GATED_L1_COEFFICIENT, sae_params.l1_warmup_fraction, total_steps)


def _batchtopk_objective_kwargs(sae_params, sae: SparseAutoencoder, total_steps: int) -> dict[str, Any]:
    start = threshold_start_step(sae_params.threshold_start_fraction, total_steps)
    return {
        "aux_k": sae_params.aux_k or default_aux_k(sae.d_in),
        "aux_coef": sae_params.aux_coef,
        "threshold_beta": threshold_beta(sae_params.threshold_beta, start, total_steps),
        "threshold_start_step": start,
    }


def _batchtopk_objective(sae_params, sae: SparseAutoencoder, total_steps: int) -> Objective:
    return BatchTopKObjective(**_batchtopk_objective_kwargs(sae_params, sae, total_steps))


# dictionary_learning's example (its README and demo): 1/32, 1/16, 1/8, 1/4 of the latents, the rest last.
DEFAULT_GROUP_FRACTIONS = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32]


def _group_fractions(sae_params) -> list[float]:
    return list(sae_params.group_fractions or DEFAULT_GROUP_FRACTIONS)


def _build_matryoshka(sae_params, *, d_in, d_out, num_latents, dtype, device, seed):
    return MatryoshkaSAE(
        d_in,
        num_latents,
        sae_params.k,
        group_sizes_from_fractions(num_latents, _group_fractions(sae_params)),
        d_out=d_out,
        skip_connection=sae_params.skip_connection,
        dtype=dtype,
        device=device,
        seed=seed,
    )


def _matryoshka_objective(sae_params, sae: SparseAutoencoder, total_steps: int) -> Objective:
    num_groups = len(sae.group_sizes)
    # dictionary_learning's default weights: 1 / G each.
    weights = list(sae_params.group_weights or [1 / num_groups] * num_groups)
    if len(weights) != num_groups:
        raise UserError(f"sae.group_weights: expected {num_groups} weights (one per group), found {len(weights)}")
    return MatryoshkaObjective(weights, **_batchtopk_objective_kwargs(sae_params, sae, total_steps))


def _build_jumprelu(sae_params, *, d_in, d_out, num_latents, dtype, device, seed):
    return JumpReLUSAE(
        d_in, num_latents, initial_threshold=sae_params.initial_threshold, dtype=dtype, device=device, seed=seed
    )


def _jumprelu_objective(sae_params, sae: SparseAutoencoder, total_steps: int) -> Objective:
    return JumpReLUObjective(
        sae_params.l0_coefficient, sae_params.bandwidth, int(sae_params.l0_warmup_fraction * total_steps)
    )


ARCHITECTURES: dict[str, Architecture] = {
    "topk": Architecture(TopKSAE, _build_topk_family(TopKSAE), _topk_objective),
    "batchtopk": Architecture(BatchTopKSAE, _build_topk_family(BatchTopKSAE), _batchtopk_objective),
    "matryoshka": Architecture(MatryoshkaSAE, _build_matryoshka, _matryoshka_objective),
    "relu": Architecture(ReLUSAE, _build_relu, _relu_objective, penalty_family_lr),
    "gated": Architecture(GatedSAE, _build_gated, _gated_objective, penalty_family_lr),
    "jumprelu": Architecture(JumpReLUSAE, _build_jumprelu, _jumprelu_objective, penalty_family_lr),
}


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise UserError(f"unknown SAE architecture {name!r}; expected one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def build_sae(
    sae_params,
    *,
    d_in: int,
    d_out: int | None,
    num_latents: int,
    device: torch.device | str | None = None,
    seed: int | None = None,
) -> SparseAutoencoder:
    """A new SAE of ``sae_params.architecture`` with its own initialisation."""
    build = architecture(sae_params.architecture).build
    dtype = getattr(torch, sae_params.dtype)
    return build(sae_params, d_in=d_in, d_out=d_out, num_latents=num_latents, dtype=dtype, device=device, seed=seed)


def build_objective(sae_params, sae: SparseAutoencoder, total_steps: int) -> Objective:
    return architecture(sae_params.architecture).objective(sae_params, sae, total_steps)


def sae_from_state_dict(
    name: str, config: dict[str, Any], state_dict: dict[str, torch.Tensor], device: torch.device | str | None = None
) -> SparseAutoencoder:
    """Rebuild an SAE of architecture ``name`` from its ``config()`` and ``state_dict()``."""
    return architecture(name).sae_class.from_state_dict(config, state_dict, device=device)
