"""Training losses as pure functions: normalised reconstruction error (FVU), the TopK family's AuxK, and the
L1-family terms (squared error, L1 penalty, the gated SAE's auxiliary reconstruction).

Shape letters are the package's (see ``dictlearn``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from dictlearn.sae.base import ONE_PROCESS, Ranks
from dictlearn.sae.kernels import Selection, top_k_indices

if TYPE_CHECKING:
    from dictlearn.sae.topk import TopKFamilySAE


def centred_sum_of_squares(x_BD: Tensor, ranks: Ranks = ONE_PROCESS) -> Tensor:
    """``sum((x - mean(x))^2)`` over the batch (detached): FVU's and AuxK's normaliser.

    With ``ranks`` over several processes it is the global batch's (every rank's rows, around their common mean)
    divided by the world size. A loss ``sse_rank / that`` is then N times this rank's share of the global FVU,
    and the average over ranks of those losses, and of their gradients (the trainer averages gradients), is the
    global batch's FVU and its gradient: the same normaliser a single process would use on the whole batch
    (equal up to float rounding: the sums are added in another order). Two all-reduces of D + 1 numbers."""
    if ranks.world_size == 1:
        return (x_BD - x_BD.mean(0)).pow(2).sum()
    x_BD = x_BD.detach()
    sums_D1 = ranks.sum(torch.cat([x_BD.sum(0), x_BD.new_tensor([len(x_BD)])]))
    mean_D = sums_D1[:-1] / sums_D1[-1]
    return ranks.sum((x_BD - mean_D).pow(2).sum()) / ranks.world_size


def fvu(x_BD: Tensor, x_hat_BD: Tensor, ranks: Ranks = ONE_PROCESS) -> Tensor:
    """Fraction of variance unexplained: summed squared error over the summed squared deviation of x from its
    batch mean. This is Gao et al. 2024's normalised MSE (§2.1) and EleutherAI/sparsify's ``fvu``; a scalar
    tensor, differentiable in ``x_hat_BD``. Under several ``ranks`` the batch is the global one
    (``centred_sum_of_squares``): the ranks' average is the global FVU."""
    return F.mse_loss(x_hat_BD, x_BD, reduction="sum") / centred_sum_of_squares(x_BD, ranks)


def auxk_loss(
    sae: TopKFamilySAE,
    x_BD: Tensor,
    y_BD: Tensor,
    x_hat_BD: Tensor,
    pre_acts_BF: Tensor,
    dead_mask_F: Tensor,
    aux_k: int,
    ranks: Ranks = ONE_PROCESS,
) -> Tensor:
    """AuxK loss (Gao et al. 2024 §A.2): how well the dead latents model the main reconstruction's residual.

    Args:
        sae: the autoencoder; read only (its ``gather`` and ``decode_without_bias``), never changed.
        x_BD: the batch the SAE encoded.
        y_BD: what it reconstructs (``x_BD``, or the target hook's activations for a transcoder).
        x_hat_BD: the SAE's reconstruction of ``y_BD``; detached here, so AuxK trains only the dead latents'
            path and never the main reconstruction.
        pre_acts_BF: the detached pre-activations ``sae.encode(x_BD)`` returned.
        dead_mask_F: bool, True for latents the caller counts as dead (the trainer owns the counters; Gao et
            al. call a latent dead when it has not fired in 10M tokens).
        aux_k: how many dead latents each row may use (a power of two near d_in / 2 in Gao et al. 2024 §A.2;
            openai/sparse_autoencoder's train.py default is 256).
        ranks: the ranks this batch is a share of; the residual's variance is then the global batch's
            (``centred_sum_of_squares``), so the ranks' average is the single-process AuxK. The dead mask is
            the same on every rank (the trainer combines the counters), so every rank takes the same branch.

    Returns:
        A scalar tensor: ``||e - e_hat||^2 / sum((e - mean(e))^2)`` with ``e = y - x_hat`` and ``e_hat`` the
        decode without ``b_dec`` of the ``relu`` of each row's top ``aux_k`` dead pre-activations (the
        ``relu`` as on ``auxk_vals`` in openai/sparse_autoencoder train.py). The
        denominator is the residual's own variance, as in openai/sparse_autoencoder (``normalized_mse`` of the
        AuxK term; note sparsify divides by the input's variance instead). With fewer than ``aux_k`` dead
        latents all of them are used; with none the result is an exact zero tensor without a graph, which adds
        to a differentiable loss as it is.
    """
    dead_N = dead_mask_F.nonzero().squeeze(1)
    if dead_N.numel() == 0:
        return x_BD.new_zeros(())
    # Selecting among the dead columns only, instead of masking the live ones to -inf, leaves no -inf entry
    # to pick when fewer than aux_k latents are dead, and halves the top-k's work when half are dead.
    local_indices_BK = top_k_indices(pre_acts_BF.index_select(1, dead_N), min(aux_k, dead_N.numel()))
    selection = Selection(dead_N[local_indices_BK], sae.num_latents)
    aux_acts_BK = F.relu(sae.gather(x_BD, pre_acts_BF, selection))
    e_BD = (y_BD - x_hat_BD).detach()
    e_hat_BD = sae.decode_without_bias(aux_acts_BK, selection)
    return F.mse_loss(e_hat_BD, e_BD, reduction="sum") / centred_sum_of_squares(e_BD, ranks)


# --- L1 family (ReLU and gated SAEs) ---


def squared_error(y_BD: Tensor, x_hat_BD: Tensor) -> Tensor:
    """``sum_D (y - x_hat)^2`` averaged over rows: the reconstruction term of Bricken et al. 2023, the April
    2024 update and Rajamanoharan et al. 2024 (dictionary_learning's ``recon_loss``)."""
    return (y_BD - x_hat_BD).pow(2).sum(1).mean()


def l1_penalty(acts_BF: Tensor, decoder_norms_F: Tensor | None = None) -> Tensor:
    """``sum_F |f|`` averaged over rows; with ``decoder_norms_F``, ``sum_F |f| * ||W_dec,F||`` (the April 2024
    update's penalty, which makes shrinking the decoder to dodge the L1 pointless)."""
    weighted_BF = acts_BF.abs() if decoder_norms_F is None else acts_BF.abs() * decoder_norms_F
    return weighted_BF.sum(1).mean()


def frozen_decoder_loss(y_BD: Tensor, acts_BF: Tensor, W_dec_FD: Tensor, b_dec_D: Tensor) -> Tensor:
    """``squared_error(y, acts W_dec + b_dec)`` with the decoder detached: Rajamanoharan et al. 2024's
    auxiliary term ``||x - x_hat_frozen(relu(pi_gate))||^2`` (§3.2), which trains only the gate path."""
    return squared_error(y_BD, torch.addmm(b_dec_D.detach(), acts_BF, W_dec_FD.detach()))
