"""The L1 ReLU sparse autoencoder (Bricken et al. 2023, "Towards Monosemanticity") and its objective, with two
recipes: ``bricken2023`` (unit-norm decoder, L1 on the codes, neuron resampling) and ``april2024`` (Anthropic's
"Circuits Updates - April 2024", "Training SAEs": L1 weighted by decoder norms, no constraint, no resampling).

Shape letters are the package's (see ``dictlearn``); N counts the latents an event touches.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dictlearn.sae.base import (
    DenseCodeSAE,
    EventContext,
    LossOutput,
    Objective,
    SparseCodes,
    StepContext,
    dense_to_codes,
)
from dictlearn.sae.losses import fvu, l1_penalty, squared_error
from dictlearn.sae.topk import geometric_median, remove_parallel_gradient_, unit_norm_rows_

Recipe = Literal["bricken2023", "april2024"]

# Default L1 coefficients, for inputs scaled to E||x||^2 = d_in (``Objective.normalize_inputs``) and the loss
# ``sum_D (x - x_hat)^2`` averaged over rows. April 2024 update, "Training SAEs": lambda = 5 with that scaling
# and the decoder-norm-weighted penalty ``lambda * f_i * ||W_dec,i||``, on decoder rows that start at norm 0.1
# (``APRIL2024_DECODER_NORM``): 0.5 per unit of activation at initialisation. bricken2023 keeps its decoder rows
# at norm 1, so its lambda is 0.5 for the same penalty per unit of activation (dictionary_learning's
# StandardTrainer default, 0.1, belongs to its unscaled inputs). With 5 as well, on SmolLM2-135M
# blocks.6.hook_resid_post (4608 latents, lr 1e-3, batch 4096, 100 steps) bricken2023 collapsed to held-out L0
# 1.3 and FVU 0.50 (``bench/architectures.py``).
DEFAULT_L1_COEFFICIENT: dict[str, float] = {"bricken2023": 0.5, "april2024": 5.0}

# April 2024 update, "Training SAEs": decoder columns start in random directions with a fixed L2 norm of
# 0.05 to 1 ("we use 0.1"), the encoder as the decoder's transpose, zero biases.
APRIL2024_DECODER_NORM = 0.1

# Bricken et al. 2023, appendix "Neuron Resampling": a resampled latent's encoder row is the sampled input's
# direction times 0.2 times the mean encoder-row norm of the alive latents.
RESAMPLE_ENCODER_SCALE = 0.2


def penalty_warmup(step: int, total_steps: int, fraction: float) -> float:
    """The factor on a sparsity coefficient at ``step``: linear from 0 over the first ``fraction`` of the run,
    then 1 (April 2024 update: lambda warmed up over the first 5% of training; dictionary_learning's
    ``get_sparsity_warmup_fn`` has the same shape, ``min(step / warmup_steps, 1)``)."""
    warmup_steps = int(fraction * total_steps)
    return 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)


class ReLUSAE(DenseCodeSAE):
    """``f = relu(W_enc (x - b_dec) + b_enc)``, ``x_hat = f W_dec + b_dec`` with ``W_enc`` and ``W_dec`` (F, D):
    the pre-encoder bias is tied to the decoder bias (Bricken et al. 2023, "Problem setup"). The tied
    initialisation (``DenseCodeSAE``) draws decoder rows of norm ``decoder_norm``: 1 for bricken2023 (as
    dictionary_learning's AutoEncoder), 0.1 for april2024."""

    architecture = "relu"

    def pre_activations(self, x_BD: Tensor) -> Tensor:
        """(B, F) ``W_enc (x - b_dec) + b_enc``, differentiable."""
        return torch.addmm(self.b_enc, x_BD - self.b_dec, self.W_enc.T)

    def encode(self, x_BD: Tensor) -> SparseCodes:
        pre_acts_BF = self.pre_activations(x_BD)
        return dense_to_codes(F.relu(pre_acts_BF), pre_acts_BF.detach())

    @torch.no_grad()
    def resample_latents_(self, latents_N: Tensor, inputs_ND: Tensor, alive_F: Tensor) -> None:
        """Bricken et al. 2023, appendix "Neuron Resampling", for the latents ``latents_N`` with one sampled
        input each: decoder row = the input's direction; encoder row = that direction times 0.2 times the mean
        encoder-row norm of the ``alive_F`` latents; encoder bias 0. No other latent changes.

        The direction is the input as the encoder sees it, ``x - b_dec`` (the pre-encoder bias is tied to the
        decoder's), as SAELens's first resampler did (``resample_neurons`` in ``sae_training/sparse_autoencoder.py``,
        "replacement_values = (x - self.b_dec)"); dictionary_learning and ai-safety-foundation/sparse_autoencoder
        take the raw input. On residual streams the raw inputs share a large mean direction, so raw directions
        add up: on SmolLM2-135M blocks.6.hook_resid_post (16x, L1 2, 216 latents resampled at step 125) the new
        decoder rows had mean pairwise cosine 0.46 raw and 0.07 centred, and the FVU just after resampling was
        77 raw against 0.70 centred (before: 0.15).
        """
        directions_ND = F.normalize(inputs_ND.to(self.dtype) - self.b_dec, dim=1)
        alive_norm = torch.linalg.vector_norm(self.W_enc[alive_F], dim=1).mean() if alive_F.any() else 1.0
        self.W_dec[latents_N] = directions_ND
        self.W_enc[latents_N] = directions_ND * (RESAMPLE_ENCODER_SCALE * alive_norm)
        self.b_enc[latents_N] = 0


@torch.no_grad()
def reset_adam_rows_(optimizer: torch.optim.Optimizer, parameter: Tensor, rows: Tensor) -> None:
    """Zero Adam's first and second moments of ``parameter``'s entries ``rows`` (along dim 0), leaving every other
    entry and the step count as they are; nothing to do before the first step."""
    state = optimizer.state.get(parameter)
    if not state:
        return
    for name in ("exp_avg", "exp_avg_sq"):
        if name in state:
            state[name][rows] = 0


class ReLUObjective(Objective):
    """``loss = sum_D (x - x_hat)^2 + lambda(t) * penalty``, averaged over rows, with ``lambda(t)`` warmed up
    linearly over ``l1_warmup_fraction`` of the steps.

    - ``bricken2023`` (Bricken et al. 2023, "Problem setup" and appendix "Autoencoder" details): penalty
      ``sum_F f``; decoder rows kept unit-norm (the gradient's parallel part removed before each step, the
      rows renormalised after it); ``b_dec`` starts at the geometric median of a sample; every
      ``resample_every`` steps the dead latents are resampled (appendix "Neuron Resampling").
    - ``april2024`` (April 2024 update, "Training SAEs"): penalty ``sum_F f * ||W_dec,F||``, no norm
      constraint, no resampling, the small-norm tied initialisation (``APRIL2024_DECODER_NORM``), zero biases.

    Both train on inputs scaled to ``E||x||^2 = d_in`` (``normalize_inputs``).
    """

    normalize_inputs = True

    def __init__(
        self,
        recipe: Recipe,
        l1_coefficient: float,
        l1_warmup_fraction: float,
        total_steps: int,
        *,
        resample_every: int | None = None,
        resample_rows: int = 16384,
    ) -> None:
        self.recipe = recipe
        self.l1_coefficient = l1_coefficient
        self.l1_warmup_fraction = l1_warmup_fraction
        self.total_steps = total_steps
        self.resample_every = resample_every if recipe == "bricken2023" else None
        self.resample_rows = resample_rows

    def coefficient(self, step: int) -> float:
        return self.l1_coefficient * penalty_warmup(step, self.total_steps, self.l1_warmup_fraction)

    def loss(self, sae: ReLUSAE, x_BD: Tensor, y_BD: Tensor, ctx: StepContext) -> LossOutput:
        pre_acts_BF = sae.pre_activations(x_BD)
        acts_BF = F.relu(pre_acts_BF)
        # Dense decode: the (B, F) code is dense in training, and the L1 gradient needs every entry anyway.
        x_hat_BD = torch.addmm(sae.b_dec, acts_BF, sae.W_dec)
        mse = squared_error(y_BD, x_hat_BD)
        decoder_norms_F = torch.linalg.vector_norm(sae.W_dec, dim=1) if self.recipe == "april2024" else None
        penalty = l1_penalty(acts_BF, decoder_norms_F)
        coefficient = self.coefficient(ctx.step)
        terms = {
            "fvu": fvu(y_BD, x_hat_BD, ctx.ranks).detach(),
            "mse": mse.detach(),
            "l1": penalty.detach(),
            "l1_coefficient": torch.tensor(coefficient),
        }
        return LossOutput(mse + coefficient * penalty, terms, dense_to_codes(acts_BF.detach(), pre_acts_BF.detach()))

    def before_optimizer_step(self, sae: ReLUSAE) -> None:
        if self.recipe == "bricken2023":
            remove_parallel_gradient_(sae.W_dec)

    def after_optimizer_step(self, sae: ReLUSAE, out: LossOutput, ctx: StepContext) -> None:
        if self.recipe == "bricken2023":
            unit_norm_rows_(sae.W_dec)

    def initialize_(self, sae: ReLUSAE, x_SD: Tensor, y_SD: Tensor) -> None:
        if self.recipe == "bricken2023":
            # Bricken et al. 2023 initialise the tied bias at the geometric median of the data (as Gao et al.
            # 2024 §A.1 repeat); the April 2024 update starts every bias at zero.
            with torch.no_grad():
                sae.b_dec.copy_(geometric_median(y_SD))

    def resamples_at(self, step: int) -> bool:
        """Every ``resample_every`` steps, but not in the last ``resample_every`` steps of the run: Bricken et al.
        resample early (at 25k, 50k, 75k and 100k steps of a far longer run), so every resampled latent has time
        to learn; one resampled at the last step would be scored untrained, as neither dead nor useful."""
        if not self.resample_every or step % self.resample_every:
            return False
        return step <= self.total_steps - self.resample_every

    def scheduled_event(self, sae: ReLUSAE, ctx: EventContext) -> dict | None:
        if not self.resamples_at(ctx.step):
            return None
        return resample_dead_latents_(sae, ctx, self.resample_rows)


@torch.no_grad()
def resample_dead_latents_(sae: ReLUSAE, ctx: EventContext, rows: int) -> dict:
    """Bricken et al. 2023, appendix "Neuron Resampling": score ``rows`` fresh inputs by the squared error of
    their reconstruction, draw one input per dead latent with probability proportional to the square of that
    loss (without replacement), re-initialise those latents (``ReLUSAE.resample_latents_``) and zero their Adam
    moments in ``W_enc``, ``b_enc`` and ``W_dec``. With more dead latents than inputs of non-zero loss, the
    first ones are resampled (as dictionary_learning's StandardTrainer).

    Returns ``{"resampled": n, "revived_latents": (n,) int64}``; the trainer restarts those latents' counters.
    """
    dead_N = ctx.dead_mask_F.nonzero().squeeze(1).to(sae.device)
    if dead_N.numel() == 0:
        return {"resampled": 0}
    x_SD, y_SD = ctx.sample(rows)
    losses_S = (y_SD - sae(x_SD).x_hat).pow(2).sum(1).double()
    weights_S = losses_S.pow(2)
    count = min(dead_N.numel(), int((weights_S > 0).sum()))
    if count == 0:
        return {"resampled": 0}
    chosen_N = torch.multinomial(weights_S, count, replacement=False)
    dead_N = dead_N[:count]
    sae.resample_latents_(dead_N, x_SD[chosen_N], ~ctx.dead_mask_F.to(sae.device))
    for parameter in (sae.W_enc, sae.b_enc, sae.W_dec):
        reset_adam_rows_(ctx.optimizer, parameter, dead_N)
    return {"resampled": count, "revived_latents": dead_N}
