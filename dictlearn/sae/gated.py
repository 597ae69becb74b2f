"""The gated sparse autoencoder of Rajamanoharan et al. 2024 ("Improving Dictionary Learning with Gated Sparse
Autoencoders", arXiv 2404.16014) and its objective.

Shape letters are the package's (see ``dictlearn``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dictlearn.sae.base import (
    DenseCodeSAE,
    LossOutput,
    Objective,
    SparseCodes,
    StepContext,
    dense_to_codes,
)
from dictlearn.sae.losses import frozen_decoder_loss, fvu, l1_penalty, squared_error
from dictlearn.sae.relu import penalty_warmup
from dictlearn.sae.topk import geometric_median, remove_parallel_gradient_, unit_norm_rows_

# Default sparsity coefficient, for inputs scaled to E||x||^2 = d_in: the same scale as the ReLU recipes' lambda
# (the penalty is the L1 of relu(pi_gate), a ReLU SAE's code in all but name). On SmolLM2-135M
# blocks.6.hook_resid_post, 4608 latents, lr 1e-3, batch 4096, only 48 steps (200k tokens, still converging):
# held-out L0 221, FVU 0.40, no dead latents.
DEFAULT_L1_COEFFICIENT = 5.0


class GatedActivations(NamedTuple):
    gate_BF: Tensor
    """(B, F) ``pi_gate = W_gate (x - b_dec) + b_gate``."""

    acts_BF: Tensor
    """(B, F) ``f = 1[pi_gate > 0] * relu(W_mag (x - b_dec) + b_mag)``."""


class GatedSAE(DenseCodeSAE):
    """Rajamanoharan et al. 2024 §3.1: a gate path decides which latents are active, a magnitude path how
    strongly, sharing one weight matrix up to a per-latent scale:

    - ``pi_gate = W_gate (x - b_dec) + b_gate``;
    - ``W_mag = exp(r_mag) * W_gate`` (row-wise; the paper's weight tying);
    - ``f = 1[pi_gate > 0] * relu(W_mag (x - b_dec) + b_mag)``; ``x_hat = f W_dec + b_dec``.

    ``W_gate`` is stored as ``W_enc`` (F, D) so that code reading any SAE's encoder finds it.
    """

    architecture = "gated"

    # Unit-norm random decoder rows (dictionary_learning's GatedAutoEncoder), the encoder as their transpose (the
    # April 2024 update's tied start, which Rajamanoharan et al. recommend for gated SAEs too), zero biases and
    # r_mag = 0 (so W_mag = W_gate at the start): ``DenseCodeSAE``'s initialisation.
    latent_biases = ("b_gate", "r_mag", "b_mag")
    b_gate: nn.Parameter
    r_mag: nn.Parameter
    b_mag: nn.Parameter

    def activations(self, x_BD: Tensor) -> GatedActivations:
        """The gate pre-activations and the gated code, both dense and differentiable (through the magnitude
        path only for ``acts_BF``: the step function has no gradient)."""
        shared_BF = (x_BD - self.b_dec) @ self.W_enc.T
        gate_BF = shared_BF + self.b_gate
        magnitude_BF = F.relu(shared_BF * self.r_mag.exp() + self.b_mag)
        return GatedActivations(gate_BF, magnitude_BF * (gate_BF > 0).to(magnitude_BF.dtype))

    def encode(self, x_BD: Tensor) -> SparseCodes:
        """The gated code's non-zeros; ``pre_acts`` are the gate pre-activations ``pi_gate``."""
        gate_BF, acts_BF = self.activations(x_BD)
        return dense_to_codes(acts_BF, gate_BF.detach())


class GatedObjective(Objective):
    """Rajamanoharan et al. 2024 §3.2, the gated loss:
    ``||x - x_hat(f)||^2 + lambda * ||relu(pi_gate)||_1 + ||x - x_hat_frozen(relu(pi_gate))||^2``, where
    ``x_hat_frozen`` decodes with detached copies of ``W_dec`` and ``b_dec`` (so the auxiliary term trains
    only the gate path, which the step function cuts off from the reconstruction's gradient). lambda is warmed
    up linearly over ``l1_warmup_fraction`` of the steps. Decoder rows are kept unit-norm as dictionary_learning's
    ``GatedSAETrainer`` keeps them (otherwise the L1 on the gate could be dodged by shrinking ``W_gate`` and
    growing ``W_dec``): the gradient's parallel part is removed before each step and the rows renormalised
    after it. ``b_dec`` starts at the geometric median of a sample, as in the ReLU
    ``bricken2023`` recipe. Inputs are scaled to ``E||x||^2 = d_in``.
    """

    normalize_inputs = True
    # Rajamanoharan et al. 2024 (gated SAEs) train with Adam beta1 = 0, as dictionary_learning's GatedSAETrainer.
    adam_betas = (0.0, 0.999)

    def __init__(self, l1_coefficient: float, l1_warmup_fraction: float, total_steps: int) -> None:
        self.l1_coefficient = l1_coefficient
        self.l1_warmup_fraction = l1_warmup_fraction
        self.total_steps = total_steps

    def loss(self, sae: GatedSAE, x_BD: Tensor, y_BD: Tensor, ctx: StepContext) -> LossOutput:
        gate_BF, acts_BF = sae.activations(x_BD)
        x_hat_BD = torch.addmm(sae.b_dec, acts_BF, sae.W_dec)
        reconstruction = squared_error(y_BD, x_hat_BD)
        gate_acts_BF = F.relu(gate_BF)
        sparsity = l1_penalty(gate_acts_BF)
        auxiliary = frozen_decoder_loss(y_BD, gate_acts_BF, sae.W_dec, sae.b_dec)
        coefficient = self.l1_coefficient * penalty_warmup(ctx.step, self.total_steps, self.l1_warmup_fraction)
        terms = {
            "fvu": fvu(y_BD, x_hat_BD, ctx.ranks).detach(),
            "mse": reconstruction.detach(),
            "l1": sparsity.detach(),
            "aux_loss": auxiliary.detach(),
            "l1_coefficient": torch.tensor(coefficient),
        }
        loss = reconstruction + coefficient * sparsity + auxiliary
        return LossOutput(loss, terms, dense_to_codes(acts_BF.detach(), gate_BF.detach()))

    def before_optimizer_step(self, sae: GatedSAE) -> None:
        remove_parallel_gradient_(sae.W_dec)

    def after_optimizer_step(self, sae: GatedSAE, out: LossOutput, ctx: StepContext) -> None:
        unit_norm_rows_(sae.W_dec)

    def initialize_(self, sae: GatedSAE, x_SD: Tensor, y_SD: Tensor) -> None:
        with torch.no_grad():
            sae.b_dec.copy_(geometric_median(y_SD))
