"""The BatchTopK sparse autoencoder of Bussmann et al. 2024 ("BatchTopK Sparse Autoencoders", arXiv 2412.06410)
and its objective: TopK's encoder, decoder, FVU and AuxK with the top ``k * B`` activations of the whole batch
kept in training and a learned global threshold at inference.

Shape letters are the package's (see ``dictlearn``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dictlearn.sae.base import ONE_PROCESS, Ranks, SparseCodes, StepContext
from dictlearn.sae.kernels import Selection
from dictlearn.sae.losses import fvu
from dictlearn.sae.topk import TopKFamilySAE, TopKObjective

# ``batch_top_k`` bounds the batch threshold with the maxima of up to this many strided groups per selected
# entry of a row (8k groups of F / 8k columns); measured on the bench machine (k 32 of 8,192, B 4,096): 8k
# (61 ms) against 4k (106 ms, more candidates) and 16k (68 ms, a wider k-th value search).
_GROUPS_PER_K = 8


def batch_top_k(pre_acts_BF: Tensor, k: int) -> Selection:
    """The ``k * B`` largest entries of ``relu(pre_acts_BF)`` over the whole batch (Bussmann et al. 2024 §3;
    dictionary_learning ``BatchTopKSAE.encode(use_threshold=False)``), as a ragged ``Selection``: row b holds
    its own number of entries, so the sparse kernels do no work for padding. Exactly ``k * B`` entries are
    kept, ties at the threshold broken by position; entries equal to zero after the ReLU are never kept (a
    batch with fewer than ``k * B`` positive entries keeps fewer).

    Column f of a row belongs to group ``f mod G`` of G strided groups (G from ``_batch_top_k_groups``, at
    least k); the ``B * G`` group maxima are distinct entries, at least ``k * B`` of them, so their ``k * B``-th
    largest is a lower bound on the batch's. Only the groups whose maximum reaches the bound (exactly ``k * B``
    of them, ties aside) can hold kept entries; their entries at or above the bound (about 1.07 ``k * B`` on
    the bench's Gaussian-like data) go to an exact ``kthvalue``. No (B, F) mask, sort or top-k is formed.
    """
    batch_size, num_latents = pre_acts_BF.shape
    budget = k * batch_size
    num_groups = _batch_top_k_groups(num_latents, k)
    slabs_BSG = pre_acts_BF.view(batch_size, num_latents // num_groups, num_groups)
    maxima_BG = slabs_BSG.amax(1)
    # The smallest positive float: a bound at or below zero still keeps only positive entries.
    bound = maxima_BG.new_tensor(0.0).nextafter(maxima_BG.new_tensor(1.0))
    if budget <= maxima_BG.numel():
        bound = torch.maximum(bound, maxima_BG.flatten().kthvalue(maxima_BG.numel() - budget + 1).values)
    rows_N, groups_N = (maxima_BG >= bound).nonzero(as_tuple=True)
    values_NS = slabs_BSG[rows_N, :, groups_N]
    # Listed by row (nonzero's order), as the ragged selection stores them.
    group_E, slab_E = (values_NS >= bound).nonzero(as_tuple=True)
    values_E = values_NS[group_E, slab_E]
    rows_E = rows_N[group_E]
    indices_E = slab_E * num_groups + groups_N[group_E]
    if values_E.numel() > budget:
        kth_value = values_E.kthvalue(values_E.numel() - budget + 1).values
        above_E = values_E > kth_value
        at_E = values_E == kth_value
        keep_E = above_E | (at_E & (at_E.cumsum(0) <= budget - above_E.sum()))
        rows_E, indices_E = rows_E[keep_E], indices_E[keep_E]
    return Selection.ragged(rows_E, indices_E, batch_size, num_latents)


def _batch_top_k_groups(num_latents: int, k: int) -> int:
    """G for ``batch_top_k``: the largest divisor of F from k to ``_GROUPS_PER_K * k``, else F (one slab: the
    bound is then exact and every positive entry a candidate)."""
    for num_groups in range(min(num_latents, _GROUPS_PER_K * k), k - 1, -1):
        if num_latents % num_groups == 0:
            return num_groups
    return num_latents


def padded_codes(values_E: Tensor, selection: Selection, pre_acts_BF: Tensor) -> SparseCodes:
    """``SparseCodes`` of a ragged selection in the (B, K) layout callers take, K the largest row's count (at
    least 1): row b's entries first, then padding with value 0 at latents the row did not select (the first
    columns that are free), so each row's indices stay distinct and a scatter of the codes is exact."""
    counts_B = selection.row_offsets.diff()
    width = max(1, int(counts_B.max())) if counts_B.numel() else 1
    rows_E, indices_E = selection.rows_E, selection.indices_E
    slot_E = torch.arange(indices_E.numel(), device=indices_E.device) - selection.row_offsets[rows_E]
    # Row b selects counts_B[b] latents, so at least width - counts_B[b] of the columns 0..width-1 are free.
    in_pool_E = indices_E < width
    taken_BK = torch.zeros(selection.batch_size, width, dtype=torch.int8, device=indices_E.device)
    taken_BK[rows_E[in_pool_E], indices_E[in_pool_E]] = 1
    free_BK = taken_BK.sort(dim=1, stable=True).indices
    padding_BK = (torch.arange(width, device=indices_E.device) - counts_B.unsqueeze(1)).clamp_min(0)
    indices_BK = free_BK.gather(1, padding_BK).index_put((rows_E, slot_E), indices_E)
    values_BK = values_E.new_zeros(selection.batch_size, width).index_put((rows_E, slot_E), values_E)
    return SparseCodes(values_BK, indices_BK, pre_acts_BF)


