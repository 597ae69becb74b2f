"""The sparse kernels of the TopK family: a fast top-k selection, the encoder gather and the decoder
``embedding_bag`` with backwards that touch only the selected latents (no (B, F) gradient is ever formed).

Shape letters are the package's (see ``dictlearn``): B batch rows, D input width, F latents, K latents
selected per row, N distinct latents a selection touches.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

# A selection that fills at least this fraction of the (B, N) block of the latents it touches is multiplied
# as that dense block with BLAS rather than entry by entry. Measured on the 2-core EPYC bench machine
# (bench/train_speed.py): the sparse products run at about a fifth of the dense matmul rate, so the block
# wins above roughly 1/5 full. The top-k selection (32 of 8192, 0.4% full) stays sparse; AuxK over a small
# dead set (256 of 819 dead, 31% full) goes dense, and never holds more than 5x its own entries.
_DENSE_BLOCK_MIN_FILL = 1 / 5

# ``top_k_indices`` splits each row into this many slabs; 16 measured fastest for 32 of 8192 on the bench.
_TOPK_SLABS = 16

# ``top_k_indices`` bounds a wide top-k (``_top_k_above_bound``) when a row has at least this many columns per
# selected entry; measured on the bench machine: 8 (256 of 4,096) and 64 (128 of 8,192) gain, 2 to 4 do not.
_WIDE_TOPK_MIN_RATIO = 8


def top_k_indices(values_BF: Tensor, k: int) -> Tensor:
    """(B, K) int64 indices of the ``k`` largest entries of each row (in no particular order), as
    ``values_BF.topk(k).indices`` selects (ties may pick other, equally valid, columns).

    Both fast paths rest on one fact: column f belongs to group ``f mod G`` of G strided groups, and any
    ``k`` group maxima are ``k`` distinct entries, so the row's ``k``-th largest entry is at least the
    ``k``-th largest group maximum, and every entry of the top-k lies in one of the ``k`` groups with the
    largest maxima. A top-k over the G group maxima (one vectorised elementwise max over the row's slabs)
    therefore narrows the search:

    - narrow k (``G = F / _TOPK_SLABS`` at least ``4k``, e.g. 32 of 8192): the ``k * _TOPK_SLABS`` entries of
      the ``k`` best groups are the candidates (``_top_k_in_best_groups``; about 20% less than ``torch.topk``
      on the bench machine);
    - wide k (``F >= 8k``, e.g. AuxK's 256 of 4,096 dead latents): the candidates are the entries at or above
      the ``k``-th largest of ``2k`` group maxima, about ``1.5k`` per row (``_top_k_above_bound``; about 25% less
      than ``torch.topk`` for 256 of 4,096 on the bench machine);

    otherwise this is ``torch.topk``.
    """
    num_columns = values_BF.shape[1]
    if num_columns % _TOPK_SLABS == 0 and num_columns // _TOPK_SLABS >= 4 * k:
        return _top_k_in_best_groups(values_BF, k)
    if num_columns >= _WIDE_TOPK_MIN_RATIO * k:
        return _top_k_above_bound(values_BF, k)
    return values_BF.topk(k, sorted=False).indices


def _top_k_in_best_groups(values_BF: Tensor, k: int) -> Tensor:
    """``top_k_indices`` among the entries of the ``k`` groups (of ``F / _TOPK_SLABS``) with the largest maxima."""
    batch_size, num_columns = values_BF.shape
    num_groups = num_columns // _TOPK_SLABS
    slabs_BSG = values_BF.view(batch_size, _TOPK_SLABS, num_groups)
    groups_BK = slabs_BSG.amax(1).topk(k, sorted=False).indices
    candidates_BSK = slabs_BSG.gather(2, groups_BK.unsqueeze(1).expand(batch_size, _TOPK_SLABS, k))
    positions_BK = candidates_BSK.view(batch_size, _TOPK_SLABS * k).topk(k, sorted=False).indices
    return (positions_BK // k) * num_groups + groups_BK.gather(1, positions_BK % k)


def _top_k_above_bound(values_BF: Tensor, k: int) -> Tensor:
    """``top_k_indices`` among the entries at or above a lower bound of each row's ``k``-th largest entry: the
    ``k``-th largest of the maxima of ``2k`` strided groups (columns past the last full slab join no group; the
    bound still holds). Each row's candidates are packed, with ``-inf`` after them, into a (B, C) block for a
    narrow ``torch.topk``; no (B, F) sort or mask-fill is made."""
    batch_size, num_columns = values_BF.shape
    num_groups = 2 * k
    num_slabs = num_columns // num_groups
    slabs_BSG = values_BF[:, : num_slabs * num_groups].unflatten(1, (num_slabs, num_groups))
    bound_B1 = slabs_BSG.amax(1).topk(k, sorted=False).values.amin(1, keepdim=True)
    rows_E, columns_E = (values_BF >= bound_B1).nonzero(as_tuple=True)
    counts_B = torch.bincount(rows_E, minlength=batch_size)
    # Entry e is the slot_E[e]-th candidate of its row (nonzero lists them row by row).
    slot_E = torch.arange(rows_E.numel(), device=rows_E.device) - (counts_B.cumsum(0) - counts_B)[rows_E]
    width = int(counts_B.max())
    candidates_BC = values_BF.new_full((batch_size, width), -torch.inf)
    candidates_BC[rows_E, slot_E] = values_BF[rows_E, columns_E]
    columns_BC = columns_E.new_zeros(batch_size, width)
    columns_BC[rows_E, slot_E] = columns_E
    return columns_BC.gather(1, candidates_BC.topk(k, sorted=False).indices)


def _csr(crow_indices: Tensor, col_indices: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR matrix from trusted parts, without the invariant checks or torch's once-per-process notices."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(crow_indices, col_indices, values, size, check_invariants=False)


class _SelectionPattern:
    """The (B, F) matrix with the selection's E stored entries, as a backward uses it.

    Two products are needed: ``transposed_matmul`` (gradients of ``W_enc`` and ``W_dec``) and ``sampled_dot``
    (gradients of the selected activations). Both cost O(E * D) entry by entry; when the selection fills at
    least ``_DENSE_BLOCK_MIN_FILL`` of the (B, N) block of latents it touches, a dense BLAS product on that
    block is faster (see the constant). Either way no (B, F) matrix is formed.
    """

    def __init__(self, selection: Selection) -> None:
        self.selection = selection
        num_latents = selection.num_latents
        indices_E = selection.indices_E
        counts_F = torch.bincount(indices_E, minlength=num_latents)
        self.touched_N = counts_F.nonzero().squeeze(1)
        num_touched = self.touched_N.numel()
        self.dense = indices_E.numel() >= _DENSE_BLOCK_MIN_FILL * num_touched * selection.batch_size
        if self.dense:
            local_F = torch.empty_like(counts_F)
            local_F[self.touched_N] = torch.arange(num_touched, device=indices_E.device)
            self.local_E = local_F[indices_E]
        else:
            # Entries sorted by latent, each remembering its batch row: latent f's entries are
            # ``order[offsets[f]:offsets[f + 1]]``. A stable sort of int32 keys runs about 3x faster than
            # ``argsort`` of the int64 indices on the bench machine (1M AuxK entries: 100 against 309 ms under
            # load), and its order does not depend on the thread count.
            keys = indices_E.to(torch.int32) if num_latents <= torch.iinfo(torch.int32).max else indices_E
            self.order = torch.sort(keys, stable=True).indices
            self.offsets = torch.cat([counts_F.new_zeros(1), counts_F.cumsum(0)])
            self.batch_rows = selection.rows_E[self.order]

    def transposed_matmul(self, values_E: Tensor, rows_BD: Tensor) -> Tensor:
        """(F, D): row f is the sum of ``values_E[e] * rows_BD[rows_E[e]]`` over the entries with ``indices_E[e] == f``."""
        batch_size, d = rows_BD.shape
        if self.dense:
            block_BN = values_E.new_zeros(batch_size, self.touched_N.numel())
            # A flat scatter_add: about 3x faster than index_put_(accumulate=True) on the bench machine (AuxK).
            positions_E = self.selection.rows_E * self.touched_N.numel() + self.local_E
            block_BN.view(-1).scatter_add_(0, positions_E, values_E)
            out_FD = rows_BD.new_zeros(self.selection.num_latents, d)
            out_FD.index_copy_(0, self.touched_N, block_BN.T @ rows_BD)
            return out_FD
        # One bag per latent over the batch rows of its entries: embedding_bag's kernel runs this about 1.6x
        # faster than a CSR (F, B) @ (B, D) product on the bench machine.
        return F.embedding_bag(
            self.batch_rows,
            rows_BD,
            self.offsets,
            per_sample_weights=values_E[self.order],
            mode="sum",
            include_last_offset=True,
        )

    def sampled_dot(self, rows_BD: Tensor, W_FD: Tensor) -> Tensor:
        """(E,): entry e is ``rows_BD[rows_E[e]] . W_FD[indices_E[e]]``."""
        if self.dense:
            # (N, D) @ (D, B) rather than (B, D) @ (D, N): BLAS runs about 1.4x faster with the odd-sized N
            # as the rows of the output than as its columns (bench shapes, N = 819).
            dots_NB = W_FD[self.touched_N] @ rows_BD.T
            return dots_NB.view(-1)[self.local_E * rows_BD.shape[0] + self.selection.rows_E]
        selection = self.selection
        # torch's CPU sampled_addmm takes float32 and float64 only; half precision goes through float32.
        compute_dtype = torch.promote_types(rows_BD.dtype, torch.float32)
        pattern_BF = _csr(
            selection.row_offsets,
            selection.indices_E,
            rows_BD.new_zeros(selection.indices_E.numel(), dtype=compute_dtype),
            (selection.batch_size, selection.num_latents),
        )
        dots = torch.sparse.sampled_addmm(pattern_BF, rows_BD.to(compute_dtype), W_FD.T.to(compute_dtype))
        return dots.values().to(rows_BD.dtype)


class Selection:
    """The latents each row of a batch selected, stored flat: entry e is latent ``indices_E[e]`` of row
    ``rows_E[e]``, rows in order, row b's entries at ``row_offsets[b]:row_offsets[b + 1]`` (CSR). Values
    over a selection have its ``shape``: (B, K) when every row selects K (``Selection(indices_BK, F)``), (E,)
    when rows select different numbers (``Selection.ragged``, BatchTopK), so no row is padded for the kernels.

    Holds the ``_SelectionPattern`` both sparse backwards of one forward use: built on first use and shared,
    so the encoder's and the decoder's backward do not each sort the same indices again."""

    def __init__(self, indices_BK: Tensor, num_latents: int) -> None:
        batch_size, k = indices_BK.shape
        self.indices_BK = indices_BK
        self.shape = indices_BK.shape
        self.indices_E = indices_BK.flatten()
        self.batch_size = batch_size
        self.num_latents = num_latents
        self.row_offsets = torch.arange(0, batch_size * k + 1, k, device=indices_BK.device)
        self._rows_E: Tensor | None = None
        self._pattern: _SelectionPattern | None = None

    @classmethod
    def ragged(cls, rows_E: Tensor, indices_E: Tensor, batch_size: int, num_latents: int) -> Selection:
        """The selection of latent ``indices_E[e]`` in row ``rows_E[e]``, entries listed by row (``rows_E``
        non-decreasing, as ``nonzero`` lists them); rows may hold different numbers."""
        counts_B = torch.bincount(rows_E, minlength=batch_size)
        selection = cls.__new__(cls)
        selection.indices_BK = None
        selection.shape = indices_E.shape
        selection.indices_E = indices_E
        selection.batch_size = batch_size
        selection.num_latents = num_latents
        selection.row_offsets = torch.cat([counts_B.new_zeros(1), counts_B.cumsum(0)])
        selection._rows_E = rows_E
        selection._pattern = None
        return selection

    @property
    def rows_E(self) -> Tensor:
        """(E,) the batch row of each entry (a ragged selection is given it; K per row computes it once)."""
        if self._rows_E is None:
            self._rows_E = torch.arange(self.batch_size, device=self.indices_E.device).repeat_interleave(self.shape[1])
        return self._rows_E

    @property
    def pattern(self) -> _SelectionPattern:
        if self._pattern is None:
            self._pattern = _SelectionPattern(self)
        return self._pattern


class _GatherPreActs(torch.autograd.Function):
    """``pre_acts_BF`` at the selected entries, differentiable in x, ``W_enc``, ``b_enc``, ``b_dec`` by a sparse
    backward.

    The forward reads the dense pre-activations the encoder computed without autograd; the backward touches
    only the selected latents: ``W_enc``'s gradient is a transposed sparse product, ``b_enc``'s an
    ``index_add``, and x's an ``embedding_bag`` over the rows of ``W_enc`` (the sparse encoder backward of
    openai/sparse_autoencoder ``train.py``, ``EncWrapper``).
    """

    @staticmethod
    def forward(ctx, x_BD, W_enc_FD, b_enc_F, b_dec_D, pre_acts_BF, selection):
        ctx.selection = selection
        ctx.save_for_backward(x_BD, W_enc_FD, b_dec_D)
        if selection.indices_BK is not None:
            return pre_acts_BF.gather(1, selection.indices_BK)  # about 4x faster than indexing by (row, latent)
        return pre_acts_BF[selection.rows_E, selection.indices_E]

    @staticmethod
    def backward(ctx, grad):
        x_BD, W_enc_FD, b_dec_D = ctx.saved_tensors
        selection = ctx.selection
        grad_E = grad.reshape(-1)
        grad_x = grad_W_enc = grad_b_enc = grad_b_dec = None
        grad_b_enc_F = W_enc_FD.new_zeros(W_enc_FD.shape[0]).index_add_(0, selection.indices_E, grad_E)
        if ctx.needs_input_grad[1]:
            grad_W_enc = selection.pattern.transposed_matmul(grad_E, x_BD - b_dec_D)
        if ctx.needs_input_grad[2]:
            grad_b_enc = grad_b_enc_F
        if ctx.needs_input_grad[3]:
            # Summed over the batch before the matrix product, so no (B, D) gradient is needed for b_dec
            # (openai/sparse_autoencoder train.py: "pre_bias grad optimization").
            grad_b_dec = -(grad_b_enc_F @ W_enc_FD)
        if ctx.needs_input_grad[0]:
            grad_x = _bag_sum(selection, W_enc_FD, grad_E)
        return grad_x, grad_W_enc, grad_b_enc, grad_b_dec, None, None


def _bag_sum(selection: Selection, W_FD: Tensor, weights_E: Tensor) -> Tensor:
    """(B, D): row b is the sum of ``weights_E[e] * W_FD[indices_E[e]]`` over row b's entries."""
    return F.embedding_bag(
        selection.indices_E,
        W_FD,
        selection.row_offsets,
        per_sample_weights=weights_E,
        mode="sum",
        include_last_offset=True,
    )


class _SparseDecode(torch.autograd.Function):
    """``sum_j acts[b, j] * W_dec_FD[indices[b, j]]``: an ``embedding_bag`` forward and a sparse backward.

    torch's own ``embedding_bag`` backward with ``per_sample_weights`` took about 31 ms (top-k) and 154 ms
    (AuxK) per bench step on CPU, against about 13 ms and 40 ms through ``_SelectionPattern``.
    """

    @staticmethod
    def forward(ctx, acts, selection, W_dec_FD):
        acts_E = acts.reshape(-1)
        ctx.selection = selection
        ctx.save_for_backward(acts_E, W_dec_FD)
        return _bag_sum(selection, W_dec_FD, acts_E)

    @staticmethod
    def backward(ctx, grad_BD):
        acts_E, W_dec_FD = ctx.saved_tensors
        grad_BD = grad_BD.contiguous()
        selection = ctx.selection
        grad_acts = None
        if ctx.needs_input_grad[0]:
            grad_acts = selection.pattern.sampled_dot(grad_BD, W_dec_FD).view(selection.shape)
        grad_W_dec = selection.pattern.transposed_matmul(acts_E, grad_BD) if ctx.needs_input_grad[2] else None
        return grad_acts, None, grad_W_dec


def gather_pre_acts(
    x_BD: Tensor, W_enc_FD: Tensor, b_enc_F: Tensor, b_dec_D: Tensor, pre_acts_BF: Tensor, selection: Selection
) -> Tensor:
    """``pre_acts_BF`` at the selected entries, in the selection's ``shape``, where ``pre_acts_BF = (x - b_dec)
    W_enc^T + b_enc`` was computed without autograd: differentiable in x, ``W_enc``, ``b_enc`` and ``b_dec`` by
    the sparse backward."""
    return _GatherPreActs.apply(x_BD, W_enc_FD, b_enc_F, b_dec_D, pre_acts_BF, selection)


def sparse_decode(acts: Tensor, selection: Selection, W_dec_FD: Tensor) -> Tensor:
    """(B, D) the sum over each row's entries of ``acts * W_dec_FD[latent]`` (``acts`` in the selection's
    ``shape``) without a (B, F) matrix, forward or backward."""
    return _SparseDecode.apply(acts, selection, W_dec_FD)
