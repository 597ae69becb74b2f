"""Activation sparsity at hook points, and ``SparsityAnalyzer``: seed 000's three measurements (activation
sparsity, pruning by a sparsity threshold, polysemantic neurons) on a loaded model, set by ``params.sparsity``.

A unit (a hidden neuron at ``mlp.hook_post``, or one coordinate at any other hook) is inactive on a token when
``|a| <= eps``. Not ``a <= 0``: a gated MLP's hidden activation SiLU(gate) * up (Llama, SmolLM2) takes either
sign and is almost never exactly zero, and GELU's (GPT-2, GPT-NeoX) is small and negative, not zero, below its
threshold; one eps in activation units serves all three. A unit's sparsity is the fraction of text tokens on
which it is inactive (Hu et al. 2016's "average percentage of zeros", arXiv 1607.03250, with eps standing for
zero), its firing frequency the rest. A hook's Hoyer sparsity is Hoyer's sparseness of the activation vector
(Hoyer 2004, JMLR 5, eq. 1), averaged over tokens: 0 when all units are equal in size, 1 when one alone is
non-zero. BOS, EOS and padding positions are left out when ``buffer.exclude_special_tokens`` says so, as in
training.

Shape letters: B windows, T positions, R text rows (tokens), D units at a hook.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import islice
from pathlib import Path

import torch
from torch import Tensor

from dictlearn.activations.harvest import batched, special_token_ids
from dictlearn.analysis.sparsity.polysemantic import (
    ClusterExplainer,
    Dictionary,
    LatentExplainer,
    PolysemanticNeuron,
    load_layer_dictionary,
    polysemantic_neurons,
    top_contexts,
)
from dictlearn.analysis.sparsity.prune import LayerPruning, PruningResult, params_per_neuron, pruned_neurons
from dictlearn.errors import UserError
from dictlearn.evaluation.evaluate import lm_loss
from dictlearn.formats.run_folder import write_json
from dictlearn.lm.models import HookPoint, LanguageModel, capture_at_hooks, hook_width, resolve_hook
from dictlearn.lm.text import first_windows, held_out_windows, training_windows
from dictlearn.params import Params, SparsityParams


def hoyer_sparsity(acts_RD: Tensor) -> Tensor:
    """(R,) Hoyer's sparseness (sqrt(D) - |a|_1 / |a|_2) / (sqrt(D) - 1) of each row; an all-zero row counts as 1."""
    root_d = math.sqrt(acts_RD.shape[1])
    l1_R = acts_RD.abs().sum(1)
    l2_R = torch.linalg.vector_norm(acts_RD, dim=1)
    ratio_R = torch.where(l2_R > 0, l1_R / l2_R.clamp_min(torch.finfo(l2_R.dtype).tiny), 1.0)
    return (root_d - ratio_R) / (root_d - 1)


@dataclass(frozen=True)
class ActivationSparsity:
    """Every unit's sparsity at one hook over ``tokens`` text tokens, and the hook's summaries."""

    hook: str
    tokens: int
    eps: float
    sparsity_D: Tensor  # fraction of tokens with |a| <= eps
    mean_abs_D: Tensor  # mean |a| over the tokens
    hoyer: float  # Hoyer sparseness of the activation vector, averaged over the tokens

    @property
    def firing_frequency_D(self) -> Tensor:
        return 1 - self.sparsity_D

    @property
    def mean_sparsity(self) -> float:
        return float(self.sparsity_D.mean())

    @property
    def never_firing_fraction(self) -> float:
        return float((self.sparsity_D == 1).double().mean())

    def summary(self) -> dict:
        return {
            "hook": self.hook,
            "units": len(self.sparsity_D),
            "tokens": self.tokens,
            "eps": self.eps,
            "mean_sparsity": self.mean_sparsity,
            "hoyer": self.hoyer,
            "never_firing_fraction": self.never_firing_fraction,
        }


class SparsityCounter:
    """Running counts behind ``ActivationSparsity`` at one hook, one batch of rows at a time."""

    def __init__(self, hook: str, width: int, eps: float):
        self.hook, self.eps = hook, eps
        self.inactive_D = torch.zeros(width, dtype=torch.long)
        self.abs_sum_D = torch.zeros(width, dtype=torch.float64)
        self.hoyer_sum = 0.0
        self.tokens = 0

    def update(self, acts_RD: Tensor) -> None:
        abs_RD = acts_RD.float().abs()
        self.inactive_D += (abs_RD <= self.eps).sum(0).cpu()
        self.abs_sum_D += abs_RD.sum(0, dtype=torch.float64).cpu()
        self.hoyer_sum += float(hoyer_sparsity(abs_RD).sum(dtype=torch.float64))
        self.tokens += len(acts_RD)

    def result(self) -> ActivationSparsity:
        if self.tokens == 0:
            raise UserError(f"no text tokens reached {self.hook}: the text is empty or all special tokens")
        return ActivationSparsity(
            self.hook,
            self.tokens,
            self.eps,
            self.inactive_D.double() / self.tokens,
            self.abs_sum_D / self.tokens,
            self.hoyer_sum / self.tokens,
        )


