"""Polysemantic neurons: each neuron's top-activating contexts, streamed, and how many distinct dictionary
latents (or, without a dictionary, clusters of residual vectors) those contexts fall into.

A neuron's top contexts are the text tokens where its |activation| is largest (and above the sparsity eps),
each kept with the tokens before it. With a dictionary trained at a hook of the neuron's layer (for
``blocks.6.mlp.hook_post``, say ``blocks.6.hook_resid_post``), a context is explained by the latents active
there. Latents are picked greedily: the latent active in the most contexts not yet explained takes those
contexts, and so on while the next one takes at least ``min_share`` of the ``top_contexts`` asked for. Only
latents at least ``min_lift`` times more frequent in the neuron's contexts than on all tokens are candidates,
so latents active nearly everywhere explain nothing, and latents that fire together on the same contexts
count once: the neuron is polysemantic when at least ``threshold`` latents take separate groups of its
contexts. This follows Bricken et al. 2023 ("Towards Monosemanticity", transformer-circuits.pub), who read a
neuron as polysemantic when its activations are spread over several unrelated dictionary features.

Without a dictionary the residual vectors at ``blocks.L.hook_resid_post`` of the contexts are centred on
the mean residual of all tokens and linked when their cosine similarity reaches ``cluster_similarity``;
the groups are the connected components (single linkage) of at least ``min_share`` of the contexts.

Shape letters: B windows, T positions, R text rows, U neurons, N top contexts per neuron, C context tokens,
K latents per row (the dictionary's k), F latents, D residual width.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dictlearn.analysis.dictionary_on_model import dictionary_at_hook
from dictlearn.errors import UserError
from dictlearn.formats.run_folder import AE_FILE
from dictlearn.lm.models import HookPoint, LanguageModel, capture_at_hooks
from dictlearn.params import Params
from dictlearn.sae.base import SparseAutoencoder


class Dictionary(NamedTuple):
    sae: SparseAutoencoder  # on the model's device
    hook: HookPoint  # where it was trained


class ContextGroup(NamedTuple):
    label: int  # the latent's index, or the cluster's number
    share: float  # fraction of the ``top_contexts`` asked for that it explains
    examples: list[str]  # its most activating contexts, the neuron's token in [[ ]]


class PolysemanticNeuron(NamedTuple):
    hook: str
    neuron: int
    explained_by: str  # "latent" or "cluster"
    contexts: int  # top contexts found (fewer than asked for when the neuron is rarely active)
    groups: list[ContextGroup]


def load_layer_dictionary(params: Params, config, layer: int) -> Dictionary:
    """``sparsity.dictionary``, opened as every script opens a dictionary, and refused unless it was trained on
    a hook of ``layer``."""
    folder = Path(params.sparsity.dictionary)
    if not (folder / AE_FILE).is_file():
        raise UserError(
            f"sparsity.dictionary: no dictionary at {folder} ({AE_FILE} missing); train one with training_script.py, "
            "or set sparsity.dictionary to null to cluster residual vectors instead"
        )
    opened = dictionary_at_hook(params, folder, config)
    if opened.params.model.name != params.model.name:
        raise UserError(
            f"sparsity.dictionary: {folder} was trained on model {opened.params.model.name!r}, not "
            f"{params.model.name!r}; use a dictionary of this model or set sparsity.dictionary to null"
        )
    if opened.hook.layer != layer:
        raise UserError(
            f"sparsity.dictionary: {folder} was trained at {opened.hook.name} (layer {opened.hook.layer}), but the "
            f"neurons are in layer {layer}; use a dictionary of that layer or set sparsity.dictionary to null"
        )
    return Dictionary(opened.sae, opened.hook)


class LatentExplainer:
    """Explains contexts by the dictionary latents active there; counts every latent's firing on all tokens."""

    kind = "latent"

    def __init__(self, sae: SparseAutoencoder, min_share: float, min_lift: float):
        self.sae, self.min_share, self.min_lift = sae, min_share, min_lift
        self.fired_F = torch.zeros(sae.num_latents, dtype=torch.long)
        self.rows = 0

    def features(self, rows_RD: Tensor) -> Tensor:
        """(R, K) the latents active on each row, -1 where fewer than K are."""
        out = self.sae.encode(rows_RD.to(self.sae.W_dec.dtype))
        active_RK = out.values > 0
        self.fired_F += torch.bincount(out.indices[active_RK].cpu(), minlength=self.sae.num_latents)
        self.rows += len(rows_RD)
        return out.indices.masked_fill(~active_RK, -1)

    def groups(self, latents_NK: Tensor, min_count: int) -> list[tuple[int, Tensor]]:
        """(latent, context indices) for the latents that take separate groups of at least ``min_count`` contexts."""
        ids, counts = latents_NK[latents_NK >= 0].unique(return_counts=True)
        lift = counts / len(latents_NK) / (self.fired_F[ids] / self.rows)
        candidates = (counts >= min_count) & (lift >= self.min_lift)
        # Ties in coverage go to the more specific latent.
        eligible = ids[candidates][lift[candidates].argsort(descending=True, stable=True)]
        member_NE = (latents_NK[:, :, None] == eligible).any(1)
        return _greedy_groups(member_NE, eligible.tolist(), min_count)


