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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> None:
    """Save a figure atomically (temporary file, then rename) and close it."""
    from pathlib import Path

    from dictlearn.files import atomic_write

    atomic_write(Path(path), lambda temp: fig.savefig(temp, format="png", dpi=110, bbox_inches="tight"))
    _pyplot().close(fig)


def plot_training_curves(metrics: list[dict], folder) -> list[str]:
    """loss.png (loss, FVU, AuxK) and sparsity.png (L0, dead fraction) against training tokens."""
    plt = _pyplot()
    tokens = [m["tokens"] for m in metrics]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(tokens, [m["loss"] for m in metrics], label="loss")
    ax.plot(tokens, [m["fvu"] for m in metrics], label="FVU (normalised MSE)")
    ax.plot(tokens, [m["auxk_loss"] for m in metrics], label="AuxK loss")
    ax.set(xlabel="training tokens", ylabel="loss", yscale="log", title="Training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, f"{folder}/loss.png")
    fig, ax_l0 = plt.subplots(figsize=(6.5, 4))
    ax_l0.plot(tokens, [m["l0"] for m in metrics], color="tab:blue")
    ax_l0.set(xlabel="training tokens", ylabel="L0 (active latents per token)", title="Sparsity and dead latents")
    ax_dead = ax_l0.twinx()
    ax_dead.plot(tokens, [100 * m["dead_fraction"] for m in metrics], color="tab:red")
    ax_dead.set_ylabel("dead latents (%)", color="tab:red")
    save_figure(fig, f"{folder}/sparsity.png")
    return ["loss.png", "sparsity.png"]


def plot_density_histogram(density, folder, title: str = "Feature density on held-out tokens") -> str:
    """density.png: histogram of log10 firing frequency per latent; never-firing latents counted apart."""
    import numpy as np

    plt = _pyplot()
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
