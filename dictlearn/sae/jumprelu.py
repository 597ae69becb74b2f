"""The JumpReLU sparse autoencoder of Rajamanoharan et al. 2024 ("Jumping Ahead: Improving Reconstruction
Fidelity with JumpReLU Sparse Autoencoders", arXiv 2407.14435; the Gemma Scope architecture) and its objective:
reconstruction error plus an L0 penalty, trained through the jump with straight-through pseudo-gradients.

Equation numbers are the paper's (v3). Shape letters are the package's (see ``dictlearn``).
"""

from __future__ import annotations

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
from dictlearn.sae.losses import fvu
from dictlearn.sae.topk import geometric_median, remove_parallel_gradient_, unit_norm_rows_

# Defaults for a run of a few hundred steps on inputs scaled to E||x||^2 = d_in (``Objective.normalize_inputs``).
# Rajamanoharan et al. 2024's initial threshold and bandwidth (0.001 each) and learning rate (7e-5) belong to runs
# of billions of tokens: Adam moves a threshold by about the learning rate a step, so a 220-step run at 7e-5 moves
# it by 0.015 at most, and on SmolLM2-135M blocks.6.hook_resid_post (4,608 latents, 900k tokens) it ended at L0
# ~1,800 and FVU 7.4. With unit-norm encoder rows and scaled inputs a pre-activation is of order 1 (at the tied
# initialisation on that hook, a threshold of 0.001 keeps 2,288 latents a token, 1.0 keeps 477, 2.0 keeps 54), so
# the threshold starts at 1.0; the params' bandwidth default is SAELens's ``jumprelu_bandwidth`` (0.05, with the
# same input scaling, ``normalize_activations='expected_average_only_in'``), wide enough for a batch to put
# entries in the window; the learning rate is ``dictlearn.sae.registry.penalty_family_lr`` (1e-3). Measured with
# these defaults (bench/architectures.py --only jumprelu --tokens 200000, 48 steps): training L0 fell from 489 to
# 28 and training FVU to 0.17.
INITIAL_THRESHOLD = 1.0


def rectangle(u: Tensor) -> Tensor:
    """The kernel K(u) = H(u + 1/2) - H(u - 1/2) of §4 (1 on (-1/2, 1/2), strict at both ends as
    dictionary_learning's ``RectangleFunction``)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``JumpReLU_theta(z) = z H(z - theta)`` (Eq. 4). Backward: the true derivative in z, ``H(z - theta)``,
    and the pseudo-derivative in theta of Eq. 11, ``-(theta / eps) K((z - theta) / eps)``."""

    @staticmethod
    def forward(ctx, z_BF, threshold_F, bandwidth):
        ctx.save_for_backward(z_BF, threshold_F)
        ctx.bandwidth = bandwidth
        return z_BF * (z_BF > threshold_F)

    @staticmethod
    def backward(ctx, grad_BF):
        z_BF, threshold_F = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad_BF * (z_BF > threshold_F)
        grad_threshold = -(threshold_F / eps) * rectangle((z_BF - threshold_F) / eps) * grad_BF
        return grad_z, grad_threshold.sum(0), None


class _Step(torch.autograd.Function):
    """``H(z - theta)``. Backward: no gradient to z (the STE of §4 passes none through the step), and the
    pseudo-derivative in theta of Eq. 12, ``-(1 / eps) K((z - theta) / eps)``."""

    @staticmethod
    def forward(ctx, z_BF, threshold_F, bandwidth):
        ctx.save_for_backward(z_BF, threshold_F)
        ctx.bandwidth = bandwidth
        return (z_BF > threshold_F).to(z_BF.dtype)

    @staticmethod
    def backward(ctx, grad_BF):
        z_BF, threshold_F = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1 / eps) * rectangle((z_BF - threshold_F) / eps) * grad_BF
        return None, grad_threshold.sum(0), None


def jump_relu(z_BF: Tensor, threshold_F: Tensor, bandwidth: float) -> Tensor:
    return _JumpReLU.apply(z_BF, threshold_F, bandwidth)


def step(z_BF: Tensor, threshold_F: Tensor, bandwidth: float) -> Tensor:
    return _Step.apply(z_BF, threshold_F, bandwidth)


