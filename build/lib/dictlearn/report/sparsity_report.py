"""The sparsity analyzer's tables (rows for ``report.print_table``), plots and JSON record."""

from __future__ import annotations

import math
from pathlib import Path

from dictlearn.analysis.sparsity.activation_sparsity import ActivationSparsity
from dictlearn.analysis.sparsity.polysemantic import PolysemanticNeuron
from dictlearn.analysis.sparsity.prune import PruningResult
from dictlearn.report.common import pyplot, save_figure


def as_json(value):
    """NamedTuples (nested in lists too) as dicts, for ``write_json``."""
    if hasattr(value, "_asdict"):
        return {key: as_json(item) for key, item in value._asdict().items()}
    if isinstance(value, list | tuple):
        return [as_json(item) for item in value]
    return value


def sparsity_rows(sparsity: dict[str, ActivationSparsity], pruning: PruningResult) -> list[list]:
    """One row per hook: its summaries, and the neurons and weights pruning at ``pruning.threshold`` removes."""
    by_hook = {f"blocks.{layer.layer}.mlp.hook_post": layer for layer in pruning.layers}
    rows = []
    for name, stats in sparsity.items():
        layer = by_hook.get(name)
        rows.append(
            [
                name,
                f"{stats.mean_sparsity:.3f}",
                f"{stats.hoyer:.3f}",
                f"{100 * stats.never_firing_fraction:.2f}%",
                f"{layer.pruned} / {layer.neurons}" if layer else "",
                f"{layer.params_removed:,}" if layer else "",
            ]
        )
    return rows


def sparsity_headers(pruning: PruningResult) -> list[str]:
    return ["hook", "mean sparsity", "Hoyer", "never firing", f"pruned (> {pruning.threshold})", "params removed"]


def pruning_rows(result: PruningResult) -> list[list]:
    """The headline pruning: how much it removed and what it cost in LM loss."""
    pruned = sum(layer.pruned for layer in result.layers)
    neurons = sum(layer.neurons for layer in result.layers)
    change = result.loss_after - result.loss_before
    return [
        ["neurons pruned", f"{pruned:,} of {neurons:,} ({100 * pruned / neurons:.1f}%)"],
        ["parameters removed", f"{result.params_removed:,} ({100 * result.params_removed / result.model_params:.2f}%)"],
        ["LM loss before", f"{result.loss_before:.4f}"],
        ["LM loss after", f"{result.loss_after:.4f}"],
        ["LM loss change", f"{change:+.4f} ({100 * change / result.loss_before:+.2f}%)"],
        ["held-out tokens", f"{result.loss_tokens:,}"],
    ]


def sweep_rows(results: list[PruningResult]) -> list[list]:
    return [
        [
            result.threshold,
            sum(layer.pruned for layer in result.layers),
            f"{result.params_removed:,}",
            f"{100 * result.params_removed / result.model_params:.2f}%",
            f"{result.loss_after:.4f}",
            f"{result.loss_after - result.loss_before:+.4f}",
        ]
        for result in results
    ]


SWEEP_HEADERS = ["threshold", "neurons pruned", "params removed", "of the model", "LM loss", "change"]


def polysemantic_rows(neurons: list[PolysemanticNeuron]) -> list[list]:
    """One row per example context; the neuron and its latent (or cluster) named on their first row."""
    rows = []
    for neuron in neurons:
        for number, group in enumerate(neuron.groups):
            for index, example in enumerate(group.examples):
                rows.append(
                    [
                        neuron.neuron if number == index == 0 else "",
                        f"{neuron.explained_by} {group.label}" if index == 0 else "",
                        f"{100 * group.share:.0f}%" if index == 0 else "",
                        example,
                    ]
                )
    return rows


POLYSEMANTIC_HEADERS = ["neuron", "explained by", "share", "example context (neuron's token in [[ ]])"]


def plot_sparsity_histograms(sparsity: dict[str, ActivationSparsity], threshold: float, folder: Path) -> str:
    """sparsity_histograms.png: one histogram of per-neuron sparsity per hook, the pruning threshold marked."""
    plt = pyplot()
    columns = min(6, len(sparsity))
    rows = math.ceil(len(sparsity) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 1.7 * rows), sharex=True, squeeze=False)
    for ax, (name, stats) in zip(axes.flat, sparsity.items()):
        ax.hist(stats.sparsity_D.numpy(), bins=40, range=(0, 1), color="tab:blue")
        ax.axvline(threshold, color="tab:red", linewidth=0.8)
        ax.set_title(f"{name}\nmean {stats.mean_sparsity:.2f}", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(sparsity) :]:
        ax.axis("off")
    first = next(iter(sparsity.values()))
    fig.supxlabel(f"neuron sparsity (fraction of {first.tokens:,} tokens with |a| <= {first.eps:g})", fontsize=9)
    fig.supylabel("neurons", fontsize=9)
    fig.tight_layout()
    save_figure(fig, folder / "sparsity_histograms.png")
    return "sparsity_histograms.png"


def plot_pruning_curve(results: list[PruningResult], folder: Path) -> str:
    """pruning_curve.png: held-out LM loss against the share of the model's parameters pruned, per threshold."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    removed = [100 * result.params_removed / result.model_params for result in results]
    ax.plot(removed, [result.loss_after for result in results], marker="o")
    for x, result in zip(removed, results):
        ax.annotate(f"{result.threshold:g}", (x, result.loss_after), textcoords="offset points", xytext=(4, 4))
    ax.axhline(results[0].loss_before, color="grey", linestyle="--", label="unpruned")
    ax.set(
        xlabel="parameters removed (% of the model; linear below 0.01%, logarithmic above)",
        ylabel="held-out LM loss",
        title="Pruning the MLP neurons sparser than a threshold (labels)",
    )
    # Thresholds near 1 prune a handful of neurons, those near 0.5 a large part of the model: a log scale
    # keeps both ends apart.
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(0, 2 * max(removed) or 1)  # room for the last label
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    save_figure(fig, folder / "pruning_curve.png")
    return "pruning_curve.png"
