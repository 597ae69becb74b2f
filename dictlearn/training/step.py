"""One optimisation step of any SAE under its objective, shared by the trainer and the speed benchmarks; and
the rule that sets the gradient's scale before the optimiser sees it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from torch import Tensor

from dictlearn.sae.base import Objective, SparseAutoencoder, SparseCodes, StepContext

if TYPE_CHECKING:  # an annotation only: one step needs no process group, nor the LM loading it imports
    from dictlearn.training.distributed import Distributed

GradientNormalization = Literal["unit", "running", "none"]


class GradientRule:
    """Sets the global gradient norm before clipping and the optimiser step (``train.grad_normalization``).

    - ``unit`` (the default): every step's gradient is rescaled to norm 1. Adam divides by the root of an
      average of past squared gradients (beta2 0.999: about 1,000 steps of memory), and an FVU-scaled TopK
      gradient falls from about 0.84 at initialisation to about 0.02 a few dozen steps later, so without
      normalisation the large early gradients keep every later update small. dictionary_learning's
      ``TopKTrainer`` gets the same effect without saying so: it clips the gradient of its raw (unnormalised)
      MSE at 1.0, and that gradient is far above 1 on every step, so its Adam always sees unit-norm gradients;
      with its clip removed it falls from FVU 0.087 to 0.107. ``bench/recipe.py`` (SmolLM2-135M layer-6
      residual, 4,608 latents, k 32, 208 steps of 4,096 rows, lr 3.77e-4, the same rows for every variant)
      measured held-out FVU 0.105 when clipping at 1.0 (which never acts here), 0.084 when clipping at 1e-3
      (acts on every step, but the threshold depends on the activations' scale), 0.083 with ``unit``, against
      0.087 for dictionary_learning 0.1.0's ``TopKTrainer`` on the same rows in the same order; at 416 steps
      (two passes) ``unit`` reached 0.069 against 0.080 unnormalised.
    - ``running``: the norm is clipped to a running average (EMA, ``RUNNING_BETA``) of the norms the previous
      steps were given (it starts at the first norm). That cuts spikes without a fixed threshold but not a
      norm that falls: it measured 0.106, no better than no clipping.
    - ``none``: left as it is (``max_grad_norm`` alone then limits it).
    """

    RUNNING_BETA = 0.9

    def __init__(self, normalization: GradientNormalization = "unit") -> None:
        self.normalization = normalization
        self.running_norm: float | None = None

    @torch.no_grad()
    def apply_(self, parameters: Iterable[Tensor]) -> None:
        if self.normalization == "none":
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        norm = float(torch.nn.utils.get_total_norm(grads))
        if not norm > 0.0:  # zero, or not finite: leave it for the divergence check to see
            return
        target = 1.0 if self.normalization == "unit" else min(norm, self.running_norm or norm)
        torch._foreach_mul_(grads, target / norm)
        if self.normalization == "running":
            beta = self.RUNNING_BETA
            self.running_norm = target if self.running_norm is None else beta * self.running_norm + (1 - beta) * target

    def state_dict(self) -> dict:
        return {"normalization": self.normalization, "running_norm": self.running_norm}

    def load_state_dict(self, state: dict) -> None:
        self.running_norm = state["running_norm"]


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
    gradient_rule: GradientRule | None = None,
    distributed: Distributed | None = None,
) -> StepOutput:
    """Loss, backward, the objective's gradient surgery, the gradient rule (none when ``gradient_rule`` is
    None), clipping (skipped when ``max_grad_norm`` is None), the optimiser step, then the objective's
    constraints: ``sae`` is updated in place. The caller owns the learning-rate schedule, the dead-latent
    counters (from ``codes``), scheduled events and checkpoints.

    With ``distributed`` (data-parallel ranks, each holding its share of the global batch in ``x_BD``) the
    gradients are averaged over the ranks right after ``backward``, so the surgery, the gradient rule, clipping
    and Adam see the same gradient on every rank: the global batch's, since each rank's loss is its share of
    a per-row mean with the normalisers the objective reduces over ``ctx.ranks``. Loss and terms stay local."""
    out = objective.loss(sae, x_BD, y_BD, ctx)
    out.loss.backward()
    if distributed is not None:
        distributed.average_(p.grad for p in sae.parameters() if p.grad is not None)
    objective.before_optimizer_step(sae)
    if gradient_rule is not None:
        gradient_rule.apply_(sae.parameters())
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        objective.after_optimizer_step(sae, out, ctx)
    return StepOutput(out.loss.item(), {name: value.item() for name, value in out.terms.items()}, out.codes)
