"""One analysis pass over a corpus, and the per-latent records it yields for the feature database.

``AnalysisPass`` takes the batches of ``top_contexts.scan`` and feeds the top-N tables (``TopContexts``, with
contexts as wide as a window), the magnitude levels and a sum of activations, and keeps each window's token ids
in scan order. Contexts keep their window and positions: a context record names its window (an index into the
pass's windows, stored once) and gives the latent's non-zero activations in it as ``[position, value]`` pairs.

A latent's record: ``latent``, ``fired_tokens``, ``frequency``, ``max_activation``, ``mean_activation`` (over the
tokens it fires on), ``histogram``, ``top_contexts``, ``levels`` (``low``, ``high``: fractions of the max, and
their ``contexts``), ``quiet_windows`` (windows where it never fired), ``top_tokens`` (the tokens at its top
contexts' maxima) and ``dla`` (``promoted`` and ``suppressed``: lists of ``{"token", "logit"}``).

Shape letters: B windows in a batch, S tokens per window, K active latents per token, F latents, N top contexts
per latent, W = 2 S - 1 context width in the top-N tables, M level slots per latent, T DLA tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from dictlearn.analysis.logit_attribution import LogitAttribution
from dictlearn.analysis.magnitude_levels import NO_WINDOW, MagnitudeLevels
from dictlearn.analysis.top_contexts import NO_TOKEN, Context, TopContexts
from dictlearn.params import AnalysisParams


class AnalysisPass:
    """The streaming state of an analysis; ``update`` has ``TopContexts.update``'s arguments, so ``scan``
    drives it."""

    def __init__(self, num_latents: int, settings: AnalysisParams, seq_len: int, device=None) -> None:
        # Contexts as wide as a window on both sides of their maximum hold the whole window, wherever it lies.
        self.top = TopContexts(num_latents, settings.top_n, seq_len - 1, seq_len - 1, settings.histogram_bins, device)
        self.levels = MagnitudeLevels(
            num_latents, settings.levels, settings.per_level, settings.quiet_windows, seq_len, settings.seed, device
        )
        self.sum_F = torch.zeros(num_latents, dtype=torch.float64, device=device)
        self.windows: list[torch.Tensor] = []  # (B, S) token ids of each batch, on the CPU

    @property
    def tokens_seen(self) -> int:
        return self.top.tokens_seen

    @property
    def mean_F(self) -> torch.Tensor:
        """Each latent's mean activation over the tokens it fires on (0 if it never does)."""
        return self.sum_F / self.top.fired_F.clamp_min(1)

    def update(
        self,
        input_ids_BS: torch.Tensor,
        top_acts_BSK: torch.Tensor,
        top_indices_BSK: torch.Tensor,
        text_BS: torch.Tensor,
    ) -> None:
        self.top.update(input_ids_BS, top_acts_BSK, top_indices_BSK, text_BS)
        self.levels.update(top_acts_BSK, top_indices_BSK, text_BS)
        acts_BSK = top_acts_BSK.to(self.sum_F.device, torch.float64) * text_BS.to(self.sum_F.device).unsqueeze(-1)
        self.sum_F.index_add_(0, top_indices_BSK.to(self.sum_F.device).flatten(), acts_BSK.flatten())
        self.windows.append(input_ids_BS.cpu())

    def window_ids(self) -> torch.Tensor:
        """(windows, S) token ids of every window scanned, in scan order (a window's index is its id)."""
        return torch.cat(self.windows) if self.windows else torch.empty(0, 0, dtype=torch.long)


def context_record(window: int, activation: float, acts_S: list[float]) -> dict:
    """A context: its window, its largest activation and where, and the latent's non-zero activations."""
    return {
        "window": window,
        "activation": round(activation, 4),
        "max_position": max(range(len(acts_S)), key=acts_S.__getitem__),
        "acts": [[position, round(act, 3)] for position, act in enumerate(acts_S) if act > 0],
    }


def _top_context_records(analysis: AnalysisPass, window_ids: torch.Tensor) -> list[list[dict]]:
    """Each latent's top contexts as records, their windows found by their tokens (a top-N context holds its
    whole window, placed so that its maximum sits in the middle slot)."""
    seq = window_ids.shape[1]
    index = {row.tobytes(): w for w, row in reversed(list(enumerate(window_ids.numpy())))}
    values_FN, tokens_FNW = analysis.top.values_FN.cpu(), analysis.top.tokens_FNW.cpu()
    acts_FNW = analysis.top.acts_FNW.cpu()
    first_FN = (tokens_FNW != NO_TOKEN).int().argmax(2).tolist()
    tokens, acts = tokens_FNW.to(window_ids.dtype).numpy(), acts_FNW.numpy()
    records = []
    for f, values in enumerate(values_FN.tolist()):
        contexts = []
        for n, value in enumerate(values):
            if value <= 0:
                break
            start = first_FN[f][n]
            window = index[tokens[f, n, start : start + seq].tobytes()]
            contexts.append(context_record(window, value, acts[f, n, start : start + seq].tolist()))
        records.append(contexts)
    return records


