"""Reconstruction and sparsity metrics of a dictionary, accumulated in float64 over batches of plain tensors,
and the decoder's (or encoder's) redundancy as the mean largest cosine similarity between its rows.

Definitions and names follow SAEBench's core evaluation (``evals/core/main.py``, output names in
``evals/core/eval_output.py``) and SAELens' ``evals.py`` (``get_sparsity_and_variance_metrics``). Every
mean is over tokens (rows), so batch sizes never weight the result.

Shape letters: B rows in a batch, D input width, K active latents per row (padded), F latents.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ReconstructionMetrics:
    """Streaming sums over ``update(x_BD, x_hat_BD, values_BK, indices_BK)``; ``result()`` gives the metrics.

    ``values_BK`` are the active latents' values (0 where a row has fewer than K), ``indices_BK`` their latent
    ids, distinct within a row; a latent counts as firing on a row when its value is non-zero.
    """

    def __init__(self, num_latents: int):
        self.num_latents = num_latents
        self.rows = 0
        self.sum_x_D: Tensor | None = None
        self.sums = dict.fromkeys(
            ("x_sq", "err_sq", "x_hat_sq", "x_dot_x_hat", "cos", "norm_in", "norm_out", "norm_ratio", "l0", "l1"), 0.0
        )
        self.fired_F = torch.zeros(num_latents, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x_BD: Tensor, x_hat_BD: Tensor, values_BK: Tensor, indices_BK: Tensor) -> None:
        x_BD, x_hat_BD, values_BK = x_BD.double(), x_hat_BD.double(), values_BK.double()
        norm_in_B = x_BD.norm(dim=1)
        norm_out_B = x_hat_BD.norm(dim=1)
        dot_B = (x_BD * x_hat_BD).sum(1)
        # A zero row has no direction: its cosine and norm ratio count as 0 instead of NaN (SAELens leaves NaN).
        tiny = torch.finfo(torch.float64).tiny
        batch = {
            "x_sq": norm_in_B.square().sum(),
            "err_sq": (x_BD - x_hat_BD).square().sum(),
            "x_hat_sq": norm_out_B.square().sum(),
            "x_dot_x_hat": dot_B.sum(),
            "cos": (dot_B / (norm_in_B * norm_out_B).clamp_min(tiny)).sum(),
            "norm_in": norm_in_B.sum(),
            "norm_out": norm_out_B.sum(),
            "norm_ratio": (norm_out_B / norm_in_B.clamp_min(tiny)).sum(),
            "l0": (values_BK != 0).sum(),
            "l1": values_BK.abs().sum(),
        }
        for name, value in batch.items():
            self.sums[name] += float(value)
        sum_D = x_BD.sum(0)
        self.sum_x_D = sum_D if self.sum_x_D is None else self.sum_x_D + sum_D
        active_BK = values_BK != 0
        self.fired_F += torch.bincount(indices_BK[active_BK].cpu(), minlength=self.num_latents).double()
        self.rows += len(x_BD)

    def result(self) -> dict:
        """The metrics over every row seen so far (``density`` is a (F,) tensor; the rest are numbers).

        - ``mse``: E||x - x_hat||^2 / D, the mean squared error per entry (SAEBench's ``mse``).
        - ``fvu``: E||x - x_hat||^2 / (E||x||^2 - ||E x||^2), the error energy over the energy about the mean.
        - ``explained_variance``: 1 - fvu, as SAELens >= 6.45.1 computes it
          (``1 - mean_sum_of_resid_squared / (mean_sum_of_squares - (mean_act_per_dimension ** 2).sum())``).
          SAEBench 0.6.0 and older SAELens square the wrong mean in that denominator, and their per-token
          ``explained_variance_legacy`` is a mean of per-token ratios; neither equals this, so compare numbers
          from those versions with care.
        - ``cossim``: E[cos(x, x_hat)] over tokens (SAEBench ``cossim``).
        - ``l2_norm_in``, ``l2_norm_out``: E||x||, E||x_hat||; ``l2_ratio``: E[||x_hat|| / ||x||] (SAEBench
          ``l2_ratio``, a per-token ratio averaged, below 1 when the SAE shrinks its outputs).
        - ``relative_reconstruction_bias``: E||x_hat||^2 / E[x . x_hat] (Rajamanoharan et al. 2024, "Improving
          Dictionary Learning with Gated Sparse Autoencoders", eq. 10): the scale gamma minimising
          E||x_hat / gamma - x||^2; 1 means unbiased, below 1 shrinkage.
        - ``l0``: mean number of firing latents per token; ``l1``: mean sum of |latent values| per token.
        - ``density``: (F,) fraction of tokens each latent fires on; ``frac_alive``: fraction of latents that fire
          at least once; ``dead_fraction`` = 1 - frac_alive; ``freq_over_1_percent`` and
          ``freq_over_10_percent``: fraction of latents firing on more than 1% / 10% of tokens (SAEBench
          ``misc_metrics``).
        """
        if self.rows == 0:
            raise ValueError("no evaluation rows")
        n, s = self.rows, self.sums
        d_in = len(self.sum_x_D)
        mean_D = self.sum_x_D / n
        total_variance = s["x_sq"] / n - float(mean_D.square().sum())
        mean_err_sq = s["err_sq"] / n
        fvu = mean_err_sq / total_variance if total_variance > 0 else float("nan")
        density_F = self.fired_F / n
        frac_alive = float((self.fired_F > 0).double().mean())
        return {
            "tokens": n,
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "mse": mean_err_sq / d_in,
            "cossim": s["cos"] / n,
            "l2_norm_in": s["norm_in"] / n,
            "l2_norm_out": s["norm_out"] / n,
            "l2_ratio": s["norm_ratio"] / n,
            "relative_reconstruction_bias": s["x_hat_sq"] / s["x_dot_x_hat"] if s["x_dot_x_hat"] else float("nan"),
            "l0": s["l0"] / n,
            "l1": s["l1"] / n,
            "frac_alive": frac_alive,
            "dead_fraction": 1 - frac_alive,
            "freq_over_1_percent": float((density_F > 0.01).double().mean()),
            "freq_over_10_percent": float((density_F > 0.1).double().mean()),
            "density": density_F,
        }


@torch.no_grad()
def mean_max_cosine_similarity(W_FD: Tensor, chunk_rows: int = 1024) -> float:
    """Mean over rows of the largest cosine similarity of each row of ``W_FD`` to any other row.

    SAEBench core's ``average_max_decoder_cosine_sim`` (decoder rows) and ``average_max_encoder_cosine_sim``
    (encoder rows): near 1 when latents come in near-duplicate pairs. The (F, F) similarity matrix is built
    ``chunk_rows`` rows at a time (a (chunk, F) block), so F = 16k never holds 16k x 16k at once.
    """
    unit_FD = W_FD.float() / W_FD.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    num_rows = len(unit_FD)
    if num_rows < 2:
        raise ValueError("need at least two rows")
    total = 0.0
    for start in range(0, num_rows, chunk_rows):
        sims_CF = unit_FD[start : start + chunk_rows] @ unit_FD.T
        rows_C = torch.arange(len(sims_CF), device=sims_CF.device)
        sims_CF[rows_C, rows_C + start] = -float("inf")  # a row's similarity to itself does not count
        total += float(sims_CF.amax(1).double().sum())
    return total / num_rows
