"""The protocol every SAE architecture implements, the tuples it speaks in, and the objective protocol the
trainer runs.

An SAE maps activations ``x_BD`` (read at ``hook``) to sparse codes and back to ``x_hat_BD`` (the activation at
the same hook, or at ``target_hook`` for a transcoder). What is shared by every architecture lives here; each
architecture's file holds its class and its objective (loss terms, constraints after a step, scheduled events).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from dictlearn.sae.kernels import Selection, sparse_decode


class SparseCodes(NamedTuple):
    values: Tensor
    """(B, K) the active latents' values; 0 in padding entries (ReLU-family rows hold fewer than K non-zeros)."""

    indices: Tensor
    """(B, K) int64 latent indices, distinct within a row (padding entries point at inactive latents)."""

    pre_acts: Tensor | None
    """(B, F) the dense pre-activations, detached, where the architecture has them; else None."""

    input_norm: tuple[Tensor, Tensor] | None = None
    """((B, 1) mean, (B, 1) std) of each input row, for an SAE that layer-normalises its input (OpenAI's TopK
    files): ``encode`` fills it and ``decode`` uses it to return to the input's units; None otherwise. Codes
    carry it because the reconstruction needs the statistics of the row they came from."""


class ForwardOutput(NamedTuple):
    x_hat: Tensor
    """(B, D_out) the reconstruction (of the input, or of the target hook's activation for a transcoder)."""

    codes: SparseCodes


class LossOutput(NamedTuple):
    loss: Tensor
    """Scalar, differentiable: what the optimiser minimises."""

    terms: dict[str, Tensor]
    """Named scalar terms for the metrics (``fvu`` always; then the architecture's own, e.g. ``auxk_loss``)."""

    codes: SparseCodes
    """The batch's codes (detached), for the trainer's dead-latent counters."""


class Ranks:
    """The processes a data-parallel batch is split over, as a loss sees them: ``world_size`` ranks, each with an
    equal share of the global batch, and ``sum``/``min`` over them (all-reduces of detached statistics). This
    class is one process (both the identity); ``dictlearn.training.distributed.Distributed`` is several."""

    world_size: int = 1

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the ranks (a new tensor; detached)."""
        return tensor

    def min(self, tensor: Tensor) -> Tensor:
        """``tensor``'s elementwise minimum over the ranks (a new tensor; detached)."""
        return tensor


ONE_PROCESS = Ranks()


@dataclass
class StepContext:
    """What the trainer tells an objective about the step it is computing."""

    step: int
    total_steps: int
    dead_mask_F: Tensor
    """bool (F,): latents that have not fired for ``sae.dead_tokens`` tokens (the trainer owns the counters)."""

    ranks: Ranks = ONE_PROCESS
    """The ranks this batch is one share of (data-parallel training); one process by default."""


@dataclass
class EventContext:
    """What a scheduled event (resampling) may use: the optimiser whose state it may reset, the dead latents,
    and fresh training inputs (``sample(n)`` draws the next ``n`` rows of the training stream)."""

    step: int
    optimizer: torch.optim.Optimizer
    dead_mask_F: Tensor
    sample: Callable[[int], tuple[Tensor, Tensor]]
    """``sample(n)`` -> (inputs, targets), each (n, D), on the SAE's device and dtype."""

    records: list[dict] = field(default_factory=list)


def random_unit_rows(rows: int, width: int, generator: torch.Generator | None) -> Tensor:
    """(rows, width) float64 rows drawn from a standard normal and scaled to unit norm: the random decoder
    directions every architecture starts from (Bricken et al. 2023; Gao et al. 2024 §A.1)."""
    rows_RW = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    return rows_RW / torch.linalg.vector_norm(rows_RW, dim=1, keepdim=True)


def dense_to_codes(acts_BF: Tensor, pre_acts_BF: Tensor | None) -> SparseCodes:
    """The non-zeros of a dense code as ``SparseCodes``: K is the largest row count in the batch (at least 1);
    a row with fewer non-zeros is padded with zeros at other latents (``topk`` picks distinct columns)."""
    count = int((acts_BF != 0).sum(1).max()) if acts_BF.numel() else 0
    values_BK, indices_BK = acts_BF.topk(max(1, count), dim=1, sorted=False)
    return SparseCodes(values_BK, indices_BK, pre_acts_BF)


def codes_to_dense(codes: SparseCodes, num_latents: int) -> Tensor:
    """(B, F) dense code from ``SparseCodes`` (padding entries add zero)."""
    values = codes.values
    return values.new_zeros(values.shape[0], num_latents).scatter_add_(1, codes.indices, values)


