"""The TopK sparse autoencoder of Gao et al. 2024 (arXiv 2406.04093) and its objective (FVU + AuxK); the TopK
family's shared encoder and decoder (BatchTopK and Matryoshka build on them), and TopK transcoders.

Shape letters are the package's (see ``dictlearn``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dictlearn.errors import UserError
from dictlearn.sae.base import (
    ONE_PROCESS,
    LossOutput,
    Objective,
    Ranks,
    SparseAutoencoder,
    SparseCodes,
    StepContext,
    random_unit_rows,
)
from dictlearn.sae.kernels import Selection, gather_pre_acts, sparse_decode, top_k_indices
from dictlearn.sae.losses import auxk_loss, fvu


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


class TopKFamilySAE(SparseAutoencoder):
    """What TopK, BatchTopK and Matryoshka share: ``pre_acts = W_enc (x - b_dec) + b_enc``, a selection of
    latents per row, ``x_hat = sum of the selected W_dec rows * acts + b_dec``.

    The encoder matmul is the only dense product. It runs without autograd; the selected pre-activations are
    gathered back into the graph by a backward that touches only the selected latents, and the decode is a
    sparse ``embedding_bag`` with a sparse backward (``dictlearn.sae.kernels``). So a training step costs one
    dense (B, D) x (D, F) matmul plus O(B * K * D) work.

    A transcoder (``d_out`` set, Paulo et al. 2025, "Transcoders beat sparse autoencoders"; sparsify's
    ``transcode``) reads one hook and reconstructs another: the input is not centred by ``b_dec`` (an
    output-space bias), and ``skip_connection`` adds a linear ``W_skip`` path from input to output (zero at
    initialisation, as sparsify's ``skip_connection``); ``decode`` gives the sparse part, ``forward`` adds the
    skip term.
    """

    def __init__(
        self,
        d_in: int,
        num_latents: int,
        k: int,
        *,
        d_out: int | None = None,
        skip_connection: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 < k <= num_latents:
            raise UserError(f"sae: k must be in 1..num_latents={num_latents}, found k={k}")
        if skip_connection and d_out is None:
            raise UserError("sae.skip_connection needs a transcoder: set sae.target_hook")
        self.d_in = d_in
        self.d_out = d_out or d_in
        self.transcoder = d_out is not None
        self.num_latents = num_latents
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        # Gao et al. 2024 §A.1 (and openai/sparse_autoencoder's "tied" init): random unit-norm decoder rows,
        # the encoder initialised to the decoder's transpose, zero biases until ``initialize_``. A transcoder
        # whose widths differ draws the encoder on its own, with rows of the same norm.
        W_dec_FD = random_unit_rows(num_latents, self.d_out, generator)
        W_enc_FD = W_dec_FD.clone() if self.d_out == d_in else random_unit_rows(num_latents, d_in, generator)
        self.W_enc = nn.Parameter(W_enc_FD.to(device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(num_latents, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(W_dec_FD.to(device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, dtype=dtype, device=device))
        self.W_skip = (
            nn.Parameter(torch.zeros(self.d_out, d_in, dtype=dtype, device=device)) if skip_connection else None
        )
        self.k: Tensor
        self.register_buffer("k", torch.tensor(k, dtype=torch.int64, device=device))

    def config(self) -> dict[str, Any]:
        return {
            "d_in": self.d_in,
            "num_latents": self.num_latents,
            "k": int(self.k),
            "d_out": self.d_out if self.transcoder else None,
            "skip_connection": self.W_skip is not None,
        }

    def _input_bias(self) -> Tensor:
        """What the encoder subtracts from x: ``b_dec`` for an SAE (Gao et al. 2024 §2.3), nothing for a
        transcoder (``b_dec`` lives in the output space)."""
        return self.b_dec if not self.transcoder else self.b_enc.new_zeros(self.d_in)

    def pre_activations(self, x_BD: Tensor) -> Tensor:
        """(B, F) ``W_enc (x - b_dec) + b_enc``, without autograd (gradients flow through ``gather``)."""
        with torch.no_grad():
            return torch.addmm(self.b_enc, x_BD - self._input_bias(), self.W_enc.T)

    def gather(self, x_BD: Tensor, pre_acts_BF: Tensor, selection: Selection) -> Tensor:
        """(B, K) pre-activations of the selected latents, read from the detached ``pre_acts_BF`` (which must
        come from ``pre_activations(x_BD)``) yet differentiable w.r.t. ``W_enc``, ``b_enc``, ``b_dec`` and x
        through a backward that touches only those latents. AuxK gathers its dead latents with this too."""
        return gather_pre_acts(x_BD, self.W_enc, self.b_enc, self._input_bias(), pre_acts_BF, selection)

    def select(self, pre_acts_BF: Tensor) -> Tensor:
        """(B, K) indices of the latents each row keeps."""
        raise NotImplementedError

    def encode(self, x_BD: Tensor) -> SparseCodes:
        pre_acts_BF = self.pre_activations(x_BD)
        selection = Selection(self.select(pre_acts_BF), self.num_latents)
        values_BK = F.relu(self.gather(x_BD, pre_acts_BF, selection))
        return SparseCodes(values_BK, selection.indices_BK, pre_acts_BF)

    def decode_without_bias(self, acts_BK: Tensor, selection: Selection) -> Tensor:
        """(B, D_out) ``sum_j acts_BK[b, j] * W_dec[indices_BK[b, j]]``, with no (B, F) matrix; AuxK's ``e_hat``."""
        return sparse_decode(acts_BK, selection, self.W_dec)

    def decode(self, codes: SparseCodes) -> Tensor:
        """(B, D_out) the sparse decode plus ``b_dec`` (a transcoder's skip term is added by ``forward``)."""
        return self.decode_without_bias(codes.values, Selection(codes.indices, self.num_latents)) + self.b_dec

    def forward(self, x_BD: Tensor):
        out = super().forward(x_BD)
        if self.W_skip is None:
            return out
        return out._replace(x_hat=out.x_hat + x_BD @ self.W_skip.T)

    @torch.no_grad()
    def init_b_dec_(self, sample_SD: Tensor) -> None:
        """Set ``b_dec`` to the geometric median of a sample of the reconstructed activations (Gao et al. 2024
        §A.1)."""
        self.b_dec.copy_(geometric_median(sample_SD))

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm_(self) -> None:
        """Rescale every decoder row to unit norm (Gao et al. 2024 §A.1; run after each optimiser step)."""
        unit_norm_rows_(self.W_dec)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions_(self) -> None:
        """See ``remove_parallel_gradient_``."""
        remove_parallel_gradient_(self.W_dec)


@torch.no_grad()
def unit_norm_rows_(W_FD: Tensor) -> None:
    """Rescale every row of ``W_FD`` to unit norm, in place (a zero row stays zero)."""
    norms_F1 = torch.linalg.vector_norm(W_FD, dim=1, keepdim=True)
    W_FD.div_(norms_F1.clamp_min_(torch.finfo(W_FD.dtype).tiny))


@torch.no_grad()
def remove_parallel_gradient_(W_FD: Tensor) -> None:
    """Project each row's gradient onto the plane orthogonal to that row, so a step does not fight the unit-norm
    constraint (Bricken et al. 2023, "Towards Monosemanticity", appendix on the autoencoder; openai/
    sparse_autoencoder ``unit_norm_decoder_grad_adjustment_``). Assumes unit-norm rows; does nothing when the
    parameter has no gradient."""
    grad_FD = W_FD.grad
    if grad_FD is None:
        return
    parallel_F1 = (grad_FD * W_FD).sum(1, keepdim=True)
    grad_FD.addcmul_(parallel_F1, W_FD, value=-1)


# openai/sparse_autoencoder ``model.LN``: the eps added to each row's std before dividing.
LAYER_NORM_EPS = 1e-5


def layer_norm_rows(x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(x_n, mu, std): each row centred and divided by its std plus ``LAYER_NORM_EPS``, as openai/
    sparse_autoencoder ``model.LN`` (torch's unbiased std; no learned scale); mu and std are (B, 1)."""
    mu_B1 = x_BD.mean(dim=-1, keepdim=True)
    centred_BD = x_BD - mu_B1
    std_B1 = centred_BD.std(dim=-1, keepdim=True)
    return centred_BD / (std_B1 + LAYER_NORM_EPS), mu_B1, std_B1


class TopKSAE(TopKFamilySAE):
    """TopK sparse autoencoder (Gao et al. 2024 §2.3): ``z = relu(topk(W_enc (x - b_dec) + b_enc))``,
    ``x_hat = W_dec^T z + b_dec``.

    ``input_norm`` (OpenAI's published TopK dictionaries, Gao et al. 2024 §2.1 "we normalize ... per token"):
    each input row is layer-normalised first (``layer_norm_rows``), its mean and std travel in the codes
    (``SparseCodes.input_norm``), and ``decode`` maps back: ``x_hat = (W_dec^T z + b_dec) * std + mu`` (std
    without the eps, as openai/sparse_autoencoder ``Autoencoder.decode``). Codes without the statistics (built
    by hand) decode in normalised units. The training objective does not normalise, so such an SAE is for
    reading, not for training.

    ``threshold`` (0-d buffer, -1 until set) is not used by ``encode``: it is dictionary_learning's
    ``AutoEncoderTopK.threshold``, the running estimate its ``TopKTrainer`` keeps (``TopKObjective``
    updates it the same way) so that library's ``encode(x, use_threshold=True)`` works on our files.
    """

    architecture = "topk"

    def __init__(self, d_in: int, num_latents: int, k: int, *, input_norm: bool = False, **kwargs) -> None:
        super().__init__(d_in, num_latents, k, **kwargs)
        if input_norm and self.transcoder:
            raise UserError("sae: input normalisation (OpenAI TopK) is defined for autoencoders, not transcoders")
        self.input_norm = input_norm
        self.threshold: Tensor
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=self.W_dec.dtype, device=self.W_dec.device))
        # Run folders written before the threshold existed load with it unset.
        self._register_load_state_dict_pre_hook(_default_threshold, with_module=True)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "input_norm": self.input_norm}

    def select(self, pre_acts_BF: Tensor) -> Tensor:
        return top_k_indices(pre_acts_BF, int(self.k))

    def encode(self, x_BD: Tensor) -> SparseCodes:
        if not self.input_norm:
            return super().encode(x_BD)
        x_BD, mu_B1, std_B1 = layer_norm_rows(x_BD)
        return super().encode(x_BD)._replace(input_norm=(mu_B1, std_B1))

    def decode(self, codes: SparseCodes) -> Tensor:
        x_hat_BD = super().decode(codes)
        if codes.input_norm is None:
            return x_hat_BD
        mu_B1, std_B1 = codes.input_norm
        return x_hat_BD * std_B1 + mu_B1


