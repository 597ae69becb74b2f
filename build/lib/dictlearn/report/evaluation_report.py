"""Tables and plots of evaluation results: one dictionary's table, the comparison table, and Pareto plots of
sparsity against fidelity with one labelled point per dictionary."""

from __future__ import annotations

import math
from pathlib import Path

from dictlearn.report.common import pyplot, save_figure


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def evaluation_rows(result: dict) -> list[list]:
    """One dictionary's evaluation table, in reading order, under SAEBench's names."""
    rows = [
        ["held-out tokens", f"{result['tokens']:,}"],
        ["L0 / L1", f"{result['l0']:.2f} / {result['l1']:.2f}"],
        ["explained variance (1 - FVU)", _fmt(result["explained_variance"])],
        ["MSE per entry", _fmt(result["mse"], ".4g")],
        ["cosine similarity", _fmt(result["cossim"])],
        ["l2 ratio / relative bias", f"{_fmt(result['l2_ratio'])} / {_fmt(result['relative_reconstruction_bias'])}"],
        ["alive latents", f"{100 * result['frac_alive']:.2f}%"],
        [
            "firing on >1% / >10% of tokens",
            f"{100 * result['freq_over_1_percent']:.2f}% / {100 * result['freq_over_10_percent']:.2f}%",
        ],
        [
            "max cosine decoder / encoder",
            f"{_fmt(result.get('average_max_decoder_cosine_sim'))} / "
            f"{_fmt(result.get('average_max_encoder_cosine_sim'))}",
        ],
    ]
    if "ce_loss_score" in result:
        rows += [
            ["LM-loss tokens", f"{result['lm_loss_tokens']:,}"],
            [
                "CE loss clean / spliced / zero",
                f"{result['ce_loss_without_sae']:.4f} / "
                f"{result['ce_loss_with_sae']:.4f} / {result['ce_loss_with_ablation']:.4f}",
            ],
            ["ce_loss_score", _fmt(result["ce_loss_score"])],
            ["KL spliced / zero", f"{result['kl_div_with_sae']:.4f} / {result['kl_div_with_ablation']:.4f}"],
            ["kl_div_score", _fmt(result["kl_div_score"])],
        ]
    if "absorption_rate" in result:
        rows += [
            ["absorption rate (first letter)", _fmt(result["absorption_rate"])],
            ["main latents per letter", _fmt(result["mean_num_split_features"], ".2f")],
        ]
    return rows


COMPARISON_COLUMNS = (
    ("L0", "l0", ".1f"),
    ("expl. var.", "explained_variance", ".4f"),
    ("cossim", "cossim", ".4f"),
    ("l2 ratio", "l2_ratio", ".3f"),
    ("rel. bias", "relative_reconstruction_bias", ".3f"),
    ("CE score", "ce_loss_score", ".4f"),
    ("KL score", "kl_div_score", ".4f"),
    ("alive", "frac_alive", ".3f"),
    ("dec. max cos", "average_max_decoder_cosine_sim", ".3f"),
    ("absorption", "absorption_rate", ".3f"),
)


def comparison_table(record: dict) -> tuple[list[list], list[str]]:
    """Rows (one per dictionary) and headers of the comparison table."""
    headers = ["dictionary", "label", *(title for title, _, _ in COMPARISON_COLUMNS)]
    rows = [
        [folder, entry["label"], *(_fmt(entry.get(key), spec) for _, key, spec in COMPARISON_COLUMNS)]
        for folder, entry in record.items()
    ]
    return rows, headers


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (lower L0, higher fidelity), by increasing L0."""
    front, best = [], -math.inf
    for l0, score in sorted(points, key=lambda p: (p[0], -p[1])):
        if score > best:
            front.append((l0, score))
            best = score
    return front


def plot_pareto(record: dict, folder: str | Path) -> list[str]:
    """pareto_explained_variance.png and pareto_ce_loss_score.png: L0 against each, a labelled point per
    dictionary, coloured by architecture, with the Pareto front dashed."""
    plt = pyplot()
    written = []
    for key, title in (("explained_variance", "explained variance"), ("ce_loss_score", "CE loss score")):
        entries = [e for e in record.values() if e.get(key) is not None and e.get("l0")]
        if not entries:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        architectures = sorted({e["label"].split()[0] for e in entries})
        colours = {a: f"C{i}" for i, a in enumerate(architectures)}
        for entry in entries:
            architecture = entry["label"].split()[0]
            ax.scatter(entry["l0"], entry[key], color=colours[architecture])
            ax.annotate(
                entry["label"], (entry["l0"], entry[key]), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
        front = _pareto_front([(e["l0"], e[key]) for e in entries])
        if len(front) > 1:
            ax.plot(*zip(*front), linestyle="--", color="gray", linewidth=1)
        for architecture, colour in colours.items():
            ax.scatter([], [], color=colour, label=architecture)
        ax.legend(title="architecture")
        ax.set(xlabel="L0 (active latents per token)", ylabel=title, title=f"Sparsity against {title}")
        if max(e["l0"] for e in entries) > 4 * min(e["l0"] for e in entries):
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        name = f"pareto_{key}.png"
        save_figure(fig, Path(folder) / name)
        written.append(name)
    return written
