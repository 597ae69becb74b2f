"""Contexts sampled at magnitude levels against the dense codes of every window: each kept context lies in its
level of the final max and carries its window's activations, levels fill when nothing moves them, the sample is
uniform, and quiet windows are windows where the latent never fires."""

from __future__ import annotations

import pytest
import torch

from dictlearn.analysis.magnitude_levels import NO_WINDOW, MagnitudeLevels
from tests.test_top_contexts import dense_codes, random_batches

EDGES = [0.1, 0.2, 0.4, 0.7, 1.0]


def growing_batches(num_latents=40, seed=0):
    """Random batches whose activations grow batch by batch, so that most latents' max rises during the pass."""
    batches = random_batches(num_batches=9, batch=6, num_latents=num_latents, seed=seed)
    return [(ids, acts * (1 + i), indices, text) for i, (ids, acts, indices, text) in enumerate(batches)]


def run_levels(batches, num_latents, edges=EDGES, per_level=3, quiet=4):
    levels = MagnitudeLevels(num_latents, edges, per_level, quiet, seq_len=batches[0][0].shape[1], seed=1)
    for _, acts, indices, text in batches:
        levels.update(acts, indices, text)
    return levels


@pytest.mark.parametrize("grow", [False, True])
def test_each_kept_context_lies_in_its_level_of_the_final_max_with_its_windows_activations(grow):
    num_latents = 40
    batches = growing_batches(num_latents) if grow else random_batches(num_batches=9, batch=6, num_latents=40)
    levels = run_levels(batches, num_latents)
    codes_XSF = dense_codes(batches, num_latents)
    window_max_XF = codes_XSF.amax(1)
    max_F = window_max_XF.amax(0)
    torch.testing.assert_close(levels.max_F, max_F, rtol=0, atol=0)
    per_level = levels.per_level
    for f in range(num_latents):
        for j, (low, high) in enumerate(zip(EDGES, EDGES[1:])):
            in_level = (window_max_XF[:, f] >= low * max_F[f]) & (
                (window_max_XF[:, f] < high * max_F[f]) | (high == 1.0)
            )
            in_level &= window_max_XF[:, f] > 0
            slots = range(j * per_level, (j + 1) * per_level)
            kept = [int(levels.windows_FM[f, m]) for m in slots if levels.windows_FM[f, m] != NO_WINDOW]
            assert len(set(kept)) == len(kept)
            for m in slots:
                window = int(levels.windows_FM[f, m])
                if window == NO_WINDOW:
                    assert levels.values_FM[f, m] == 0 and (levels.acts_FMS[f, m] == 0).all()
                    continue
                assert in_level[window], (f, j, window)
                assert levels.values_FM[f, m] == window_max_XF[window, f]
                torch.testing.assert_close(levels.acts_FMS[f, m], codes_XSF[window, :, f], rtol=0, atol=0)
            if not grow:
                # Nothing moves between levels: each level holds min(R, eligible windows).
                assert len(kept) == min(per_level, int(in_level.sum()))
            else:
                assert len(kept) <= min(per_level, int(in_level.sum()))


def test_quiet_windows_are_windows_where_the_latent_never_fires():
    num_latents = 40
    batches = random_batches(num_batches=9, batch=6, num_latents=num_latents, k=2)
    levels = run_levels(batches, num_latents, quiet=4)
    silent_XF = dense_codes(batches, num_latents).amax(1) == 0
    for f in range(num_latents):
        kept = [int(w) for w in levels.quiet_windows_FQ[f] if w != NO_WINDOW]
        assert all(silent_XF[w, f] for w in kept)
        assert len(set(kept)) == len(kept) == min(4, int(silent_XF[:, f].sum()))


def test_a_top_edge_under_one_leaves_the_max_out():
    batches = random_batches(num_batches=4, batch=6, num_latents=10, seed=3)
    levels = run_levels(batches, 10, edges=[0.2, 0.5], per_level=50)
    kept = levels.windows_FM != NO_WINDOW
    fraction = levels.values_FM / levels.max_F.unsqueeze(1)
    assert kept.any() and ((fraction[kept] >= 0.2) & (fraction[kept] < 0.5)).all()


def test_the_sample_of_a_level_is_uniform_over_its_windows():
    """400 latents see the same stream: their max in the first window, then 39 windows at half the max. Each of
    those windows should be kept by about 400 * 4 / 39 = 41 latents."""
    num_latents, per_level, windows = 400, 4, 40
    acts_BSK = torch.full((windows, 2, num_latents), 5.0)
    acts_BSK[:, 0] = 0  # position 0 is BOS
    acts_BSK[0, 1] = 10.0
    indices_BSK = torch.arange(num_latents).expand(windows, 2, -1)
    text_BS = torch.tensor([[False, True]]).expand(windows, -1)
    levels = MagnitudeLevels(num_latents, EDGES, per_level, quiet=1, seq_len=2, seed=0)
    for start in range(0, windows, 8):
        rows = slice(start, start + 8)
        levels.update(acts_BSK[rows], indices_BSK[rows], text_BS[rows])
    middle = slice(2 * per_level, 3 * per_level)  # the 0.4-0.7 level
    assert (levels.windows_FM[:, middle] != NO_WINDOW).all()
    counts = torch.bincount(levels.windows_FM[:, middle].flatten(), minlength=windows)
    assert counts[0] == 0 and counts.sum() == num_latents * per_level
    assert counts[1:].min() >= 15 and counts[1:].max() <= 70, counts.tolist()
    top = slice(3 * per_level, 4 * per_level)
    assert (levels.windows_FM[:, top][:, 0] == 0).all() and (levels.windows_FM[:, top][:, 1:] == NO_WINDOW).all()
