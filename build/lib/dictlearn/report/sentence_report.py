"""get_sparse_rep.py's outputs: per-row statistics of the original activations and of the sparse codes, their
summary over rows, and the latents each group of sentences shares (each a data frame, printed and saved as CSV),
and two plots: the distribution of original versus sparse values, and a row x latent heatmap.

Shape letters: R rows (sentences, or tokens in per-token mode), F latents, L latents shown in the heatmap;
``codes_RF`` is the dense (R, F) sparse code.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from dictlearn.analysis.code_stats import (
    RowStats,
    Spread,
    dense_row_stats,
    group_latents,
    most_common,
    sparse_row_stats,
    spread,
    top_latents,
)
from dictlearn.analysis.sentences import SentenceCodes, SentenceTable
from dictlearn.params import SentencesParams
from dictlearn.report.common import save_figure

# Sentence text is cut to this many characters in printed tables and plot labels (the CSV keeps it whole).
SHOWN_CHARS = 46
# Latents listed per group (group table and heatmap); the heatmap of an ungrouped CSV shows this many in all.
GROUP_LATENTS = 3
UNGROUPED_HEATMAP_LATENTS = 24
HEATMAP_MAX_ROWS = 80


def output_folder(settings: SentencesParams) -> Path:
    """sentences.output_dir, or <dictionary>/sentences/<csv name>/ (<csv name>_per_token/ in per-token mode)."""
    if settings.output_dir:
        return Path(settings.output_dir)
    name = Path(settings.csv).stem + ("_per_token" if settings.per_token else "")
    return Path(settings.dictionary) / "sentences" / name


def shorten(text: str, width: int = SHOWN_CHARS) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _stat_columns(prefix: str, stats: RowStats) -> dict[str, list]:
    return {
        f"{prefix}_mean": stats.mean_R.tolist(),
        f"{prefix}_variance": stats.variance_R.tolist(),
        f"{prefix}_max_weight": stats.max_weight_R.tolist(),
        f"{prefix}_max_position": stats.max_position_R.tolist(),
    }


def codes_frame(table: SentenceTable, codes: SentenceCodes, num_latents: int, top: int) -> pd.DataFrame:
    """One row per code: its sentence (and token), the original's statistics, then the sparse code's."""
    sentence_R = codes.sentence_R.tolist()
    sparse = sparse_row_stats(codes.top_acts_RK, codes.top_indices_RK, num_latents)
    largest = top_latents(codes.top_acts_RK, codes.top_indices_RK, top)
    columns = {
        "sentence_index": [s + 1 for s in sentence_R],
        **({"group": [table.groups[s] for s in sentence_R]} if table.groups is not None else {}),
        "sentence": [table.sentences[s] for s in sentence_R],
        "position": codes.position_R.tolist(),
        "token": codes.token_R,
        "tokens": codes.tokens_R.tolist(),
        **_stat_columns("original", dense_row_stats(codes.x_RD)),
        "sparse_l0": sparse.l0_R.tolist(),
        **_stat_columns("sparse", sparse),
        "top_latents": [" ".join(f"{f}:{a:.3g}" for f, a in row) for row in largest],
    }
    return pd.DataFrame(columns)


def row_tables(frame: pd.DataFrame, per_token: bool) -> list[tuple[str, list[str], list[list]]]:
    """(title, headers, rows) of the two per-row tables: the original activations, then the sparse codes."""
    shown = frame.assign(sentence=frame["sentence"].map(shorten))
    ident = [("sentence_index", "#"), *([("group", "group")] if "group" in frame else []), ("sentence", "sentence")]
    ident += [("position", "pos"), ("token", "token")] if per_token else []
    stats = [("mean", "mean"), ("variance", "variance"), ("max_weight", "max weight")]
    original = [("tokens", "tokens"), *((f"original_{c}", h) for c, h in stats), ("original_max_position", "max dim")]
    sparse = [("sparse_l0", "L0"), *((f"sparse_{c}", h) for c, h in stats), ("sparse_max_position", "max latent")]
    sparse += [("top_latents", "top latents (latent:weight)")]
    title = "original activations at the hook" + ("" if per_token else " (averaged over each sentence's tokens)")
    return [
        (name, [h for _, h in ident + part], shown[[c for c, _ in ident + part]].values.tolist())
        for name, part in ((title, original), ("sparse codes", sparse))
    ]


def summary_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Each statistic's mean, spread and range over the rows; for the max positions, the most common one."""
    records = []
    for representation in ("original", "sparse"):
        for name in ("mean", "variance", "max_weight", *(["l0"] if representation == "sparse" else [])):
            values_R = torch.tensor(frame[f"{representation}_{name}"].to_numpy(dtype=float))
            records.append({"representation": representation, "statistic": name, **spread(values_R)._asdict()})
        position, rows = most_common(torch.tensor(frame[f"{representation}_max_position"].to_numpy()))
        records.append(
            {"representation": representation, "statistic": "max_position", "most_common": position, "rows": rows}
        )
    return pd.DataFrame(records, columns=["representation", "statistic", *Spread._fields, "most_common", "rows"])


