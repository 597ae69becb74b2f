"""Contexts sampled at magnitude levels of every latent, and windows where it stays silent, in one streaming pass.

A window is a candidate for a latent with its largest activation there (one sample per window, as for the top
contexts). The levels are fractions of the latent's max (for example 0.1-0.2, 0.2-0.4, 0.4-0.7, 0.7-1.0): the
activation intervals of Bricken et al. 2023 ("Towards Monosemanticity", the feature browser) and the subsamples
of OpenMOSS Language-Model-SAEs' feature analyzer, which show what a latent does below its top examples. Each
level keeps a uniform sample by bottom-k sampling: every candidate draws a random key and a level keeps the
``per_level`` candidates with the smallest keys, so memory is fixed whatever the length of the corpus.

The max is known only at the end. Each batch first raises the running max, then every kept context is placed
again at the level its activation has under the new max (moving down, or out below the lowest edge) and each
level is trimmed to its smallest keys. From the batch that brings a latent's max on, each level's sample is
exactly uniform over the windows seen; a window seen before the max last grew stays eligible only if it was
kept at that time. Every kept context lies within its level of the final max.

Windows where the latent never fires are sampled in the same way (``quiet``): the non-activating contexts of
detection scoring.

Shape letters: B windows in a batch, S tokens per window, K active latents per token, F latents, L levels,
R contexts per level, M = L * R slots, X = M + B slots and candidates, Q quiet windows per latent,
Y = Q + B quiet slots and candidates.
"""

from __future__ import annotations

import torch

# Window id of an empty slot.
NO_WINDOW = -1


