"""Statistics of representations row by row (mean, variance, largest weight and its position, L0) for dense
activations and for sparse codes given by their selected (values, indices), summaries over rows, and the
latents that a group of rows shares.

Shape letters: R rows, D dense width, F latents, K selected latents per row, G groups.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RowStats(NamedTuple):
    """Per-row statistics over all the vector's entries (D of them, or F for a code, zeros included)."""

    mean_R: torch.Tensor
    variance_R: torch.Tensor  # population variance: divided by the vector's length
    max_weight_R: torch.Tensor
    max_position_R: torch.Tensor  # index of the largest entry; -1 for an all-zero code
    l0_R: torch.Tensor  # non-zero entries


def dense_row_stats(x_RD: torch.Tensor) -> RowStats:
    x_RD = x_RD.double()
    max_weight_R, max_position_R = x_RD.max(1)
    return RowStats(x_RD.mean(1), x_RD.var(1, correction=0), max_weight_R, max_position_R, (x_RD != 0).sum(1))


def sparse_row_stats(top_acts_RK: torch.Tensor, top_indices_RK: torch.Tensor, num_latents: int) -> RowStats:
    """The statistics of the dense (R, F) code, computed from its K selected entries (the rest are zero)."""
    acts_RK = top_acts_RK.double()
    mean_R = acts_RK.sum(1) / num_latents
    variance_R = (acts_RK.square().sum(1) / num_latents - mean_R.square()).clamp_min(0)
    max_weight_R, where_R = acts_RK.max(1)
    l0_R = (acts_RK > 0).sum(1)
    max_position_R = torch.where(l0_R > 0, top_indices_RK.gather(1, where_R.unsqueeze(1)).squeeze(1), -1)
    return RowStats(mean_R, variance_R, max_weight_R.clamp_min(0), max_position_R, l0_R)


def top_latents(top_acts_RK: torch.Tensor, top_indices_RK: torch.Tensor, count: int) -> list[list[tuple[int, float]]]:
    """Each row's ``count`` largest active latents as (latent, weight), largest first."""
    order_RK = top_acts_RK.argsort(1, descending=True)[:, :count]
    acts_RC, indices_RC = top_acts_RK.gather(1, order_RK), top_indices_RK.gather(1, order_RK)
    return [
        [(int(i), float(a)) for a, i in zip(acts, indices) if a > 0]
        for acts, indices in zip(acts_RC.tolist(), indices_RC.tolist())
    ]


class Spread(NamedTuple):
    """One statistic across rows."""

    mean: float
    std: float
    min: float
    max: float


def spread(values_R: torch.Tensor) -> Spread:
    values_R = values_R.double()
    return Spread(
        float(values_R.mean()), float(values_R.std(correction=0)), float(values_R.min()), float(values_R.max())
    )


def most_common(values_R: torch.Tensor) -> tuple[int, int]:
    """The most frequent value and how many rows have it (the smallest value on a tie)."""
    values, counts = values_R.unique(return_counts=True)
    best = int(counts.argmax())
    return int(values[best]), int(counts[best])


def active_matrix(top_acts_RK: torch.Tensor, top_indices_RK: torch.Tensor, num_latents: int) -> torch.Tensor:
    """(R, F) dense code from the selected entries."""
    return top_acts_RK.new_zeros(len(top_acts_RK), num_latents).scatter_(1, top_indices_RK, top_acts_RK)


class SharedLatent(NamedTuple):
    latent: int
    in_group: int  # rows of the group where the latent is active
    group_size: int
    outside: int  # rows of other groups where it is active
    outside_size: int
    mean_weight: float  # its mean weight over the group's rows


def group_latents(
    codes_RF: torch.Tensor, group_R: torch.Tensor, num_groups: int, count: int
) -> list[list[SharedLatent]]:
    """For each group, the ``count`` latents whose activation rate in the group most exceeds their rate outside it.

    A latent active in every row (a 'mean direction' of the activations) scores zero everywhere, so what is left
    is what the group's rows share and the others lack.
    """
    one_hot_RG = torch.nn.functional.one_hot(group_R, num_groups).double()
    active_RF = (codes_RF > 0).double()
    in_GF = one_hot_RG.T @ active_RF
    size_G = one_hot_RG.sum(0)
    outside_GF = active_RF.sum(0) - in_GF
    outside_size_G = len(group_R) - size_G
    rate_gap_GF = in_GF / size_G.unsqueeze(1) - outside_GF / outside_size_G.clamp_min(1).unsqueeze(1)
    mean_weight_GF = (one_hot_RG.T @ codes_RF.double()) / size_G.unsqueeze(1)
    # Rate gaps tie often in small groups; a tie goes to the latent with the larger mean weight in the group.
    score_GF = rate_gap_GF + 1e-6 * mean_weight_GF / mean_weight_GF.max().clamp_min(1e-12)
    best_GC = score_GF.topk(min(count, codes_RF.shape[1]), dim=1).indices
    return [
        [
            SharedLatent(
                int(f),
                int(in_GF[g, f]),
                int(size_G[g]),
                int(outside_GF[g, f]),
                int(outside_size_G[g]),
                float(mean_weight_GF[g, f]),
            )
            for f in best_GC[g].tolist()
            if in_GF[g, f] > 0
        ]
        for g in range(num_groups)
    ]