def _level_records(levels: MagnitudeLevels, edges: list[float]) -> list[list[dict]]:
    """Each latent's levels, lowest first, each with its contexts from the largest activation down."""
    values_FM, windows_FM = levels.values_FM.cpu().tolist(), levels.windows_FM.cpu().tolist()
    acts_FMS = levels.acts_FMS.cpu()
    per_level, records = levels.per_level, []
    for f, (values_M, windows_M) in enumerate(zip(values_FM, windows_FM)):
        latent = []
        for j in range(levels.num_levels):
            slots = [m for m in range(j * per_level, (j + 1) * per_level) if windows_M[m] != NO_WINDOW]
            slots.sort(key=lambda m: -values_M[m])
            contexts = [context_record(windows_M[m], values_M[m], acts_FMS[f, m].tolist()) for m in slots]
            latent.append({"low": edges[j], "high": edges[j + 1], "contexts": contexts})
        records.append(latent)
    return records


def analysis_records(
    analysis: AnalysisPass, dla: LogitAttribution, edges: list[float], token_text: Callable[[list[int]], dict[int, str]]
) -> tuple[list[dict], dict[int, list[str]]]:
    """Every latent's record, and the token strings of every window a context points into.

    ``token_text`` maps token ids to their strings (``token_display.token_strings`` with a tokenizer)."""
    window_ids = analysis.window_ids()
    top_contexts = _top_context_records(analysis, window_ids)
    levels = _level_records(analysis.levels, edges)
    quiet_FQ = analysis.levels.quiet_windows_FQ.cpu().tolist()
    used = sorted(
        {c["window"] for latent in top_contexts for c in latent}
        | {c["window"] for latent in levels for level in latent for c in level["contexts"]}
        | {w for quiet in quiet_FQ for w in quiet if w != NO_WINDOW}
    )
    dla_ids = torch.cat([dla.promoted_ids_FT, dla.suppressed_ids_FT], 1)
    text = token_text(sorted(set(window_ids[used].flatten().tolist()) | set(dla_ids.flatten().tolist())))
    windows = {w: [text[t] for t in window_ids[w].tolist()] for w in used}
    top, fired_F = analysis.top, analysis.top.fired_F.tolist()
    frequency_F, max_F, mean_F = top.frequency_F.tolist(), top.max_F.tolist(), analysis.mean_F.tolist()
    counts_FH, width_F = top.histogram.counts_FH.tolist(), top.histogram.width_F.tolist()
    promoted = zip(dla.promoted_ids_FT.tolist(), dla.promoted_values_FT.tolist())
    suppressed = zip(dla.suppressed_ids_FT.tolist(), dla.suppressed_values_FT.tolist())
    records = []
    for f, ((up_ids, up_values), (down_ids, down_values)) in enumerate(zip(promoted, suppressed)):
        maxima = [windows[c["window"]][c["max_position"]] for c in top_contexts[f]]
        records.append(
            {
                "latent": f,
                "fired_tokens": fired_F[f],
                "frequency": frequency_F[f],
                "max_activation": round(max_F[f], 4),
                "mean_activation": round(mean_F[f], 4),
                "histogram": {"bin_width": width_F[f], "counts": counts_FH[f]},
                "top_contexts": top_contexts[f],
                "levels": levels[f],
                "quiet_windows": [w for w in quiet_FQ[f] if w != NO_WINDOW],
                "top_tokens": list(dict.fromkeys(token.strip() or token for token in maxima)),
                "dla": {
                    "promoted": [{"token": text[t], "logit": round(v, 4)} for t, v in zip(up_ids, up_values)],
                    "suppressed": [{"token": text[t], "logit": round(v, 4)} for t, v in zip(down_ids, down_values)],
                },
            }
        )
    return records, windows


def context_view(context: dict, window: list[str], before: int, after: int) -> dict:
    """A context cut to ``before`` tokens before its maximum and ``after`` after, in the form of
    ``top_contexts.Context`` (what the page and the terminal show)."""
    start = max(context["max_position"] - before, 0)
    stop = min(context["max_position"] + after + 1, len(window))
    acts = [0.0] * len(window)
    for position, act in context["acts"]:
        acts[position] = act
    return Context(
        context["activation"], context["max_position"] - start, window[start:stop], acts[start:stop]
    )._asdict()


class RecordScores(NamedTuple):
    """What ``top_contexts.chosen_latents`` reads of a ``TopContexts``, taken from stored records (in latent
    order), so that 'frequent:N' and 'strongest:N' pick latents from the database as from a scan."""

    num_latents: int
    frequency_F: torch.Tensor
    max_F: torch.Tensor

    @classmethod
    def of(cls, records: list[dict]) -> RecordScores:
        frequency_F = torch.tensor([r["frequency"] for r in records], dtype=torch.float64)
        return cls(len(records), frequency_F, torch.tensor([r["max_activation"] for r in records]))