def _default_threshold(module, state_dict, prefix, *args) -> None:
    state_dict.setdefault(prefix + "threshold", module.threshold.detach().clone())


# dictionary_learning's ``TopKTrainer`` and ``BatchTopKTrainer``: the running threshold starts after ``threshold_start_step=1000``
# steps (as long as its learning-rate warm-up) and moves by ``1 - threshold_beta`` (0.001) a step, so it
# forgets the early SAE and ends as an average over its last thousands of steps.
THRESHOLD_START_STEP = 1000


def threshold_start_step(start_fraction: float | None, total_steps: int) -> int:
    """The step from which the running threshold is estimated: ``start_fraction`` of the run when given;
    otherwise dictionary_learning's 1000 steps, or half the run when that is sooner.

    The start keeps the estimate away from the first steps, whose smallest kept activations belong to a
    barely trained SAE: starting at step 0 with ``threshold_beta`` 0.999, a run of a few hundred steps keeps
    about 80% of its first estimate (0.999^220), and inference L0 came out 9.5 with k 32 on SmolLM2-135M.
    A run shorter than 2000 steps starts at its middle, so it still gets a threshold, from its second half.
    """
    if start_fraction is not None:
        return int(start_fraction * total_steps)
    return min(THRESHOLD_START_STEP, total_steps // 2)


THRESHOLD_BETA = 0.999  # dictionary_learning's threshold_beta: a memory of about 1,000 steps


def threshold_beta(beta: float | None, start_step: int, total_steps: int) -> float:
    """The running threshold's decay: ``beta`` when given; otherwise dictionary_learning's 0.999 when the
    estimate runs for at least 4,000 steps, and for a shorter estimate the decay whose memory (``1 / (1 - beta)``
    steps) is a quarter of the steps it runs for, as 1,000 steps are of a dictionary_learning run's last 4,000.

    With 0.999 over a short run the estimate barely leaves its first value, taken mid-run from a half-trained
    SAE: a 100-step BatchTopK run (k 32) on SmolLM2-135M then gave inference L0 17.7.
    """
    if beta is not None:
        return beta
    return min(THRESHOLD_BETA, 1 - 4 / max(4, total_steps - start_step))


class TopKObjective(Objective):
    """Gao et al. 2024: ``loss = fvu + aux_coef * auxk`` (§2.1, §A.2), the decoder-parallel gradient removed
    before each step and the decoder rows renormalised after it (§A.1), ``b_dec`` at the geometric median of a
    sample (§A.1). BatchTopK and Matryoshka reuse it with their own reconstruction."""

    # Rescale every step's gradient to unit norm: measured to take held-out FVU from 0.105 to 0.083 (below
    # dictionary_learning's 0.087 on the same rows); see ``dictlearn.training.step.GradientRule``.
    grad_normalization = "unit"

    def __init__(
        self,
        aux_k: int,
        aux_coef: float,
        threshold_start_step: int = THRESHOLD_START_STEP,
        threshold_beta: float = THRESHOLD_BETA,
    ) -> None:
        self.aux_k = aux_k
        self.aux_coef = aux_coef
        # The running threshold (kept for dictionary_learning's encode(use_threshold=True)): the step it is
        # estimated from and its decay; ``threshold_start_step()`` and ``threshold_beta()`` fit them to the run.
        self.threshold_start_step = threshold_start_step
        self.threshold_beta = threshold_beta

    def reconstruction(self, sae: TopKFamilySAE, x_BD: Tensor, y_BD: Tensor, ctx: StepContext):
        """(codes, x_hat, reconstruction loss, terms): the training-time forward and its loss (the FVU);
        BatchTopK and Matryoshka replace it."""
        pre_acts_BF = sae.pre_activations(x_BD)
        selection = Selection(sae.select(pre_acts_BF), sae.num_latents)
        values_BK = F.relu(sae.gather(x_BD, pre_acts_BF, selection))
        x_hat_BD = sae.decode_without_bias(values_BK, selection) + sae.b_dec
        if sae.W_skip is not None:
            x_hat_BD = x_hat_BD + x_BD @ sae.W_skip.T
        codes = SparseCodes(values_BK, selection.indices_BK, pre_acts_BF)
        fvu_loss = fvu(y_BD, x_hat_BD, ctx.ranks)
        return codes, x_hat_BD, fvu_loss, {"fvu": fvu_loss}

    def loss(self, sae: TopKFamilySAE, x_BD: Tensor, y_BD: Tensor, ctx: StepContext) -> LossOutput:
        codes, x_hat_BD, reconstruction_loss, terms = self.reconstruction(sae, x_BD, y_BD, ctx)
        aux = auxk_loss(sae, x_BD, y_BD, x_hat_BD, codes.pre_acts, ctx.dead_mask_F, self.aux_k, ctx.ranks)
        loss = reconstruction_loss + self.aux_coef * aux
        terms = {**terms, "auxk_loss": aux}
        codes = SparseCodes(codes.values.detach(), codes.indices, codes.pre_acts)
        return LossOutput(loss, terms, codes)

    def before_optimizer_step(self, sae: TopKFamilySAE) -> None:
        sae.remove_gradient_parallel_to_decoder_directions_()

    def after_optimizer_step(self, sae: TopKFamilySAE, out: LossOutput, ctx: StepContext) -> None:
        sae.set_decoder_norm_to_unit_norm_()
        if ctx.step >= self.threshold_start_step:
            self.update_threshold_(sae, out.codes, ctx.ranks)

    def update_threshold_(self, sae: TopKFamilySAE, codes: SparseCodes, ranks: Ranks = ONE_PROCESS) -> None:
        """dictionary_learning ``TopKTrainer.update_threshold``: the mean over rows of each row's smallest
        positive kept activation, folded into ``sae.threshold`` with weight ``1 - threshold_beta`` (taken as it
        is while the threshold is unset). Rows with no positive activation are left out. Under several
        ``ranks`` the mean is over the global batch's rows, so every rank holds the same threshold."""
        update_running_threshold_(sae.threshold, row_min_mean(codes.values, ranks), self.threshold_beta)

    def initialize_(self, sae: TopKFamilySAE, x_SD: Tensor, y_SD: Tensor) -> None:
        sae.init_b_dec_(y_SD)


def row_min_mean(values_BK: Tensor, ranks: Ranks = ONE_PROCESS) -> Tensor:
    """0-d: the mean over rows (of every rank's batch) of each row's smallest positive value (rows with none
    left out; 0 if no row has one)."""
    positive_BK = values_BK > 0
    row_min_B = torch.where(positive_BK, values_BK, torch.inf).amin(1)
    has_B = positive_BK.any(1)
    # Reduced in float64 (exact for the count and for a float32 or bf16 sum), divided as one process would.
    total, count = ranks.sum(torch.stack([torch.where(has_B, row_min_B, 0.0).sum().double(), has_B.sum().double()]))
    return total.to(values_BK.dtype) / count.long().clamp_min(1)


@torch.no_grad()
def update_running_threshold_(threshold: Tensor, estimate: Tensor, beta: float) -> None:
    """``threshold <- beta * threshold + (1 - beta) * estimate``, or the estimate itself while ``threshold`` is
    negative (unset); no host sync."""
    estimate = estimate.to(threshold.dtype)
    threshold.copy_(torch.where(threshold < 0, estimate, beta * threshold + (1 - beta) * estimate))