class SparseAutoencoder(nn.Module):
    """The interface: ``encode``, ``decode``, ``forward``, sizes, ``architecture``, ``config`` and
    ``from_state_dict``. ``forward`` returns the same ``ForwardOutput`` every time, has no side effects and
    computes no loss. Every architecture keeps ``W_enc`` (F, D), ``W_dec`` (F, D_out), ``b_dec`` (D_out)."""

    architecture: ClassVar[str]

    d_in: int
    d_out: int
    num_latents: int
    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter

    def encode(self, x_BD: Tensor) -> SparseCodes:
        raise NotImplementedError

    def decode(self, codes: SparseCodes) -> Tensor:
        raise NotImplementedError

    def forward(self, x_BD: Tensor) -> ForwardOutput:
        codes = self.encode(x_BD)
        return ForwardOutput(self.decode(codes), codes)

    def config(self) -> dict[str, Any]:
        """The constructor's keyword arguments (JSON values), so ``from_state_dict`` can rebuild the SAE."""
        raise NotImplementedError

    @classmethod
    def from_state_dict(
        cls, config: dict[str, Any], state_dict: dict[str, Tensor], device: torch.device | str | None = None
    ) -> SparseAutoencoder:
        """Rebuild from ``config()`` and ``state_dict()``: same outputs for the same inputs."""
        dtype = next(iter(state_dict.values())).dtype if state_dict else torch.float32
        sae = cls(**config, dtype=dtype, device=device)
        sae.load_state_dict(state_dict)
        return sae

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """Make an SAE trained on ``x / scale`` (and targets ``y / scale``) act on unscaled activations: every
        bias and threshold is multiplied by ``scale``, so codes and reconstructions scale by it too
        (dictionary_learning's ``scale_biases`` after training with ``normalize_activations``)."""
        for name, tensor in self.named_parameters():
            if name.startswith("b_"):
                tensor.mul_(scale)
        for name, tensor in self.named_buffers():
            if name == "threshold":
                tensor.mul_(scale)


class DenseCodeSAE(SparseAutoencoder):
    """What the ReLU, gated and JumpReLU SAEs share: an autoencoder (``d_out = d_in``) whose code is computed
    densely and decoded sparsely, with the tied initialisation of Bricken et al. 2023 and the April 2024 update
    (dictionary_learning's AutoEncoder, GatedAutoEncoder and JumpReluAutoEncoder): random decoder rows of norm
    ``decoder_norm``, the encoder as their transpose, zero biases.

    ``latent_biases`` names the zero (F,) parameters each architecture has, registered between ``W_enc`` and
    ``W_dec`` so that the parameter order (state dicts, optimiser state in checkpoints) stays what it was.
    """

    latent_biases: ClassVar[tuple[str, ...]] = ("b_enc",)

    def __init__(
        self,
        d_in: int,
        num_latents: int,
        *,
        decoder_norm: float = 1.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.d_in = self.d_out = d_in
        self.num_latents = num_latents
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        W_dec_FD = decoder_norm * random_unit_rows(num_latents, d_in, generator)
        # A copy: ``.to`` returns the same tensor when the dtype is already float64.
        self.W_enc = nn.Parameter(W_dec_FD.clone().to(device=device, dtype=dtype))
        for name in self.latent_biases:
            self.register_parameter(name, nn.Parameter(torch.zeros(num_latents, dtype=dtype, device=device)))
        self.W_dec = nn.Parameter(W_dec_FD.to(device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype, device=device))

    def config(self) -> dict[str, Any]:
        # The initialisation's own arguments (decoder norm, initial threshold) are overwritten by a state dict.
        return {"d_in": self.d_in, "num_latents": self.num_latents}

    def decode(self, codes: SparseCodes) -> Tensor:
        """A sparse ``embedding_bag`` over the active latents: at a typical L0 of tens out of thousands of
        latents this is O(B * K * D) instead of the dense O(B * F * D)."""
        return sparse_decode(codes.values, Selection(codes.indices, self.num_latents), self.W_dec) + self.b_dec


class Objective:
    """An architecture's training recipe as data the trainer runs: ``loss`` (pure: no change to the SAE),
    then ``before_optimizer_step`` (gradient surgery), the optimiser step, ``after_optimizer_step``
    (constraints such as decoder renormalisation, running estimates), and ``scheduled_event`` (resampling).
    Objectives hold no tensors of their own, so a checkpoint of the SAE and the optimiser is the whole state."""

    # Train on activations scaled so that E||x||^2 = d_in (Anthropic's April 2024 update, "Training SAEs",
    # and SAELens's ``normalize_activations='expected_average_only_in'``): the sparsity penalty of the ReLU,
    # gated and JumpReLU recipes then means the same at every hook and model. The trainer folds the scale back
    # into the biases before saving (``SparseAutoencoder.fold_input_scale_``).
    normalize_inputs: ClassVar[bool] = False

    # Adam's (beta1, beta2) for this recipe: PyTorch's defaults unless the recipe's paper says otherwise.
    adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)

    # The gradient-norm rule when ``train.grad_normalization`` is unset (``dictlearn.training.step.GradientRule``):
    # none, as the L1/L0 recipes' papers train; the TopK family sets 'unit', which it was measured to need.
    grad_normalization: ClassVar[str] = "none"

    def loss(self, sae: SparseAutoencoder, x_BD: Tensor, y_BD: Tensor, ctx: StepContext) -> LossOutput:
        raise NotImplementedError

    def before_optimizer_step(self, sae: SparseAutoencoder) -> None:
        """Called after ``backward``, before clipping and the optimiser step."""

    def after_optimizer_step(self, sae: SparseAutoencoder, out: LossOutput, ctx: StepContext) -> None:
        """Called after the optimiser step (no autograd)."""

    def scheduled_event(self, sae: SparseAutoencoder, ctx: EventContext) -> dict | None:
        """Called after every step; returns a record of what it did (for the metrics), or None."""
        return None

    def initialize_(self, sae: SparseAutoencoder, x_SD: Tensor, y_SD: Tensor) -> None:
        """Data-dependent initialisation from a sample of (scaled) inputs and targets, before the first step."""
