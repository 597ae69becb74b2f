"""Top-activating contexts of every latent, gathered in one streaming pass over a corpus.

For each latent, each window of text offers one candidate: the token where the latent is largest in that
window (so one passage cannot fill a latent's whole list). A (F, N) table keeps the N largest candidates seen so
far and is merged with each batch's best by one ``topk``; with each kept candidate go the tokens around it and
the latent's activation on each, for shading them as the top-activation views of Bricken et al. 2023 ("Towards
Monosemanticity") do. Alongside: how many tokens each latent fires on, and a histogram of its activations.
Memory is set by F, N, the context width and the batch, never by the length of the corpus.

Shape letters: B windows in a batch, S tokens per window, F latents, K active latents per token, E = S * K
entries per window, N contexts kept per latent, C candidates per latent from one batch (min(N, B)), W tokens per
context (before + 1 + after).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import NamedTuple

import torch

from dictlearn.activations.harvest import batched, special_token_ids
from dictlearn.analysis.histogram import DoublingHistogram
from dictlearn.errors import UserError
from dictlearn.lm.models import HookPoint, LanguageModel, capture_activations
from dictlearn.lm.text import first_windows, iter_documents, iter_windows
from dictlearn.params import DataParams, parse_latent_selection
from dictlearn.sae.base import SparseAutoencoder

# Token id marking a context position beyond its window's edges.
NO_TOKEN = -1


class TopContexts:
    """The streaming tables; ``update`` takes one batch of sparse codes."""

    def __init__(self, num_latents: int, top_n: int, before: int, after: int, histogram_bins: int, device=None) -> None:
        self.before, self.after = before, after
        width = before + 1 + after
        self.values_FN = torch.zeros(num_latents, top_n, device=device)  # 0: an empty slot
        self.tokens_FNW = torch.full((num_latents, top_n, width), NO_TOKEN, dtype=torch.long, device=device)
        self.acts_FNW = torch.zeros(num_latents, top_n, width, device=device)
        self.fired_F = torch.zeros(num_latents, dtype=torch.long, device=device)
        self.histogram = DoublingHistogram(num_latents, histogram_bins, device=device)
        self.tokens_seen = 0

    @property
    def num_latents(self) -> int:
        return self.values_FN.shape[0]

    @property
    def max_F(self) -> torch.Tensor:
        """Each latent's largest activation seen (the first slot: the table is kept sorted)."""
        return self.values_FN[:, 0]

    @property
    def frequency_F(self) -> torch.Tensor:
        """Fraction of the scanned text tokens each latent fired on."""
        return self.fired_F.double() / max(self.tokens_seen, 1)

    @torch.no_grad()
    def update(
        self,
        input_ids_BS: torch.Tensor,
        top_acts_BSK: torch.Tensor,
        top_indices_BSK: torch.Tensor,
        text_BS: torch.Tensor,
    ) -> None:
        """Merge one batch: its windows' token ids, their codes, and which positions are text (not BOS/EOS/pad)."""
        batch, seq, _ = top_acts_BSK.shape
        num_latents, top_n, width = self.tokens_FNW.shape
        device = self.values_FN.device
        input_ids_BS, text_BS = input_ids_BS.to(device), text_BS.to(device)
        top_acts_BSK = top_acts_BSK.to(device, self.values_FN.dtype) * text_BS.unsqueeze(-1)
        top_indices_BSK = top_indices_BSK.to(device)
        active = top_acts_BSK > 0
        self.fired_F += torch.bincount(top_indices_BSK[active], minlength=num_latents)
        self.histogram.add(top_acts_BSK[active], top_indices_BSK[active])
        self.tokens_seen += int(text_BS.sum())

        # Each window's largest activation per latent and its position, read from the B * S * K selected entries
        # (a reduction over the dense (B, S, F) block costs F / K times more).
        acts_BE, latents_BE = top_acts_BSK.flatten(1), top_indices_BSK.flatten(1)
        window_max_BF = torch.zeros(batch, num_latents, device=device)
        window_max_BF.scatter_reduce_(1, latents_BE, acts_BE, reduce="amax")
        positions_BE = torch.arange(seq, device=device).repeat_interleave(top_acts_BSK.shape[2]).expand(batch, -1)
        at_max_BE = acts_BE == window_max_BF.gather(1, latents_BE)
        window_argmax_BF = torch.zeros(batch, num_latents, dtype=torch.long, device=device)
        window_argmax_BF.scatter_reduce_(1, latents_BE, torch.where(at_max_BE, positions_BE, 0), reduce="amax")

        candidates = min(top_n, batch)
        cand_values_CF, cand_rows_CF = window_max_BF.topk(candidates, dim=0)
        # Context positions around each candidate's maximum, clipped at its window's edges, as flat indices.
        positions_FCW = window_argmax_BF.gather(0, cand_rows_CF).T.unsqueeze(-1) + torch.arange(
            -self.before, self.after + 1, device=device
        )
        inside_FCW = (positions_FCW >= 0) & (positions_FCW < seq)
        token_FCW = cand_rows_CF.T.unsqueeze(-1) * seq + positions_FCW.clamp(0, seq - 1)
        cand_tokens_FCW = torch.where(inside_FCW, input_ids_BS.flatten()[token_FCW], NO_TOKEN)
        acts_BSF = torch.zeros(batch, seq, num_latents, device=device).scatter_(2, top_indices_BSK, top_acts_BSK)
        entry_FCW = token_FCW * num_latents + torch.arange(num_latents, device=device).view(-1, 1, 1)
        cand_acts_FCW = torch.where(inside_FCW, acts_BSF.flatten()[entry_FCW], 0.0)

        self.values_FN, keep_FN = torch.cat([self.values_FN, cand_values_CF.T], 1).topk(top_n, dim=1)
        keep_FNW = keep_FN.unsqueeze(-1).expand(-1, -1, width)
        self.tokens_FNW = torch.cat([self.tokens_FNW, cand_tokens_FCW], 1).gather(1, keep_FNW)
        self.acts_FNW = torch.cat([self.acts_FNW, cand_acts_FCW], 1).gather(1, keep_FNW)