class BatchTopKSAE(TopKFamilySAE):
    """BatchTopK (Bussmann et al. 2024 §3): in training the top ``k * B`` activations of ``relu(pre_acts)``
    across the batch's B rows are kept, so a row may use more or fewer than ``k`` latents; at inference a
    single learned ``threshold`` replaces the batch, ``z = relu(pre) * [relu(pre) > threshold]`` (strict, as
    dictionary_learning ``BatchTopKSAE.encode``), which keeps about ``k`` per row on average and makes a row's
    code independent of the rest of its batch.

    ``threshold`` is a 0-d buffer, -1 until estimated (dictionary_learning's "not set"; with it, every positive
    activation is kept). ``BatchTopKObjective`` estimates it during training.
    """

    architecture = "batchtopk"

    def __init__(self, d_in: int, num_latents: int, k: int, **kwargs) -> None:
        super().__init__(d_in, num_latents, k, **kwargs)
        self.threshold: Tensor
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=self.W_dec.dtype, device=self.W_dec.device))

    def select_batch(self, pre_acts_BF: Tensor) -> Selection:
        """The training-time selection: the batch's top ``k * B``."""
        return batch_top_k(pre_acts_BF, int(self.k))

    def select_by_threshold(self, pre_acts_BF: Tensor) -> Selection:
        """The inference selection: every latent whose ``relu(pre)`` exceeds ``threshold``, per row."""
        rows_E, indices_E = (pre_acts_BF > self.threshold.clamp_min(0)).nonzero(as_tuple=True)
        return Selection.ragged(rows_E, indices_E, pre_acts_BF.shape[0], self.num_latents)

    def encode(self, x_BD: Tensor) -> SparseCodes:
        pre_acts_BF = self.pre_activations(x_BD)
        selection = self.select_by_threshold(pre_acts_BF)
        values_E = F.relu(self.gather(x_BD, pre_acts_BF, selection))
        return padded_codes(values_E, selection, pre_acts_BF)


class BatchTopKObjective(TopKObjective):
    """Bussmann et al. 2024: TopK's objective (FVU + AuxK, decoder projection and renormalisation, geometric
    median ``b_dec``; ``TopKObjective``) with the batch top-k in training, and after each step the threshold
    update of dictionary_learning ``BatchTopKTrainer.update_threshold``: from ``threshold_start_step`` on,
    ``threshold <- beta * threshold + (1 - beta) * (smallest positive activation kept in the batch)``, the first
    estimate taken as it is. dictionary_learning starts after ``threshold_start_step``; we start at it, so a
    start of 0 estimates from the first step (``dictlearn.sae.topk.threshold_start_step`` gives the default)."""

    def __init__(self, aux_k: int, aux_coef: float, threshold_beta: float, threshold_start_step: int) -> None:
        super().__init__(aux_k, aux_coef, threshold_start_step, threshold_beta)

    def forward_selected(self, sae: BatchTopKSAE, x_BD: Tensor) -> tuple[Tensor, Selection, Tensor]:
        """(values_E, selection, pre_acts_BF): the batch top-k of ``x_BD`` as a ragged selection and its
        activations, differentiable."""
        pre_acts_BF = sae.pre_activations(x_BD)
        selection = sae.select_batch(pre_acts_BF)
        return F.relu(sae.gather(x_BD, pre_acts_BF, selection)), selection, pre_acts_BF

    def reconstruction(self, sae: BatchTopKSAE, x_BD: Tensor, y_BD: Tensor, ctx: StepContext):
        values_E, selection, pre_acts_BF = self.forward_selected(sae, x_BD)
        x_hat_BD = sae.decode_without_bias(values_E, selection) + sae.b_dec
        if sae.W_skip is not None:
            x_hat_BD = x_hat_BD + x_BD @ sae.W_skip.T
        fvu_loss = fvu(y_BD, x_hat_BD, ctx.ranks)
        return padded_codes(values_E, selection, pre_acts_BF), x_hat_BD, fvu_loss, {"fvu": fvu_loss}

    def update_threshold_(self, sae: BatchTopKSAE, codes: SparseCodes, ranks: Ranks = ONE_PROCESS) -> None:
        """``TopKObjective``'s schedule with the batch rule (``update_threshold_`` below)."""
        update_threshold_(sae.threshold, codes.values, self.threshold_beta, ranks)


@torch.no_grad()
def update_threshold_(threshold: Tensor, values_BK: Tensor, beta: float, ranks: Ranks = ONE_PROCESS) -> None:
    """The running threshold (0-d, negative while unset) moved towards the smallest positive kept activation
    (0 when none is positive), as dictionary_learning ``BatchTopKTrainer.update_threshold``; no host sync.

    Under several ``ranks`` each rank's batch top-k ran over its own rows (its ``k * B / N`` largest: a
    per-device batch, as in dictionary_learning or sparsify run data-parallel), and the smallest kept value
    is the minimum over every rank's, so every rank holds the same threshold."""
    positive = values_BK > 0
    smallest = ranks.min(torch.where(positive, values_BK, torch.inf).amin())
    smallest = torch.where(smallest.isfinite(), smallest, 0.0).to(threshold.dtype)
    threshold.copy_(torch.where(threshold < 0, smallest, beta * threshold + (1 - beta) * smallest))