@torch.no_grad()
def activation_sparsity(
    lm: LanguageModel, hooks: Sequence[HookPoint], batches: Iterable[Tensor], eps: float, excluded_ids: Tensor
) -> dict[str, ActivationSparsity]:
    """Stream token-id batches (B, T) once through the model, up to the last of ``hooks``, counting every unit's
    inactive text tokens at each hook; hook name -> ``ActivationSparsity``."""
    counters = {hook.name: SparsityCounter(hook.name, hook_width(lm.config, hook), eps) for hook in hooks}
    for input_ids in batches:
        acts = capture_at_hooks(lm.model, list(hooks), input_ids.to(lm.device))
        text_BT = (~torch.isin(input_ids, excluded_ids)).to(lm.device)
        for name, acts_BTD in acts.items():
            counters[name].update(acts_BTD[text_BT])
    return {name: counter.result() for name, counter in counters.items()}


def sparsity_layers(settings: SparsityParams, config) -> list[int]:
    """The layers to measure and prune: ``sparsity.layers``, checked against the model, or all of them."""
    count = config.num_hidden_layers
    for layer in settings.layers or []:
        if layer >= count:
            raise UserError(f"sparsity.layers: layer {layer} out of range; this model has layers 0..{count - 1}")
    return list(settings.layers) if settings.layers else list(range(count))


def resolve_named_hook(config, name: str, key: str) -> HookPoint:
    """``resolve_hook``, its error naming the params key the hook came from."""
    try:
        return resolve_hook(config, name)
    except UserError as err:
        raise UserError(f"{key}: {str(err).removeprefix('hook: ')}") from None