class ClusterExplainer:
    """Explains contexts by clusters of their centred residual vectors; keeps the mean residual of all tokens."""

    kind = "cluster"

    def __init__(self, similarity: float):
        self.similarity = similarity
        self.sum_D: Tensor | None = None
        self.rows = 0

    def features(self, rows_RD: Tensor) -> Tensor:
        rows_RD = rows_RD.float()
        batch_sum_D = rows_RD.sum(0, dtype=torch.float64).cpu()
        self.sum_D = batch_sum_D if self.sum_D is None else self.sum_D + batch_sum_D
        self.rows += len(rows_RD)
        return rows_RD

    def groups(self, residuals_ND: Tensor, min_count: int) -> list[tuple[int, Tensor]]:
        """(cluster number, context indices) for the connected components of at least ``min_count`` contexts."""
        centred_ND = F.normalize(residuals_ND - (self.sum_D / self.rows).float(), dim=1)
        n = len(residuals_ND)
        reach_NN = (centred_ND @ centred_ND.T >= self.similarity) | torch.eye(n, dtype=torch.bool)
        # Transitive closure by squaring: paths double in length each step.
        for _ in range(max(1, math.ceil(math.log2(max(n, 2))))):
            reach_NN = (reach_NN.float() @ reach_NN.float()) > 0
        component_N = reach_NN.float().argmax(1)  # each context's lowest-numbered reachable context
        components, sizes = component_N.unique(return_counts=True)
        member_NE = component_N[:, None] == components[sizes.argsort(descending=True)]
        return _greedy_groups(member_NE, list(range(member_NE.shape[1])), min_count)


def _greedy_groups(member_NE: Tensor, labels: list[int], min_count: int) -> list[tuple[int, Tensor]]:
    """Greedy cover of the N contexts by the E candidates (``member_NE[n, e]``: candidate e explains context n):
    repeatedly the candidate explaining most contexts not yet explained takes them, while it takes ``min_count``."""
    uncovered_N = torch.ones(member_NE.shape[0], dtype=torch.bool)
    groups = []
    while member_NE.shape[1]:
        cover_E = (member_NE & uncovered_N[:, None]).sum(0)
        best = int(cover_E.argmax())
        if int(cover_E[best]) < min_count:
            break
        taken_N = member_NE[:, best] & uncovered_N
        groups.append((labels[best], taken_N.nonzero().squeeze(1)))
        uncovered_N &= ~taken_N
    return groups