def summary_table(summary: pd.DataFrame, total_rows: int) -> tuple[list[list], list[str]]:
    """Rows and headers of the printed summary; blank where a statistic has no such value."""
    rows = []
    for record in summary.to_dict("records"):
        numbers = [None if pd.isna(record[f]) else record[f] for f in Spread._fields]
        common = (
            None
            if pd.isna(record["most_common"])
            else f"{int(record['most_common'])} ({int(record['rows'])} of {total_rows})"
        )
        rows.append([record["representation"], record["statistic"], *numbers, common])
    return rows, ["representation", "statistic", "mean", "std", "min", "max", "most common (rows)"]


def _group_ids(frame: pd.DataFrame) -> tuple[list[str], torch.Tensor]:
    names = list(dict.fromkeys(frame["group"]))
    return names, torch.tensor([names.index(g) for g in frame["group"]])


def groups_frame(frame: pd.DataFrame, codes_RF: torch.Tensor) -> pd.DataFrame | None:
    """The latents each group's rows share and the other rows lack; None without a group column."""
    if "group" not in frame:
        return None
    names, group_R = _group_ids(frame)
    records = [
        {
            "group": names[g],
            "latent": s.latent,
            "active_in_group": f"{s.in_group}/{s.group_size}",
            "active_outside": f"{s.outside}/{s.outside_size}",
            "mean_weight_in_group": s.mean_weight,
        }
        for g, shared in enumerate(group_latents(codes_RF, group_R, len(names), GROUP_LATENTS))
        for s in shared
    ]
    return pd.DataFrame(
        records, columns=["group", "latent", "active_in_group", "active_outside", "mean_weight_in_group"]
    )


def heatmap_latents(codes_RF: torch.Tensor, groups: pd.DataFrame | None) -> list[int]:
    """The groups' shared latents in group order, or without groups the latents whose weight varies most."""
    if groups is not None and len(groups):
        return list(dict.fromkeys(groups["latent"].tolist()))
    variance_F = codes_RF.var(0, correction=0)
    count = min(UNGROUPED_HEATMAP_LATENTS, int((variance_F > 0).sum()))
    return variance_F.topk(count).indices.tolist()


def plot_values(codes: SentenceCodes, num_latents: int, path: Path) -> None:
    """values.png: histograms of the original activations' entries and of the sparse codes' non-zero weights."""
    from matplotlib.figure import Figure

    rows, d_in = codes.x_RD.shape
    nonzero = codes.top_acts_RK[codes.top_acts_RK > 0]
    fig = Figure(figsize=(11, 4))
    ax_original, ax_sparse = fig.subplots(1, 2)
    ax_original.hist(codes.x_RD.flatten().numpy(), bins=120, color="tab:blue")
    ax_original.set(
        yscale="log",
        xlabel="activation value",
        ylabel="entries (log scale)",
        title=f"original: {d_in} dims x {rows} rows",
    )
    ax_sparse.hist(nonzero.numpy(), bins=60, color="tab:orange")
    ax_sparse.set(
        yscale="log",
        xlabel="latent weight",
        title=f"sparse: non-zero weights (mean L0 {len(nonzero) / rows:.1f} of {num_latents} latents)",
    )
    ax_sparse.text(
        0.97,
        0.95,
        f"{rows * num_latents - len(nonzero):,} zero entries not shown",
        transform=ax_sparse.transAxes,
        ha="right",
        va="top",
    )
    for ax in (ax_original, ax_sparse):
        ax.grid(alpha=0.3)
    fig.suptitle("Distribution of values: original activations vs sparse codes")
    save_figure(fig, path)


def plot_heatmap(frame: pd.DataFrame, codes_RF: torch.Tensor, latents: list[int], path: Path) -> None:
    """heatmap.png: rows x chosen latents, each latent's column scaled to its largest weight in the table."""
    from matplotlib.figure import Figure

    shown = min(len(frame), HEATMAP_MAX_ROWS)
    weights_RL = codes_RF[:shown, latents]
    scaled_RL = weights_RL / weights_RL.amax(0).clamp_min(1e-12)
    per_token = (frame["position"] >= 0).any()
    labels = [
        (f"{g} | " if "group" in frame else "") + (f"#{i} {t!r}" if per_token else shorten(s, 40))
        for g, i, t, s in zip(
            frame.get("group", [""] * len(frame)), frame["sentence_index"], frame["token"], frame["sentence"]
        )
    ][:shown]
    fig = Figure(figsize=(4.5 + 0.32 * len(latents), 1.4 + 0.19 * shown))
    ax = fig.subplots()
    image = ax.imshow(scaled_RL.numpy(), aspect="auto", cmap="Oranges", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(shown), labels, fontsize=7)
    ax.set_xticks(range(len(latents)), [str(f) for f in latents], fontsize=7, rotation=90)
    ax.set_xlabel("latent")
    if "group" in frame:
        groups = frame["group"].tolist()[:shown]
        for row in range(1, shown):
            if groups[row] != groups[row - 1]:
                ax.axhline(row - 0.5, color="0.4", linewidth=0.6)
    what = "tokens" if per_token else "sentences"
    title = f"Sparse codes: {what} x latents" + (" shared within groups" if "group" in frame else " that vary most")
    if shown < len(frame):
        title += f" (first {shown} of {len(frame)} rows)"
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02, label="weight / the latent's largest weight here")
    save_figure(fig, path)
