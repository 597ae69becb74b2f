"""The TopK sparse autoencoder of Gao et al. 2024 (arXiv 2406.04093), its sparse backward, and its file format.

Shape letters: B batch rows, D input width (``d_in``), F latents (``num_latents``), K latents selected per
row (``k``, or ``aux_k`` for AuxK), N distinct latents a selection touches, S sample rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dictlearn.errors import UserError
from dictlearn.files import torch_save

# A selection that fills at least this fraction of the (B, N) block of the latents it touches is multiplied
# as that dense block with BLAS rather than entry by entry. Measured on the 2-core EPYC bench machine
# (bench/train_speed.py): the sparse products run at about a fifth of the dense matmul rate, so the block
# wins above roughly 1/5 full. The top-k selection (32 of 8192, 0.4% full) stays sparse; AuxK over a small
# dead set (256 of 819 dead, 31% full) goes dense, and never holds more than 5x its own entries.
_DENSE_BLOCK_MIN_FILL = 1 / 5

# ``dictionary_learning``'s AutoEncoderTopK state dict (saprmarks/dictionary_learning, dictionary.py):
# key -> shape, with D and F standing for ``d_in`` and ``num_latents``.
_DICTIONARY_LEARNING_SHAPES = {
    "encoder.weight": ("F", "D"),
    "encoder.bias": ("F",),
    "decoder.weight": ("D", "F"),
    "b_dec": ("D",),
    "k": (),
    "threshold": (),
}


class EncoderOutput(NamedTuple):
    top_acts: Tensor
    """(B, K) activations of the selected latents, ``relu`` of their pre-activations; differentiable."""

    top_indices: Tensor
    """(B, K) int64 indices of the selected latents."""

    pre_acts: Tensor
    """(B, F) dense pre-activations, detached."""


class ForwardOutput(NamedTuple):
    x_hat: Tensor
    """(B, D) reconstruction."""

    top_acts: Tensor
    """(B, K) activations of the selected latents."""

    top_indices: Tensor
    """(B, K) int64 indices of the selected latents."""

    pre_acts: Tensor
    """(B, F) dense pre-activations, detached."""


def geometric_median(points_SD: Tensor, num_iters: int = 50) -> Tensor:
    """The point minimising the summed Euclidean distance to the rows of ``points_SD``, shape (D,).

    Weiszfeld's iterations from the mean: each step re-weights every point by the inverse of its distance to
    the current estimate. Gao et al. 2024 §A.1 initialise the pre-encoder bias to the geometric median of a
    data sample, following Bricken et al. 2023 (openai/sparse_autoencoder ``init_from_data_`` calls the
    ``geom_median`` package's Weiszfeld solver); a few dozen iterations suffice for activation-like data.
    """
    points_SD = points_SD.double()
    median_D = points_SD.mean(0)
    for _ in range(num_iters):
        # The clamp keeps a point that coincides with the estimate from taking an infinite weight.
        weights_S = torch.linalg.vector_norm(points_SD - median_D, dim=1).clamp_min(1e-12).reciprocal()
        median_D = weights_S @ points_SD / weights_S.sum()
    return median_D


# ``top_k_indices`` splits each row into this many slabs; 16 measured fastest for 32 of 8192 on the bench.
_TOPK_SLABS = 16


def top_k_indices(values_BF: Tensor, k: int) -> Tensor:
    """(B, K) int64 indices of the ``k`` largest entries of each row (in no particular order), as
    ``values_BF.topk(k).indices`` selects, found in two small top-k passes instead of one wide one.

    Column f belongs to group ``f mod G`` of ``G = F / _TOPK_SLABS`` strided groups, and a group's maximum is an
    elementwise max over the row's slabs (one vectorised pass). The ``k`` groups with the largest maxima hold
    a full top-k: a group outside them is beaten by ``k`` group maxima, ``k`` distinct entries, so none of its
    entries is needed (ties give another equally valid top-k). Selecting among those ``k * _TOPK_SLABS``
    candidates costs less than a top-k over all F columns once G is several times ``k`` (about 20% less for
    32 of 8192 on the bench machine); otherwise this is ``torch.topk``.
    """
    batch_size, num_columns = values_BF.shape
    num_groups = num_columns // _TOPK_SLABS
    if num_columns % _TOPK_SLABS or num_groups < 4 * k:
        return values_BF.topk(k, sorted=False).indices
    slabs_BSG = values_BF.view(batch_size, _TOPK_SLABS, num_groups)
    groups_BK = slabs_BSG.amax(1).topk(k, sorted=False).indices
    candidates_BSK = slabs_BSG.gather(2, groups_BK.unsqueeze(1).expand(batch_size, _TOPK_SLABS, k))
    positions_BK = candidates_BSK.view(batch_size, _TOPK_SLABS * k).topk(k, sorted=False).indices
    return (positions_BK // k) * num_groups + groups_BK.gather(1, positions_BK % k)


def _csr(crow_indices: Tensor, col_indices: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR matrix from trusted parts, without the invariant checks or torch's once-per-process notices."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(crow_indices, col_indices, values, size, check_invariants=False)


class _SelectionPattern:
    """The (B, F) matrix with K stored entries per row, in the columns ``indices_BK``, as a backward uses it.

    Two products are needed: ``transposed_matmul`` (gradients of ``W_enc`` and ``W_dec``) and ``sampled_dot``
    (gradients of the selected activations). Both cost O(B * K * D) entry by entry; when the selection fills
    at least ``_DENSE_BLOCK_MIN_FILL`` of the (B, N) block of latents it touches, a dense BLAS product on that
    block is faster (see the constant). Either way no (B, F) matrix is formed.
    """

    def __init__(self, indices_BK: Tensor, num_latents: int) -> None:
        self.indices_BK = indices_BK
        self.num_latents = num_latents
        flat_indices = indices_BK.flatten()
        counts_F = torch.bincount(flat_indices, minlength=num_latents)
        self.touched_N = counts_F.nonzero().squeeze(1)
        self.dense = indices_BK.shape[1] >= _DENSE_BLOCK_MIN_FILL * self.touched_N.numel()
        if self.dense:
            local_F = torch.empty_like(counts_F)
            local_F[self.touched_N] = torch.arange(self.touched_N.numel(), device=indices_BK.device)
            self.local_BK = local_F[indices_BK]
        else:
            # Entries sorted by latent, each remembering its batch row: latent f's entries are
            # ``order[offsets[f]:offsets[f + 1]]``.
            self.order = flat_indices.argsort()
            self.offsets = torch.cat([counts_F.new_zeros(1), counts_F.cumsum(0)])
            self.batch_rows = self.order // indices_BK.shape[1]

    def transposed_matmul(self, values_BK: Tensor, rows_BD: Tensor) -> Tensor:
        """(F, D): row f is the sum of ``values_BK[b, j] * rows_BD[b]`` over the entries with ``indices_BK[b, j] == f``."""
        batch_size, d = rows_BD.shape
        if self.dense:
            block_BN = values_BK.new_zeros(batch_size, self.touched_N.numel())
            block_BN.scatter_add_(1, self.local_BK, values_BK)
            out_FD = rows_BD.new_zeros(self.num_latents, d)
            out_FD.index_copy_(0, self.touched_N, block_BN.T @ rows_BD)
            return out_FD
        # One bag per latent over the batch rows of its entries: embedding_bag's kernel runs this about 1.6x
        # faster than a CSR (F, B) @ (B, D) product on the bench machine.
        return F.embedding_bag(
            self.batch_rows,
            rows_BD,
            self.offsets,
            per_sample_weights=values_BK.flatten()[self.order],
            mode="sum",
            include_last_offset=True,
        )

    def sampled_dot(self, rows_BD: Tensor, W_FD: Tensor) -> Tensor:
        """(B, K): entry (b, j) is ``rows_BD[b] . W_FD[indices_BK[b, j]]``."""
        if self.dense:
            # (N, D) @ (D, B) rather than (B, D) @ (D, N): BLAS runs about 1.4x faster with the odd-sized N
            # as the rows of the output than as its columns (bench shapes, N = 819).
            return (W_FD[self.touched_N] @ rows_BD.T).T.gather(1, self.local_BK)
        batch_size, k = self.indices_BK.shape
        # torch's CPU sampled_addmm takes float32 and float64 only; half precision goes through float32.
        compute_dtype = torch.promote_types(rows_BD.dtype, torch.float32)
        pattern_BF = _csr(
            torch.arange(0, batch_size * k + 1, k, device=rows_BD.device),
            self.indices_BK.flatten(),
            rows_BD.new_zeros(batch_size * k, dtype=compute_dtype),
            (batch_size, self.num_latents),
        )
        dots = torch.sparse.sampled_addmm(pattern_BF, rows_BD.to(compute_dtype), W_FD.T.to(compute_dtype))
        return dots.values().view(batch_size, k).to(rows_BD.dtype)


class _GatherPreActs(torch.autograd.Function):
    """``pre_acts_BF.gather(1, indices_BK)``, differentiable in x, ``W_enc``, ``b_enc``, ``b_dec`` by a sparse backward.

    The forward reads the dense pre-activations the encoder computed without autograd; the backward touches
    only the selected latents: ``W_enc``'s gradient is a transposed sparse product, ``b_enc``'s an
    ``index_add``, and x's an ``embedding_bag`` over the rows of ``W_enc`` (the sparse encoder backward of
    openai/sparse_autoencoder ``train.py``, ``EncWrapper``).
    """

    @staticmethod
    def forward(ctx, x_BD, W_enc_FD, b_enc_F, b_dec_D, pre_acts_BF, indices_BK):
        ctx.save_for_backward(x_BD, W_enc_FD, b_dec_D, indices_BK)
        return pre_acts_BF.gather(1, indices_BK)

    @staticmethod
    def backward(ctx, grad_BK):
        x_BD, W_enc_FD, b_dec_D, indices_BK = ctx.saved_tensors
        grad_BK = grad_BK.contiguous()
        grad_x = grad_W_enc = grad_b_enc = grad_b_dec = None
        grad_b_enc_F = W_enc_FD.new_zeros(W_enc_FD.shape[0]).index_add_(0, indices_BK.flatten(), grad_BK.flatten())
        if ctx.needs_input_grad[1]:
            pattern = _SelectionPattern(indices_BK, W_enc_FD.shape[0])
            grad_W_enc = pattern.transposed_matmul(grad_BK, x_BD - b_dec_D)
        if ctx.needs_input_grad[2]:
            grad_b_enc = grad_b_enc_F
        if ctx.needs_input_grad[3]:
            # Summed over the batch before the matrix product, so no (B, D) gradient is needed for b_dec
            # (openai/sparse_autoencoder train.py: "pre_bias grad optimization").
            grad_b_dec = -(grad_b_enc_F @ W_enc_FD)
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices_BK, W_enc_FD, per_sample_weights=grad_BK, mode="sum")
        return grad_x, grad_W_enc, grad_b_enc, grad_b_dec, None, None


class _SparseDecode(torch.autograd.Function):
    """``sum_j acts_BK[b, j] * W_dec_FD[indices_BK[b, j]]``: an ``embedding_bag`` forward and a sparse backward.

    torch's own ``embedding_bag`` backward with ``per_sample_weights`` took about 31 ms (top-k) and 154 ms
    (AuxK) per bench step on CPU, against about 13 ms and 40 ms through ``_SelectionPattern``.
    """

    @staticmethod
    def forward(ctx, acts_BK, indices_BK, W_dec_FD):
        ctx.save_for_backward(acts_BK, indices_BK, W_dec_FD)
        return F.embedding_bag(indices_BK, W_dec_FD, per_sample_weights=acts_BK, mode="sum")

    @staticmethod
    def backward(ctx, grad_BD):
        acts_BK, indices_BK, W_dec_FD = ctx.saved_tensors
        grad_BD = grad_BD.contiguous()
        pattern = _SelectionPattern(indices_BK, W_dec_FD.shape[0])
        grad_acts = pattern.sampled_dot(grad_BD, W_dec_FD) if ctx.needs_input_grad[0] else None
        grad_W_dec = pattern.transposed_matmul(acts_BK, grad_BD) if ctx.needs_input_grad[2] else None
        return grad_acts, None, grad_W_dec


class TopKSAE(nn.Module):
    """TopK sparse autoencoder (Gao et al. 2024 §2.3): ``z = relu(topk(W_enc (x - b_dec) + b_enc))``,
    ``x_hat = W_dec^T z + b_dec``.

    The encoder matmul is the only dense product. It runs without autograd; the selected pre-activations are
    gathered back into the graph by ``gather_pre_acts``, whose backward touches only the selected latents,
    and ``decode`` is a sparse ``embedding_bag`` with a sparse backward. So a training step costs one dense
    (B, D) x (D, F) matmul plus O(B * K * D) work.
    """

    def __init__(
        self,
        d_in: int,
        num_latents: int,
        k: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 < k <= num_latents:
            raise UserError(f"sae: k must be in 1..num_latents={num_latents}, found k={k}")
        self.d_in = d_in
        self.num_latents = num_latents
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        # Gao et al. 2024 §A.1 (and openai/sparse_autoencoder's "tied" init): random unit-norm decoder rows,
        # the encoder initialised to the decoder's transpose, zero biases until ``init_b_dec_``.
        W_dec_FD = torch.randn(num_latents, d_in, generator=generator, dtype=torch.float64)
        W_dec_FD /= torch.linalg.vector_norm(W_dec_FD, dim=1, keepdim=True)
        W_dec_FD = W_dec_FD.to(device=device, dtype=dtype)
        self.W_enc = nn.Parameter(W_dec_FD.clone())
        self.b_enc = nn.Parameter(torch.zeros(num_latents, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(W_dec_FD)
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype, device=device))
        self.k: Tensor
        self.register_buffer("k", torch.tensor(k, dtype=torch.int64, device=device))

    def gather_pre_acts(self, x_BD: Tensor, pre_acts_BF: Tensor, indices_BK: Tensor) -> Tensor:
        """(B, K) pre-activations of the latents ``indices_BK``, read from the detached ``pre_acts_BF`` (which
        must come from ``encode(x_BD)``) yet differentiable w.r.t. ``W_enc``, ``b_enc``, ``b_dec`` and x through
        a backward that touches only those latents. AuxK gathers its dead latents with this too."""
        return _GatherPreActs.apply(x_BD, self.W_enc, self.b_enc, self.b_dec, pre_acts_BF, indices_BK)

    def encode(self, x_BD: Tensor) -> EncoderOutput:
        """Select the ``k`` largest pre-activations of each row and ``relu`` them (Gao et al. 2024 §2.3)."""
        with torch.no_grad():
            pre_acts_BF = torch.addmm(self.b_enc, x_BD - self.b_dec, self.W_enc.T)
        top_indices_BK = top_k_indices(pre_acts_BF, int(self.k))
        top_acts_BK = F.relu(self.gather_pre_acts(x_BD, pre_acts_BF, top_indices_BK))
        return EncoderOutput(top_acts_BK, top_indices_BK, pre_acts_BF)

    def decode_without_bias(self, acts_BK: Tensor, indices_BK: Tensor) -> Tensor:
        """(B, D) ``sum_j acts_BK[b, j] * W_dec[indices_BK[b, j]]``, with no (B, F) matrix; AuxK's ``e_hat``."""
        return _SparseDecode.apply(acts_BK, indices_BK, self.W_dec)

    def decode(self, top_acts_BK: Tensor, top_indices_BK: Tensor) -> Tensor:
        """(B, D) reconstruction from the selected latents: the sparse decode plus ``b_dec``."""
        return self.decode_without_bias(top_acts_BK, top_indices_BK) + self.b_dec

    def forward(self, x_BD: Tensor) -> ForwardOutput:
        top_acts_BK, top_indices_BK, pre_acts_BF = self.encode(x_BD)
        x_hat_BD = self.decode(top_acts_BK, top_indices_BK)
        return ForwardOutput(x_hat_BD, top_acts_BK, top_indices_BK, pre_acts_BF)

    @torch.no_grad()
    def init_b_dec_(self, sample_SD: Tensor) -> None:
        """Set ``b_dec`` to the geometric median of an activation sample (Gao et al. 2024 §A.1)."""
        self.b_dec.copy_(geometric_median(sample_SD))

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm_(self) -> None:
        """Rescale every decoder row to unit norm (Gao et al. 2024 §A.1; run after each optimiser step)."""
        norms_F1 = torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True)
        self.W_dec.div_(norms_F1.clamp_min_(torch.finfo(self.W_dec.dtype).tiny))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions_(self) -> None:
        """Project each decoder row's gradient onto the plane orthogonal to that row, so a step does not fight
        the unit-norm constraint (openai/sparse_autoencoder ``unit_norm_decoder_grad_adjustment_``,
        dictionary_learning ``remove_gradient_parallel_to_decoder_directions``). Assumes unit-norm rows;
        does nothing when ``W_dec`` has no gradient."""
        grad_FD = self.W_dec.grad
        if grad_FD is None:
            return
        parallel_F1 = (grad_FD * self.W_dec).sum(1, keepdim=True)
        grad_FD.addcmul_(parallel_F1, self.W_dec, value=-1)

    def to_dictionary_learning_state_dict(self) -> dict[str, Tensor]:
        """The state dict of dictionary_learning's ``AutoEncoderTopK`` (see /work/shared/FORMATS.md), detached
        copies: ``decoder.weight`` is ``W_dec`` transposed, ``threshold`` is -1 (not set)."""
        return {
            "encoder.weight": self.W_enc.detach().clone(),
            "encoder.bias": self.b_enc.detach().clone(),
            "decoder.weight": self.W_dec.detach().T.contiguous(),
            "b_dec": self.b_dec.detach().clone(),
            "k": self.k.detach().clone(),
            "threshold": torch.tensor(-1.0, dtype=self.W_dec.dtype, device=self.W_dec.device),
        }

    @classmethod
    def from_dictionary_learning_state_dict(
        cls, state_dict: Mapping[str, Tensor], device: torch.device | str | None = None
    ) -> TopKSAE:
        """Build from dictionary_learning's ``AutoEncoderTopK`` state dict; a wrong key or shape is a ``UserError``.

        ``threshold`` is checked but not kept: TopK encodes by selection alone.
        """
        expected = sorted(_DICTIONARY_LEARNING_SHAPES)
        found = sorted(state_dict) if isinstance(state_dict, Mapping) else []
        if found != expected:
            # dictionary_learning's mid-training backups nest the state dict under "ae".
            hint = " (a mid-training backup? its 'ae' entry is the state dict)" if "ae" in found else ""
            raise UserError(
                f"not a dictionary_learning AutoEncoderTopK state dict: expected keys {expected}, found {found}{hint}"
            )
        if state_dict["encoder.weight"].ndim != 2:
            raise UserError(
                "dictionary_learning state dict: encoder.weight should be 2-D [num_latents, d_in], "
                f"found shape {list(state_dict['encoder.weight'].shape)}"
            )
        num_latents, d_in = state_dict["encoder.weight"].shape
        sizes = {"D": d_in, "F": num_latents}
        for key, letters in _DICTIONARY_LEARNING_SHAPES.items():
            want = tuple(sizes[letter] for letter in letters)
            if tuple(state_dict[key].shape) != want:
                raise UserError(
                    f"dictionary_learning state dict: {key} should have shape {list(want)} "
                    f"(d_in={d_in}, num_latents={num_latents}), found {list(state_dict[key].shape)}"
                )
        sae = cls(d_in, num_latents, int(state_dict["k"]), dtype=state_dict["encoder.weight"].dtype, device=device)
        with torch.no_grad():
            sae.W_enc.copy_(state_dict["encoder.weight"])
            sae.b_enc.copy_(state_dict["encoder.bias"])
            sae.W_dec.copy_(state_dict["decoder.weight"].T)
            sae.b_dec.copy_(state_dict["b_dec"])
        return sae

    def save(self, path: str | Path) -> None:
        """Write ``to_dictionary_learning_state_dict()`` with ``torch.save``, atomically (temporary file, then
        rename), so a crash never leaves a half-written ``ae.pt``."""
        path = Path(path)
        if not path.parent.is_dir():
            raise UserError(f"cannot save dictionary to {path}: folder {path.parent} does not exist")
        torch_save(path, self.to_dictionary_learning_state_dict())

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> TopKSAE:
        """Read a dictionary_learning ``AutoEncoderTopK`` ``ae.pt`` (as ``save`` writes it)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no dictionary file at {path}")
        try:
            state_dict = torch.load(path, map_location=device if device is not None else "cpu", weights_only=True)
        except Exception as err:
            raise UserError(f"cannot read dictionary file {path}: {err}") from err
        return cls.from_dictionary_learning_state_dict(state_dict, device=device)
