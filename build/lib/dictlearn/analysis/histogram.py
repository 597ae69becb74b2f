"""Streaming histograms, one per row (a latent), of positive values whose range is not known in advance.

Each row has ``bins`` equal bins from 0 and a power-of-two bin width. A value past the last bin doubles the
row's width as often as needed, merging neighbouring bins, so memory is fixed and the final range is less than
twice the row's largest value. Power-of-two widths keep every merge exact: old bin edges stay bin edges.

Shape letters: F rows (latents), H bins, E entries (value, row) in an update, G rows whose width grows.
"""

from __future__ import annotations

import torch

# Starting width: values are TopK activations, far above this; a row's first values double it as needed.
_INITIAL_WIDTH = 2.0**-10


class DoublingHistogram:
    def __init__(self, rows: int, bins: int, device: torch.device | str | None = None) -> None:
        self.counts_FH = torch.zeros(rows, bins, dtype=torch.long, device=device)
        self.width_F = torch.full((rows,), _INITIAL_WIDTH, dtype=torch.float64, device=device)

    @property
    def bins(self) -> int:
        return self.counts_FH.shape[1]

    def add(self, values_E: torch.Tensor, rows_E: torch.Tensor) -> None:
        """Count each positive value ``values_E[e]`` in row ``rows_E[e]``."""
        values_E = values_E.double()
        rows, bins = self.counts_FH.shape
        max_F = torch.zeros(rows, dtype=torch.float64, device=values_E.device)
        max_F.scatter_reduce_(0, rows_E, values_E, reduce="amax")
        grow_F = max_F >= bins * self.width_F
        if grow_F.any():
            grown = grow_F.nonzero().squeeze(1)
            # Doublings so that bins * width > max, i.e. the max falls strictly inside the last bin.
            doublings = (torch.log2(max_F[grown] / (bins * self.width_F[grown])).floor() + 1).long()
            merged_GH = torch.zeros(len(grown), bins, dtype=torch.long, device=self.counts_FH.device)
            targets_GH = torch.arange(bins, device=self.counts_FH.device) >> doublings.clamp_max(62).unsqueeze(1)
            merged_GH.scatter_add_(1, targets_GH, self.counts_FH[grown])
            self.counts_FH[grown] = merged_GH
            self.width_F[grown] *= torch.pow(2.0, doublings.double())
        bin_E = (values_E / self.width_F[rows_E]).long().clamp_max(bins - 1)
        self.counts_FH.view(-1).index_add_(0, rows_E * bins + bin_E, torch.ones_like(bin_E))