class MagnitudeLevels:
    """The sampled contexts; ``update`` takes one batch of sparse codes. Slot ``j * R + r`` holds level j's r-th
    context; an empty slot has value 0 and window ``NO_WINDOW``."""

    def __init__(
        self,
        num_latents: int,
        edges: list[float],
        per_level: int,
        quiet: int,
        seq_len: int,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        slots = (len(edges) - 1) * per_level
        self.edges = torch.tensor(edges, dtype=torch.float32, device=device)
        self.per_level = per_level
        self.max_F = torch.zeros(num_latents, device=device)
        self.values_FM = torch.zeros(num_latents, slots, device=device)
        self.keys_FM = torch.full((num_latents, slots), torch.inf, dtype=torch.float64, device=device)
        self.windows_FM = torch.full((num_latents, slots), NO_WINDOW, dtype=torch.long, device=device)
        self.acts_FMS = torch.zeros(num_latents, slots, seq_len, device=device)
        self.quiet_keys_FQ = torch.full((num_latents, quiet), torch.inf, dtype=torch.float64, device=device)
        self.quiet_windows_FQ = torch.full((num_latents, quiet), NO_WINDOW, dtype=torch.long, device=device)
        self.generator = torch.Generator(device=self.max_F.device).manual_seed(seed)
        self.windows_seen = 0

    @property
    def num_levels(self) -> int:
        return len(self.edges) - 1

    def level_of(self, values: torch.Tensor, max_values: torch.Tensor) -> torch.Tensor:
        """Each value's level under ``max_values`` (broadcast), or ``num_levels`` when it is in none: zero, below
        the lowest edge, or at or above a top edge under 1 (a top edge of 1 takes in the max itself)."""
        fraction = values / max_values.clamp_min(torch.finfo(values.dtype).tiny)
        level = torch.bucketize(fraction, self.edges[1:-1], right=True)
        top = self.edges[-1]
        outside = (values <= 0) | (fraction < self.edges[0]) | ((fraction >= top) & (top < 1))
        return torch.where(outside, self.num_levels, level)

    @torch.no_grad()
    def update(self, top_acts_BSK: torch.Tensor, top_indices_BSK: torch.Tensor, text_BS: torch.Tensor) -> None:
        """Merge one batch of windows (numbered on from the previous batches): their codes, and which positions
        are text (not BOS/EOS/pad)."""
        device = self.max_F.device
        num_latents, slots, seq = self.acts_FMS.shape
        batch = top_acts_BSK.shape[0]
        text_BS = text_BS.to(device)
        top_acts_BSK = top_acts_BSK.to(device, self.max_F.dtype) * text_BS.unsqueeze(-1)
        acts_BSF = torch.zeros(batch, seq, num_latents, device=device)
        acts_BSF.scatter_(2, top_indices_BSK.to(device), top_acts_BSK)
        window_max_BF = acts_BSF.amax(1)
        self.max_F = torch.maximum(self.max_F, window_max_BF.amax(0))
        keys_BF = torch.rand(batch, num_latents, generator=self.generator, device=device, dtype=torch.float64)
        window_ids_B = torch.arange(self.windows_seen, self.windows_seen + batch, device=device)
        self.windows_seen += batch

        # Sort kept contexts and candidates by (level, key); the r-th of level j goes to slot j * R + r if r < R.
        num_levels, per_level = self.num_levels, self.per_level
        values_FX = torch.cat([self.values_FM, window_max_BF.T], 1)
        keys_FX = torch.cat([self.keys_FM, keys_BF.T], 1)
        level_FX = self.level_of(values_FX, self.max_F.unsqueeze(1))
        order_FX = (level_FX + keys_FX).argsort(1)  # keys lie in [0, 1), or inf in an empty slot
        sorted_level_FX = level_FX.gather(1, order_FX)
        counts_FL = torch.zeros(num_latents, num_levels + 1, dtype=torch.long, device=device)
        counts_FL.scatter_add_(1, level_FX, torch.ones_like(level_FX))
        starts_FL = counts_FL.cumsum(1) - counts_FL
        rank_FX = torch.arange(level_FX.shape[1], device=device) - starts_FL.gather(1, sorted_level_FX)
        keep_FX = (sorted_level_FX < num_levels) & (rank_FX < per_level)
        # Slot M is a bin for everything not kept; each kept candidate has a slot of its own.
        slot_FX = torch.where(keep_FX, sorted_level_FX * per_level + rank_FX, slots)
        source_FM = torch.full((num_latents, slots + 1), -1, dtype=torch.long, device=device)
        source_FM = source_FM.scatter_(1, slot_FX, torch.where(keep_FX, order_FX, -1))[:, :slots]
        filled_FM = source_FM >= 0
        source_FM = source_FM.clamp_min(0)

        self.values_FM = torch.where(filled_FM, values_FX.gather(1, source_FM), 0.0)
        self.keys_FM = torch.where(filled_FM, keys_FX.gather(1, source_FM), torch.inf)
        windows_FX = torch.cat([self.windows_FM, window_ids_B.expand(num_latents, -1)], 1)
        self.windows_FM = torch.where(filled_FM, windows_FX.gather(1, source_FM), NO_WINDOW)
        # A kept slot keeps its activations; a new one takes the latent's row of its window in this batch.
        kept_FMS = self.acts_FMS.gather(1, source_FM.clamp_max(slots - 1).unsqueeze(-1).expand(-1, -1, seq))
        rows_FMS = (source_FM - slots).clamp(0, batch - 1).unsqueeze(-1).expand(-1, -1, seq)
        new_FMS = acts_BSF.permute(2, 0, 1).gather(1, rows_FMS)
        from_batch_FM1 = (source_FM >= slots).unsqueeze(-1)
        self.acts_FMS = torch.where(from_batch_FM1, new_FMS, kept_FMS) * filled_FM.unsqueeze(-1)

        # Quiet windows: a window with text where the latent stays at zero.
        quiet_BF = (window_max_BF == 0) & text_BS.any(1, keepdim=True)
        quiet_keys_FY = torch.cat([self.quiet_keys_FQ, torch.where(quiet_BF, keys_BF, torch.inf).T], 1)
        quiet_windows_FY = torch.cat([self.quiet_windows_FQ, window_ids_B.expand(num_latents, -1)], 1)
        self.quiet_keys_FQ, pick_FQ = quiet_keys_FY.topk(self.quiet_keys_FQ.shape[1], dim=1, largest=False)
        self.quiet_windows_FQ = torch.where(self.quiet_keys_FQ.isinf(), NO_WINDOW, quiet_windows_FY.gather(1, pick_FQ))