class SparsityAnalyzer:
    """Activation sparsity, pruning by sparsity and polysemantic neurons on ``lm``, as ``params.sparsity`` sets.

    Default text: ``sparsity.tokens`` tokens of the training windows for the statistics and the neurons' top
    contexts; ``sparsity.lm_loss_windows`` held-out windows for the LM loss, so pruning is judged on text that
    did not choose the neurons.
    """

    def __init__(self, lm: LanguageModel, params: Params):
        self.lm, self.params, self.settings = lm, params, params.sparsity
        self.layers = sparsity_layers(self.settings, lm.config)
        exclude = params.buffer.exclude_special_tokens
        self.excluded_ids = special_token_ids(lm.tokenizer) if exclude else torch.empty(0, dtype=torch.long)

    def hook(self, name: str, key: str = "hook") -> HookPoint:
        return resolve_named_hook(self.lm.config, name, key)

    def neuron_hooks(self, layers: Sequence[int]) -> list[HookPoint]:
        return [self.hook(f"blocks.{layer}.mlp.hook_post", "sparsity.layers") for layer in layers]

    def text_batches(self) -> Iterator[Tensor]:
        """(B, T) batches of training windows holding ``sparsity.tokens`` text tokens."""
        data = self.params.data
        windows = first_windows(training_windows(data, self.lm.tokenizer), data, self.settings.tokens)
        for batch in batched(windows, self.settings.batch_size):
            yield torch.tensor(batch, dtype=torch.long)

    def as_batches(self, id_list: Iterable) -> Iterator[Tensor]:
        """Token-id batches from ``id_list``: (B, T) tensors, single windows (lists or 1-D tensors), or texts
        (each tokenised as the tokenizer does by default, one window)."""
        for item in id_list:
            if isinstance(item, str):
                item = self.lm.tokenizer(item)["input_ids"]
            ids = torch.as_tensor(item, dtype=torch.long)
            yield ids if ids.ndim == 2 else ids[None]

    def compute_activation_sparsity(
        self, id_list: Iterable | None = None, hook: str | Sequence[str] | None = None
    ) -> dict[str, ActivationSparsity]:
        """Per-unit sparsity, firing frequency and mean |a| at ``hook`` (a name or several, all in one pass;
        default every ``sparsity.layers`` MLP's hidden neurons) over ``id_list`` (default the training text)."""
        names = [hook] if isinstance(hook, str) else hook
        hooks = self.neuron_hooks(self.layers) if names is None else [self.hook(name) for name in names]
        batches = self.text_batches() if id_list is None else self.as_batches(id_list)
        return activation_sparsity(self.lm, hooks, batches, self.settings.eps, self.excluded_ids)

    @cached_property
    def held_out(self) -> list[list[int]]:
        windows = list(islice(held_out_windows(self.params.data, self.lm.tokenizer), self.settings.lm_loss_windows))
        if not windows:
            raise UserError(
                f"data: no held-out windows for the LM loss; the text is shorter than {self.params.data.held_out_every} "
                f"windows of {self.params.data.context_size} tokens"
            )
        return windows

    def loss(self) -> tuple[float, int]:
        """The model's mean next-token loss on the held-out windows, and the tokens it averages."""
        return lm_loss(self.lm, self.held_out, self.settings.batch_size, self.excluded_ids)

    @cached_property
    def loss_before(self) -> tuple[float, int]:
        return self.loss()

    def prune_network(
        self,
        sparsity_threshold: float | None = None,
        layers: Sequence[int] | None = None,
        sparsity: dict[str, ActivationSparsity] | None = None,
        save_to: str | Path | None = None,
    ) -> PruningResult:
        """Prune the MLP hidden neurons of ``layers`` (default ``sparsity.layers``) whose sparsity exceeds the
        threshold (default ``sparsity.prune_threshold``) and measure the held-out LM loss before and after.

        ``sparsity`` (from ``compute_activation_sparsity``) is measured on the training text when not given.
        The model is left unpruned on return; ``save_to`` saves the pruned one as a transformers checkpoint.
        """
        threshold = self.settings.prune_threshold if sparsity_threshold is None else sparsity_threshold
        hooks = self.neuron_hooks(self.layers if layers is None else layers)
        if sparsity is None:
            sparsity = self.compute_activation_sparsity(hook=[hook.name for hook in hooks])
        missing = [hook.name for hook in hooks if hook.name not in sparsity]
        if missing:
            raise ValueError(f"no sparsity measured at {', '.join(missing)}")
        neurons_by_layer = {
            hook.layer: (sparsity[hook.name].sparsity_D > threshold).nonzero().squeeze(1) for hook in hooks
        }
        loss_before, tokens = self.loss_before
        with pruned_neurons(self.lm.model, neurons_by_layer):
            loss_after, _ = self.loss()
            if save_to is not None:
                self.save_pruned(Path(save_to), threshold, neurons_by_layer)
        per_layer = [
            LayerPruning(
                hook.layer,
                len(sparsity[hook.name].sparsity_D),
                len(neurons_by_layer[hook.layer]),
                len(neurons_by_layer[hook.layer]) * params_per_neuron(self.lm.model, hook.layer),
            )
            for hook in hooks
        ]
        return PruningResult(
            threshold,
            per_layer,
            sum(layer.params_removed for layer in per_layer),
            sum(parameter.numel() for parameter in self.lm.model.parameters()),
            loss_before,
            loss_after,
            tokens,
        )

    def save_pruned(self, folder: Path, threshold: float, neurons_by_layer: dict[int, Tensor]) -> None:
        """The (currently pruned) model and tokenizer as a checkpoint, with pruning.json saying what was pruned."""
        self.lm.model.save_pretrained(folder)
        self.lm.tokenizer.save_pretrained(folder)
        pruned = {str(layer): neurons.tolist() for layer, neurons in neurons_by_layer.items()}
        write_json(
            folder / "pruning.json",
            {"threshold": threshold, "pruned_neurons": pruned, "params": self.params.model_dump(mode="json")},
        )

    def find_polysemantic_neurons(
        self,
        hook: str | None = None,
        threshold: int | None = None,
        dictionary: Dictionary | None = None,
        id_list: Iterable | None = None,
    ) -> list[PolysemanticNeuron]:
        """The neurons at ``hook`` (default ``sparsity.polysemantic_hook``) whose top contexts in ``id_list``
        (default the training text) fall into at least ``threshold`` (default ``sparsity.polysemantic_threshold``)
        distinct latents of a dictionary of the same layer (default ``sparsity.dictionary``), or clusters of
        residual vectors when there is none; each with its latents (or clusters), their shares of the contexts
        and example contexts, most groups first."""
        settings = self.settings
        neuron_hook = self.hook(hook or settings.polysemantic_hook, "sparsity.polysemantic_hook")
        if dictionary is None and settings.dictionary is not None:
            dictionary = load_layer_dictionary(self.params, self.lm.config, neuron_hook.layer)
        if dictionary is not None:
            explainer = LatentExplainer(dictionary.sae.to(self.lm.device), settings.min_share, settings.min_lift)
            explain_hook = dictionary.hook
        else:
            explainer = ClusterExplainer(settings.cluster_similarity)
            explain_hook = self.hook(f"blocks.{neuron_hook.layer}.hook_resid_post")
        top = top_contexts(
            self.lm,
            neuron_hook,
            explain_hook,
            self.text_batches() if id_list is None else self.as_batches(id_list),
            self.excluded_ids,
            explainer,
            top_n=settings.top_contexts,
            context_tokens=settings.context_tokens,
        )
        return polysemantic_neurons(
            top,
            explainer,
            hook=neuron_hook.name,
            eps=settings.eps,
            threshold=settings.polysemantic_threshold if threshold is None else threshold,
            min_share=settings.min_share,
            examples=settings.examples,
            tokenizer=self.lm.tokenizer,
        )
