"""The JumpReLU sparse autoencoder of Rajamanoharan et al. 2024 ("Jumping Ahead: Improving Reconstruction
Fidelity with JumpReLU Sparse Autoencoders", arXiv 2407.14435; the Gemma Scope architecture) and its objective:
reconstruction error plus an L0 penalty, trained through the jump with straight-through pseudo-gradients.

Equation numbers are the paper's (v3). Shape letters are the package's (see ``dictlearn``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dictlearn.sae.base import (
    LossOutput,
    Objective,
    SparseAutoencoder,
    SparseCodes,
    StepContext,
    dense_to_codes,
    random_unit_rows,
)
from dictlearn.sae.kernels import Selection, sparse_decode
from dictlearn.sae.losses import fvu
from dictlearn.sae.topk import remove_parallel_gradient_, unit_norm_rows_


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


class JumpReLUSAE(SparseAutoencoder):
    """JumpReLU SAE (Eq. 8): ``pre = W_enc x + b_enc`` with NO ``b_dec`` subtracted from x (as Gemma Scope and
    dictionary_learning ``JumpReluAutoEncoder``, whose ``apply_b_dec_to_input`` is False), ``f = pre * H(pre -
    theta)`` with a learned positive threshold theta per latent (the parameter ``threshold`` [F]), ``x_hat =
    W_dec^T f + b_dec``.

    Initialisation (dictionary_learning ``JumpReluAutoEncoder``): random unit-norm
    decoder rows, the encoder equal to the decoder's transpose, zero biases, every threshold at
    ``initial_threshold``. We keep theta itself as the parameter rather than the paper's ``log_threshold``
    (Appendix J's pseudo-code), as dictionary_learning does, so it scales with the input like the biases.
    """

    architecture = "jumprelu"

    def __init__(
        self,
        d_in: int,
        num_latents: int,
        *,
        initial_threshold: float = 0.001,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.d_in = self.d_out = d_in
        self.num_latents = num_latents
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        W_dec_FD = random_unit_rows(num_latents, d_in, generator)
        # A copy: ``.to`` returns the same tensor when the dtype is already float64.
        self.W_enc = nn.Parameter(W_dec_FD.clone().to(device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(num_latents, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(W_dec_FD.to(device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype, device=device))
        self.threshold = nn.Parameter(torch.full((num_latents,), initial_threshold, dtype=dtype, device=device))

    def config(self) -> dict[str, Any]:
        return {"d_in": self.d_in, "num_latents": self.num_latents}

    def pre_activations(self, x_BD: Tensor) -> Tensor:
        """(B, F) ``W_enc x + b_enc``."""
        return torch.addmm(self.b_enc, x_BD, self.W_enc.T)

    def encode(self, x_BD: Tensor) -> SparseCodes:
        """The non-zeros of ``relu(pre * [pre > threshold])`` (strict, as dictionary_learning and SAELens; the
        ReLU only matters for a non-positive threshold, which training never leaves)."""
        pre_acts_BF = self.pre_activations(x_BD)
        acts_BF = F.relu(pre_acts_BF * (pre_acts_BF > self.threshold))
        return dense_to_codes(acts_BF, pre_acts_BF.detach())

    def decode(self, codes: SparseCodes) -> Tensor:
        return sparse_decode(codes.values, Selection(codes.indices, self.num_latents), self.W_dec) + self.b_dec

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
    the same at every hook.
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