class TopRows:
    """Each unit's ``size`` rows with the largest scores seen so far (largest first), and those rows' payloads."""

    def __init__(self, size: int):
        self.size = size
        self.scores_NU: Tensor | None = None
        self.payloads: dict[str, Tensor] = {}

    def update(self, scores_RU: Tensor, payloads: dict[str, Tensor]) -> None:
        """Offer R rows: ``scores_RU`` for every unit, and per payload one (R, ...) entry per row."""
        n = min(self.size, len(scores_RU))
        if n == 0:
            return
        scores_nU, rows_nU = scores_RU.topk(n, dim=0)
        offered = {name: value[rows_nU].cpu() for name, value in payloads.items()}
        if self.scores_NU is None:
            self.scores_NU, self.payloads = scores_nU.cpu(), offered
            return
        scores = torch.cat([self.scores_NU, scores_nU.cpu()])
        self.scores_NU, keep_NU = scores.topk(min(self.size, len(scores)), dim=0)
        for name, value in offered.items():
            candidates = torch.cat([self.payloads[name], value])
            index = keep_NU.view(*keep_NU.shape, *[1] * (candidates.ndim - 2)).expand(-1, -1, *candidates.shape[2:])
            self.payloads[name] = candidates.gather(0, index)


def context_ids(input_ids_BT: Tensor, context_tokens: int) -> Tensor:
    """(B, T, C): for every position, the ``context_tokens`` tokens ending at it, -1 before the window's start."""
    padded = F.pad(input_ids_BT, (context_tokens - 1, 0), value=-1)
    return padded.unfold(1, context_tokens, 1)


@torch.no_grad()
def top_contexts(
    lm: LanguageModel,
    neuron_hook: HookPoint,
    explain_hook: HookPoint,
    batches: Iterable[Tensor],
    excluded_ids: Tensor,
    explainer: LatentExplainer | ClusterExplainer,
    *,
    top_n: int,
    context_tokens: int,
) -> TopRows:
    """Stream token-id batches (B, T) once, to the later of the two hooks, keeping every neuron's ``top_n``
    largest-|activation| text tokens with their context ids and the explainer's features there."""
    top = TopRows(top_n)
    for input_ids in batches:
        acts = capture_at_hooks(lm.model, [neuron_hook, explain_hook], input_ids.to(lm.device))
        text_BT = ~torch.isin(input_ids, excluded_ids)
        on_device = text_BT.to(lm.device)
        top.update(
            acts[neuron_hook.name][on_device].abs().float(),
            {
                "features": explainer.features(acts[explain_hook.name][on_device]),
                "context_ids": context_ids(input_ids, context_tokens)[text_BT].to(lm.device),
            },
        )
    return top


def describe_context(tokenizer, ids_C: Tensor) -> str:
    """The context as one line of text, its last token (the neuron's) in [[ ]]."""
    ids = [i for i in ids_C.tolist() if i >= 0]
    before = tokenizer.decode(ids[:-1], skip_special_tokens=True)
    text = f"{before}[[{tokenizer.decode(ids[-1:], skip_special_tokens=True)}]]"
    return " ".join(text.split())


def polysemantic_neurons(
    top: TopRows,
    explainer: LatentExplainer | ClusterExplainer,
    *,
    hook: str,
    eps: float,
    threshold: int,
    min_share: float,
    examples: int,
    tokenizer,
) -> list[PolysemanticNeuron]:
    """The neurons whose active top contexts fall into at least ``threshold`` groups, most groups first."""
    if top.scores_NU is None:
        return []
    min_count = max(1, math.ceil(min_share * top.size))
    found = []
    for neuron in range(top.scores_NU.shape[1]):
        active_N = top.scores_NU[:, neuron] > eps
        n = int(active_N.sum())  # scores are sorted, so the active contexts come first
        if n < threshold * min_count:
            continue
        groups = explainer.groups(top.payloads["features"][:n, neuron], min_count)
        if len(groups) < threshold:
            continue
        context_ids_NC = top.payloads["context_ids"][:n, neuron]
        described = [
            ContextGroup(
                label,
                len(rows) / top.size,
                [describe_context(tokenizer, context_ids_NC[row]) for row in rows[:examples]],
            )
            for label, rows in groups
        ]
        found.append(PolysemanticNeuron(hook, neuron, explainer.kind, n, described))
    found.sort(key=lambda p: (-len(p.groups), -sum(g.share for g in p.groups), p.neuron))
    return found
