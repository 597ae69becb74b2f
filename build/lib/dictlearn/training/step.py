"""One optimisation step of any SAE under its objective, shared by the trainer and the speed benchmarks."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dictlearn.sae.base import Objective, SparseAutoencoder, SparseCodes, StepContext


class StepOutput(NamedTuple):
    loss: float
    """The objective's loss before the step."""

    terms: dict[str, float]
    """Its named terms (``fvu`` always), before the step."""

    codes: SparseCodes
    """The batch's codes (detached), for the caller's dead-latent counters."""


def train_step(
    sae: SparseAutoencoder,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    x_BD: Tensor,
    y_BD: Tensor,
    ctx: StepContext,
    *,
    max_grad_norm: float | None,
) -> StepOutput:
    """Loss, backward, the objective's gradient surgery, clipping (skipped when ``max_grad_norm`` is None), the
    optimiser step, then the objective's constraints: ``sae`` is updated in place. The caller owns the
    learning-rate schedule, the dead-latent counters (from ``codes``), scheduled events and checkpoints."""
    out = objective.loss(sae, x_BD, y_BD, ctx)
    out.loss.backward()
    objective.before_optimizer_step(sae)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        objective.after_optimizer_step(sae, out, ctx)
    return StepOutput(out.loss.item(), {name: value.item() for name, value in out.terms.items()}, out.codes)
