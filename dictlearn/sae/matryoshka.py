"""The Matryoshka BatchTopK sparse autoencoder (Bussmann et al. 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders", arXiv 2503.17547; Nabeshima 2024, "Matryoshka Sparse Autoencoders") and its
objective: nested prefixes of the dictionary, each of which must reconstruct the input on its own.

Shape letters are the package's (see ``dictlearn``); G is the number of groups.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dictlearn.errors import UserError
from dictlearn.sae.base import StepContext
from dictlearn.sae.batchtopk import BatchTopKObjective, BatchTopKSAE, padded_codes
from dictlearn.sae.losses import fvu


def group_sizes_from_fractions(num_latents: int, fractions: list[float]) -> list[int]:
    """Latents per group: ``int(fraction * num_latents)`` for every group but the last, which takes the rest
    (dictionary_learning ``MatryoshkaBatchTopKTrainer``)."""
    if not math.isclose(sum(fractions), 1.0):
        raise UserError(f"sae.group_fractions: expected fractions summing to 1, found sum {sum(fractions):g}")
    sizes = [int(fraction * num_latents) for fraction in fractions[:-1]]
    sizes.append(num_latents - sum(sizes))
    if min(sizes) <= 0:
        raise UserError(
            f"sae.group_fractions: every group needs at least one of the {num_latents} latents, found sizes {sizes}"
        )
    return sizes


class MatryoshkaSAE(BatchTopKSAE):
    """A BatchTopK SAE whose latents form nested groups (dictionary_learning ``MatryoshkaBatchTopKSAE``): the
    first ``group_sizes[0]`` latents, then the first ``group_sizes[0] + group_sizes[1]``, ..., each prefix a
    dictionary of its own. Encoding and decoding are BatchTopK's; only the objective knows the groups.
    ``group_sizes`` is an int64 buffer [G], as dictionary_learning saves it."""

    architecture = "matryoshka"

    def __init__(self, d_in: int, num_latents: int, k: int, group_sizes: list[int], **kwargs) -> None:
        if sum(group_sizes) != num_latents or min(group_sizes) <= 0:
            raise UserError(
                f"sae: group sizes must be positive and sum to num_latents={num_latents}, found {group_sizes}"
            )
        super().__init__(d_in, num_latents, k, **kwargs)
        self.group_sizes: Tensor
        self.register_buffer("group_sizes", torch.tensor(group_sizes, dtype=torch.int64, device=self.W_dec.device))

    def config(self):
        return {**super().config(), "group_sizes": self.group_sizes.tolist()}


class MatryoshkaObjective(BatchTopKObjective):
    """Bussmann et al. 2025 §3 (their Eq. for the Matryoshka loss): the batch top-k codes are decoded prefix by
    prefix, ``x_hat_m = b_dec + sum of the selected latents of groups 0..m``, and the reconstruction loss is
    ``sum_m w_m * FVU(y, x_hat_m)``; AuxK (on the full reconstruction's residual), the decoder constraints and
    the threshold are BatchTopK's.

    dictionary_learning ``MatryoshkaBatchTopKTrainer.loss`` uses the summed-over-D, batch-mean squared error
    of each prefix and default weights ``1 / G``, then also averages the weighted terms over the G groups. We
    use the FVU (that MSE divided by the batch's variance, a per-batch constant, as our TopK objective does)
    and the weighted sum without the extra ``1 / G``, so that with one group the loss is BatchTopK's and
    ``aux_coef`` weighs AuxK as it does there. The reported ``fvu`` is the full dictionary's.
    """

    def __init__(self, group_weights: list[float], **kwargs) -> None:
        super().__init__(**kwargs)
        self.group_weights = group_weights

    def reconstruction(self, sae: MatryoshkaSAE, x_BD: Tensor, y_BD: Tensor, ctx: StepContext):
        values_E, selection, pre_acts_BF = self.forward_selected(sae, x_BD)
        group_E = torch.bucketize(selection.indices_E, sae.group_sizes.cumsum(0), right=True)
        x_hat_BD = sae.b_dec.expand_as(y_BD)
        if sae.W_skip is not None:
            x_hat_BD = x_hat_BD + x_BD @ sae.W_skip.T
        loss = y_BD.new_zeros(())
        terms = {}
        for group, weight in enumerate(self.group_weights):
            # Each group's part of the decode shares the selection's sparse backward pattern.
            x_hat_BD = x_hat_BD + sae.decode_without_bias(values_E * (group_E == group), selection)
            group_fvu = fvu(y_BD, x_hat_BD, ctx.ranks)
            loss = loss + weight * group_fvu
            terms[f"fvu_prefix_{group}"] = group_fvu
        terms["fvu"] = group_fvu
        return padded_codes(values_E, selection, pre_acts_BF), x_hat_BD, loss, terms
