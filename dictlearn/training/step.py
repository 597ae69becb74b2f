"""One optimisation step of the TopK SAE, shared by the trainer and the speed benchmark.

Shape letters: B batch rows, D input width, F latents, K latents selected per row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dictlearn.sae.losses import auxk_loss, fvu
from dictlearn.sae.topk import TopKSAE


class StepOutput(NamedTuple):
    loss: float
    """``fvu + aux_coef * auxk_loss`` before the step."""

    fvu: float
    """Fraction of variance unexplained of the batch before the step."""

    auxk_loss: float
    """AuxK loss before the step (0.0 when no latent is dead)."""

    top_indices_BK: Tensor
    """(B, K) latents each row selected, for the caller's dead-latent counters."""

    top_acts_BK: Tensor
    """(B, K) their activations (detached): a selected latent fires only where this is positive."""


def sae_step(
    sae: TopKSAE,
    optimizer: torch.optim.Optimizer,
    x_BD: Tensor,
    dead_mask_F: Tensor,
    *,
    aux_k: int,
    aux_coef: float,
    max_grad_norm: float | None,
) -> StepOutput:
    """Forward, ``loss = fvu + aux_coef * auxk``, backward, then update ``sae`` in place.

    The update follows dictionary_learning's TopK trainer and Gao et al. 2024 §A.1: project the gradient
    parallel to each decoder row out, clip the total gradient norm (skipped when ``max_grad_norm`` is None),
    ``optimizer.step()``, clear the gradients, renormalise the decoder rows. Gao et al. weight AuxK with
    ``aux_coef = 1/32`` (§A.2). The caller owns the learning-rate schedule, the dead-latent counters (from
    ``top_indices_BK``) and checkpoints.
    """
    out = sae(x_BD)
    fvu_loss = fvu(x_BD, out.x_hat)
    aux_loss = auxk_loss(sae, x_BD, out.x_hat, out.pre_acts, dead_mask_F, aux_k)
    loss = fvu_loss + aux_coef * aux_loss
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions_()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sae.set_decoder_norm_to_unit_norm_()
    return StepOutput(loss.item(), fvu_loss.item(), aux_loss.item(), out.top_indices, out.top_acts.detach())
