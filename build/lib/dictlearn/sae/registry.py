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
from dictlearn.sae.topk import TopKObjective, TopKSAE


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


def _build_topk(sae_params, *, d_in, d_out, num_latents, dtype, device, seed):
    return TopKSAE(
        d_in,
        num_latents,
        sae_params.k,
        d_out=d_out,
        skip_connection=sae_params.skip_connection,
        dtype=dtype,
        device=device,
        seed=seed,
    )


def _topk_objective(sae_params, sae: SparseAutoencoder, total_steps: int) -> Objective:
    return TopKObjective(sae_params.aux_k or default_aux_k(sae.d_in), sae_params.aux_coef)


ARCHITECTURES: dict[str, Architecture] = {
    "topk": Architecture(TopKSAE, _build_topk, _topk_objective),
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
