"""Tables (tabulate) and plots (matplotlib, Agg backend) for scripts to print and save."""

from __future__ import annotations

from tabulate import tabulate


def print_table(rows, headers, floatfmt: str = ".4g") -> None:
    print(tabulate(rows, headers=headers, floatfmt=floatfmt, tablefmt="simple"))


def format_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024
    return f"{count:.1f} GiB"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> None:
    """Save a figure atomically (temporary file, then rename) and close it."""
    from pathlib import Path

    from dictlearn.files import atomic_write

    atomic_write(Path(path), lambda temp: fig.savefig(temp, format="png", dpi=110, bbox_inches="tight"))
    pyplot().close(fig)


def _format_token_axes(*axes) -> None:
    """Token counts as 200k / 1.5M on the x axis, and a light grid."""
    from matplotlib.ticker import EngFormatter

    for ax in axes:
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)


# Record fields that are not loss terms of an architecture's objective (the trainer's own, and events').
_NOT_TERMS = {"step", "tokens", "loss", "fvu", "l0", "dead_fraction", "lr", "resampled"}


def plot_training_curves(metrics: list[dict], folder) -> list[str]:
    """loss.png (FVU and the objective's loss; the objective's other terms beside it, e.g. TopK's AuxK or the
    L1 penalty) and sparsity.png (L0; dead latents) over training tokens."""
    plt = pyplot()
    tokens = [m["tokens"] for m in metrics]
    fig, (ax_fvu, ax_terms) = plt.subplots(1, 2, figsize=(11, 4))
    ax_fvu.plot(tokens, [m["fvu"] for m in metrics], label="FVU (normalised MSE)")
    ax_fvu.plot(tokens, [m["loss"] for m in metrics], label="the objective's loss", linestyle="--")
    ax_fvu.set(
        xlabel="training tokens", ylabel="fraction of variance unexplained", yscale="log", title="Reconstruction"
    )
    ax_fvu.legend()
    terms = [name for name in (metrics[0] if metrics else {}) if name not in _NOT_TERMS]
    for name in terms:
        ax_terms.plot(tokens, [m.get(name, float("nan")) for m in metrics], label=name)
    ax_terms.set(xlabel="training tokens", ylabel="value", title="The objective's other terms")
    if terms:
        ax_terms.legend()
    _format_token_axes(ax_fvu, ax_terms)
    save_figure(fig, f"{folder}/loss.png")
    fig, (ax_l0, ax_dead) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    l0 = [m["l0"] for m in metrics]
    dead = [100 * m["dead_fraction"] for m in metrics]
    ax_l0.plot(tokens, l0, color="tab:blue")
    ax_l0.set(ylabel="L0 (active latents per token)", title="Sparsity and dead latents")
    ax_l0.set_ylim(0, 1.15 * max(l0, default=1))
    ax_dead.plot(tokens, dead, color="tab:red")
    ax_dead.set(xlabel="training tokens", ylabel="dead latents (%)")
    ax_dead.set_ylim(0, max(1.0, 1.15 * max(dead, default=0)))
    _format_token_axes(ax_l0, ax_dead)
    save_figure(fig, f"{folder}/sparsity.png")
    return ["loss.png", "sparsity.png"]


def plot_density_histogram(density, folder, title: str = "Feature density on held-out tokens") -> str:
    """density.png: histogram of log10 firing frequency per latent; never-firing latents counted apart."""
    import numpy as np

    plt = pyplot()
    density = np.asarray(density, dtype=float)
    alive = density[density > 0]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if len(alive):
        ax.hist(np.log10(alive), bins=50, color="tab:blue")
    ax.set(xlabel="log10 feature density (fraction of tokens a latent fires on)", ylabel="latents", title=title)
    ax.text(0.02, 0.95, f"never fired: {int((density == 0).sum())} of {len(density)}", transform=ax.transAxes, va="top")
    save_figure(fig, f"{folder}/density.png")
    return "density.png"


def evaluation_rows(result: dict) -> list[list]:
    """The evaluation table's rows, in reading order."""
    rows = [
        ["held-out tokens", f"{result['tokens']:,}"],
        ["FVU (normalised MSE)", f"{result['fvu']:.4f}"],
        ["L0", f"{result['l0']:.2f}"],
        ["dead latents", f"{100 * result['dead_fraction']:.2f}%"],
    ]
    if "loss_recovered" in result:
        rows += [
            ["LM loss clean", f"{result['clean']:.4f}"],
            ["LM loss spliced", f"{result['spliced']:.4f}"],
            ["LM loss zero-ablated", f"{result['zero_ablated']:.4f}"],
            ["LM loss recovered", f"{100 * result['loss_recovered']:.2f}%"],
        ]
    return rows


def plot_sweep(rows: list[dict], path) -> None:
    """sweep.png: L0 against FVU, one point per run (labelled with its run name), one colour per hook."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for hook in dict.fromkeys(row["hook"] for row in rows):
        points = [row for row in rows if row["hook"] == hook]
        ax.scatter([r["l0"] for r in points], [r["fvu"] for r in points], label=hook)
        for r in points:
            ax.annotate(r["run"], (r["l0"], r["fvu"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="L0 (active latents per token)", ylabel="FVU on held-out tokens", title="Sweep: sparsity vs error")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
