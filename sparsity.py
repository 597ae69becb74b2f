"""Activation sparsity of MLP neurons, pruning by a sparsity threshold, and polysemantic neurons.

    python sparsity.py [--params params.json]

Settings come from the params' ``sparsity`` section. Prints tables and writes <sparsity.output_dir>/:
sparsity.json, neuron_sparsity.safetensors, params.json, sparsity_histograms.png, pruning_curve.png.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from dictlearn.analysis.sparsity.activation_sparsity import SparsityAnalyzer, resolve_named_hook, sparsity_layers
from dictlearn.analysis.sparsity.polysemantic import load_layer_dictionary
from dictlearn.cli import argument_parser, quiet_transformers, threads_from_env
from dictlearn.errors import run_script
from dictlearn.files import check_output_folder, write_json
from dictlearn.lm.models import hook_width, load_config, load_language_model
from dictlearn.lm.text import check_source
from dictlearn.params import load_params
from dictlearn.report.common import print_table
from dictlearn.report.sparsity_report import (
    POLYSEMANTIC_HEADERS,
    SWEEP_HEADERS,
    as_json,
    plot_pruning_curve,
    plot_sparsity_histograms,
    polysemantic_rows,
    pruning_rows,
    sparsity_headers,
    sparsity_rows,
    sweep_rows,
)

# Polysemantic neurons printed (all of them go to sparsity.json).
SHOWN_NEURONS = 5


def main() -> None:
    parser = argument_parser(__doc__.strip().splitlines()[0])
    args = parser.parse_args()
    threads_from_env()
    quiet_transformers()
    params = load_params(args.params)
    settings = params.sparsity
    if settings.save_pruned is not None:
        check_output_folder(settings.save_pruned, "sparsity.save_pruned")
    check_source(params.data)
    config = load_config(params.model)
    sparsity_layers(settings, config)
    neuron_hook = resolve_named_hook(config, settings.polysemantic_hook, "sparsity.polysemantic_hook")
    dictionary = None
    if settings.dictionary is not None:
        dictionary = load_layer_dictionary(params, config, neuron_hook.layer)
    lm = load_language_model(params.model)
    analyzer = SparsityAnalyzer(lm, params)
    folder = Path(settings.output_dir.format(model=lm.short_name))
    check_output_folder(folder, "sparsity.output_dir")

    print(f"activation sparsity of {len(analyzer.layers)} layers' MLP neurons over {settings.tokens:,} tokens")
    sparsity = analyzer.compute_activation_sparsity()
    thresholds = sorted({*settings.sweep_thresholds, settings.prune_threshold})
    print(f"pruning at thresholds {', '.join(f'{t:g}' for t in thresholds)}")
    sweep = [
        analyzer.prune_network(
            threshold,
            sparsity=sparsity,
            save_to=settings.save_pruned if threshold == settings.prune_threshold else None,
        )
        for threshold in thresholds
    ]
    headline = sweep[thresholds.index(settings.prune_threshold)]
    explained = f"latents of {settings.dictionary}" if dictionary else "clusters of residual vectors"
    print(f"polysemantic neurons at {neuron_hook.name}, explained by {explained}")
    neurons = analyzer.find_polysemantic_neurons(neuron_hook.name, dictionary=dictionary)

    print()
    print_table(sparsity_rows(sparsity, headline), headers=sparsity_headers(headline))
    print()
    print_table(pruning_rows(headline), headers=[f"pruning at sparsity > {headline.threshold}", ""])
    print()
    print_table(sweep_rows(sweep), headers=SWEEP_HEADERS)
    print()
    kind = "latents" if dictionary else "clusters"
    print(
        f"{len(neurons)} of {hook_width(lm.config, neuron_hook)} neurons at {neuron_hook.name} are polysemantic "
        f"(at least {settings.polysemantic_threshold} distinct {kind})"
    )
    if neurons:
        print_table(polysemantic_rows(neurons[:SHOWN_NEURONS]), headers=POLYSEMANTIC_HEADERS)

    folder.mkdir(parents=True, exist_ok=True)
    plots = [plot_sparsity_histograms(sparsity, settings.prune_threshold, folder), plot_pruning_curve(sweep, folder)]
    save_file(
        {
            f"{name}.{key}": getattr(stats, key)
            for name, stats in sparsity.items()
            for key in ("sparsity_D", "mean_abs_D")
        },
        folder / "neuron_sparsity.safetensors",
    )
    write_json(
        folder / "sparsity.json",
        {
            "sparsity": [stats.summary() for stats in sparsity.values()],
            "pruning": as_json(sweep),
            "polysemantic": as_json(neurons),
        },
    )
    write_json(folder / "params.json", params.model_dump(mode="json"))
    print(f"\nwrote {folder}: sparsity.json, neuron_sparsity.safetensors, params.json, {', '.join(plots)}")


if __name__ == "__main__":
    run_script(main)