def corpus_windows(data: DataParams, tokenizer, tokens: int) -> Iterator[list[int]]:
    """The corpus's windows (training and held-out alike), as many as ``tokens`` text tokens fill; a corpus too
    short for one window is refused before any scan."""
    windows = first_windows(iter_windows(iter_documents(data), tokenizer, data), data, tokens)
    first = next(windows, None)
    if first is None:
        raise UserError(
            f"data.path: the corpus holds no complete window of data.context_size={data.context_size} tokens"
        )
    return chain([first], windows)


def check_latent_selection(spec: str, num_latents: int, key: str = "interpretation.latents") -> None:
    """Refuse latent ids the dictionary does not have, before any scan; ``key`` names the params key in the error."""
    selection = parse_latent_selection(spec)
    too_large = [f for f in selection if f >= num_latents] if isinstance(selection, list) else []
    if too_large:
        raise UserError(
            f"{key}: latent {too_large[0]} does not exist; this dictionary has latents 0..{num_latents - 1}"
        )


def chosen_latents(spec: str, top: TopContexts) -> list[int]:
    """The latents ``spec`` names: listed ids, or the first / most frequent / strongest N."""
    selection = parse_latent_selection(spec)
    if isinstance(selection, list):
        return selection
    ranking, count = selection
    count = min(count, top.num_latents)
    if ranking == "first":
        return list(range(count))
    score_F = top.frequency_F if ranking == "frequent" else top.max_F
    return score_F.topk(count).indices.tolist()


def scan(
    lm: LanguageModel,
    hook: HookPoint,
    sae: SparseAutoencoder,
    windows: Iterable[list[int]],
    batch_size: int,
    top: TopContexts,
    on_batch: Callable[[TopContexts], object] | None = None,
) -> TopContexts:
    """Run each batch of windows to the hook, encode every position, and merge the codes into ``top`` (or any
    object with ``TopContexts.update``'s arguments and ``tokens_seen``, such as ``feature_records.AnalysisPass``)."""
    excluded = special_token_ids(lm.tokenizer)
    for batch in batched(windows, batch_size):
        input_ids_BS = torch.tensor(batch, dtype=torch.long)
        with torch.inference_mode():
            x_BSD = capture_activations(lm.model, hook, input_ids_BS.to(lm.device))
            codes = sae.encode(x_BSD.flatten(0, 1).to(sae.W_enc.dtype))
        shape_BSK = (*input_ids_BS.shape, -1)
        top.update(
            input_ids_BS,
            codes.values.view(shape_BSK),
            codes.indices.view(shape_BSK),
            ~torch.isin(input_ids_BS, excluded),
        )
        if on_batch is not None:
            on_batch(top)
    return top


class Context(NamedTuple):
    activation: float  # at the context's most activating token
    max_position: int  # that token's index in ``tokens``
    tokens: list[str]
    acts: list[float]  # the latent's activation on each token


def latent_records(top: TopContexts, token_text: Callable[[list[int]], dict[int, str]]) -> list[dict]:
    """Every latent as a plain record (for JSON and the HTML page): frequency, max, histogram, top contexts.

    ``token_text`` maps token ids to their strings (``token_display.token_strings`` with a tokenizer)."""
    values_FN, tokens_FNW, acts_FNW = top.values_FN.cpu(), top.tokens_FNW.cpu(), top.acts_FNW.cpu()
    text = token_text(tokens_FNW[tokens_FNW != NO_TOKEN].tolist())
    counts_FH, width_F = top.histogram.counts_FH.tolist(), top.histogram.width_F.tolist()
    fired_F, frequency_F = top.fired_F.tolist(), top.frequency_F.tolist()
    records = []
    for f, (values, tokens_NW, acts_NW) in enumerate(zip(values_FN.tolist(), tokens_FNW.tolist(), acts_FNW.tolist())):
        contexts = []
        for value, tokens_W, acts_W in zip(values, tokens_NW, acts_NW):
            if value <= 0:
                break
            shown = [w for w, token in enumerate(tokens_W) if token != NO_TOKEN]
            contexts.append(
                Context(
                    round(value, 4),
                    top.before - shown[0],
                    [text[tokens_W[w]] for w in shown],
                    [round(acts_W[w], 3) for w in shown],
                )._asdict()
            )
        records.append(
            {
                "latent": f,
                "fired_tokens": fired_F[f],
                "frequency": frequency_F[f],
                "max_activation": round(values[0], 4),
                "histogram": {"bin_width": width_F[f], "counts": counts_FH[f]},
                "contexts": contexts,
            }
        )
    return records