class JumpReLUSAE(DenseCodeSAE):
    """JumpReLU SAE (Eq. 8): ``pre = W_enc x + b_enc`` with NO ``b_dec`` subtracted from x (as Gemma Scope and
    dictionary_learning ``JumpReluAutoEncoder``, whose ``apply_b_dec_to_input`` is False), ``f = pre * H(pre -
    theta)`` with a learned positive threshold theta per latent (the parameter ``threshold`` [F]), ``x_hat =
    W_dec^T f + b_dec``.

    Initialisation (dictionary_learning ``JumpReluAutoEncoder``): random unit-norm
    decoder rows, the encoder equal to the decoder's transpose, zero biases, every threshold at
    ``initial_threshold`` (``INITIAL_THRESHOLD`` for short runs; 0.001 in the paper's App. I for long ones);
    ``JumpReLUObjective.initialize_`` then moves ``b_dec`` to the data. We keep theta itself as the parameter rather than the paper's ``log_threshold``
    (Appendix J's pseudo-code), as dictionary_learning does, so it scales with the input like the biases.
    """

    architecture = "jumprelu"

    def __init__(self, d_in: int, num_latents: int, *, initial_threshold: float = INITIAL_THRESHOLD, **kwargs) -> None:
        super().__init__(d_in, num_latents, **kwargs)
        self.threshold = nn.Parameter(
            torch.full((num_latents,), initial_threshold, dtype=self.dtype, device=self.device)
        )

    def pre_activations(self, x_BD: Tensor) -> Tensor:
        """(B, F) ``W_enc x + b_enc``."""
        return torch.addmm(self.b_enc, x_BD, self.W_enc.T)

    def encode(self, x_BD: Tensor) -> SparseCodes:
        """The non-zeros of ``relu(pre * [pre > threshold])`` (strict, as dictionary_learning and SAELens; the
        ReLU only matters for a non-positive threshold, which training never leaves)."""
        pre_acts_BF = self.pre_activations(x_BD)
        acts_BF = F.relu(pre_acts_BF * (pre_acts_BF > self.threshold))
        return dense_to_codes(acts_BF, pre_acts_BF.detach())

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """The biases (base class) and the threshold, which lives in pre-activation units."""
        super().fold_input_scale_(scale)
        self.threshold.mul_(scale)


class JumpReLUObjective(Objective):
    """Rajamanoharan et al. 2024: ``L = ||x - x_hat||^2 + lambda * ||f||_0`` (Eqs. 9-10; the squared error
    summed over the input dimensions and both terms averaged over the batch), with ``||f||_0 = sum_i H(pre_i -
    theta_i)`` differentiated in theta by Eq. 12 and f by Eq. 11. lambda rises linearly from 0 over
    ``l0_warmup_steps`` (the paper's and Gemma Scope's sparsity-coefficient warm-up). Decoder rows are kept
    unit-norm with their parallel gradient removed (dictionary_learning ``JumpReluTrainer``); thresholds are
    clamped at 0 after each step so theta stays a threshold (JumpReLU is defined for theta > 0).

    Inputs are normalised (``normalize_inputs``): lambda, the bandwidth and the initial threshold then mean
    the same at every hook. ``b_dec`` starts at the geometric median of a sample (Bricken et al. 2023, as the
    ReLU and gated recipes here): the encoder does not subtract it, so it only moves the starting
    reconstruction to the data, which a short run at a small learning rate could not do by itself.
    """

    normalize_inputs = True
    # Rajamanoharan et al. 2024 (JumpReLU, section 4) train with Adam beta1 = 0, as dictionary_learning's JumpReluTrainer.
    adam_betas = (0.0, 0.999)

    def __init__(self, l0_coefficient: float, bandwidth: float, l0_warmup_steps: int) -> None:
        self.l0_coefficient = l0_coefficient
        self.bandwidth = bandwidth
        self.l0_warmup_steps = l0_warmup_steps

    def l0_coefficient_at(self, step: int) -> float:
        if step >= self.l0_warmup_steps:
            return self.l0_coefficient
        return self.l0_coefficient * (step + 1) / self.l0_warmup_steps

    def loss(self, sae: JumpReLUSAE, x_BD: Tensor, y_BD: Tensor, ctx: StepContext) -> LossOutput:
        pre_acts_BF = sae.pre_activations(x_BD)
        acts_BF = jump_relu(pre_acts_BF, sae.threshold, self.bandwidth)
        x_hat_BD = acts_BF @ sae.W_dec + sae.b_dec
        mse = (y_BD - x_hat_BD).pow(2).sum(1).mean()
        l0 = step(pre_acts_BF, sae.threshold, self.bandwidth).sum(1).mean()
        loss = mse + self.l0_coefficient_at(ctx.step) * l0
        codes = dense_to_codes(acts_BF.detach(), pre_acts_BF.detach())
        return LossOutput(
            loss, {"fvu": fvu(y_BD, x_hat_BD.detach(), ctx.ranks), "mse": mse.detach(), "l0_loss": l0.detach()}, codes
        )

    def before_optimizer_step(self, sae: JumpReLUSAE) -> None:
        remove_parallel_gradient_(sae.W_dec)

    def after_optimizer_step(self, sae: JumpReLUSAE, out: LossOutput, ctx: StepContext) -> None:
        unit_norm_rows_(sae.W_dec)
        sae.threshold.clamp_(min=0)

    def initialize_(self, sae: JumpReLUSAE, x_SD: Tensor, y_SD: Tensor) -> None:
        with torch.no_grad():
            sae.b_dec.copy_(geometric_median(y_SD))
