"""Structured pruning of MLP hidden neurons: zeroing every weight that belongs to a neuron alone, undone on
leaving the context, and counting the weights that removes.

Hidden neuron j of layer L is entry j of ``blocks.L.mlp.hook_post``. It is computed from row j (and bias entry
j) of each MLP input projection alone (``gate_proj`` and ``up_proj`` for Llama, ``dense_h_to_4h`` for GPT-NeoX,
column j of GPT-2's ``c_fc``, a ``Conv1D`` that stores its weight transposed) and read by column j of the
output projection alone, so zeroing exactly those removes the neuron and touches nothing else. Choosing the
neurons by how often they are inactive is Hu et al. 2016's Network Trimming (arXiv 1607.03250, section 3:
prune neurons with a high average percentage of zeros). The weights keep their shapes, so a pruned model
saves and loads as an ordinary checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from dictlearn.lm.models import architecture_of


class LayerPruning(NamedTuple):
    layer: int
    neurons: int  # hidden neurons in the layer's MLP
    pruned: int
    params_removed: int


class PruningResult(NamedTuple):
    threshold: float  # neurons inactive on more than this fraction of tokens were pruned
    layers: list[LayerPruning]
    params_removed: int
    model_params: int
    loss_before: float  # mean next-token loss on held-out text
    loss_after: float
    loss_tokens: int


def neuron_axes(model: nn.Module, layer: int) -> list[tuple[nn.Parameter, int]]:
    """Every parameter of ``layer``'s MLP that holds one slice per hidden neuron, with the axis of the slices."""
    arch = architecture_of(model.config)
    block = model.get_submodule(f"{arch.layers}.{layer}")
    axes = []
    for path in arch.mlp_in:
        projection = block.get_submodule(path)
        # transformers' Conv1D keeps its weight as (in, out); nn.Linear as (out, in).
        axes.append((projection.weight, 1 if isinstance(projection, Conv1D) else 0))
        if projection.bias is not None:
            axes.append((projection.bias, 0))
    down = block.get_submodule(arch.mlp_down)
    axes.append((down.weight, 0 if isinstance(down, Conv1D) else 1))
    return axes


def params_per_neuron(model: nn.Module, layer: int) -> int:
    """Weights that pruning one hidden neuron of ``layer`` zeroes."""
    return sum(parameter.numel() // parameter.shape[axis] for parameter, axis in neuron_axes(model, layer))


@contextmanager
def pruned_neurons(model: nn.Module, neurons_by_layer: Mapping[int, Tensor]) -> Iterator[None]:
    """Within the context the listed hidden neurons of each layer are pruned; leaving it restores them."""
    saved = []
    with torch.no_grad():
        for layer, neurons in neurons_by_layer.items():
            for parameter, axis in neuron_axes(model, layer):
                index = neurons.to(parameter.device)
                saved.append((parameter, axis, index, parameter.index_select(axis, index)))
                parameter.index_fill_(axis, index, 0)
    try:
        yield
    finally:
        with torch.no_grad():
            for parameter, axis, index, values in saved:
                parameter.index_copy_(axis, index, values)
