"""The streaming top-N tables against a full sort, the doubling histograms against a histogram of all values,
latent selection, the JSON records, and the terminal marking."""

from __future__ import annotations

import pytest
import torch

from dictlearn.analysis.histogram import DoublingHistogram
from dictlearn.analysis.top_contexts import (
    NO_TOKEN,
    TopContexts,
    check_latent_selection,
    chosen_latents,
    latent_records,
)
from dictlearn.errors import UserError
from dictlearn.params import parse_latent_selection
from dictlearn.report.token_display import latent_text, marked_context


def random_batches(num_batches=7, batch=5, seq=12, num_latents=40, k=3, seed=0):
    """Batches of (ids, top_acts, top_indices, text mask) with distinct continuous activations."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        ids_BS = torch.randint(3, 50, (batch, seq), generator=generator)
        ids_BS[:, 0] = 0  # BOS, not text
        indices_BSK = torch.rand(batch, seq, num_latents, generator=generator).argsort(-1)[..., :k]
        acts_BSK = torch.rand(batch, seq, k, generator=generator) * 10
        acts_BSK[acts_BSK < 2] = 0  # some selected latents do not fire, as relu leaves them
        batches.append((ids_BS, acts_BSK, indices_BSK, ids_BS != 0))
    return batches


def dense_codes(batches, num_latents):
    """(windows, S, F) codes of every window, zero at non-text positions."""
    codes = []
    for _, acts_BSK, indices_BSK, text_BS in batches:
        acts_BSF = torch.zeros(*acts_BSK.shape[:2], num_latents).scatter_(2, indices_BSK, acts_BSK)
        codes.append(acts_BSF * text_BS.unsqueeze(-1))
    return torch.cat(codes)


@pytest.mark.parametrize("top_n", [1, 4, 9])
def test_streaming_top_n_keeps_exactly_the_n_largest(top_n):
    num_latents = 40
    batches = random_batches(num_latents=num_latents)
    top = TopContexts(num_latents, top_n, before=3, after=2, histogram_bins=8)
    for batch in batches:
        top.update(*batch)

    codes_XSF = dense_codes(batches, num_latents)
    window_max_XF, window_argmax_XF = codes_XSF.max(1)
    expected_FN = window_max_XF.T.sort(1, descending=True).values[:, :top_n]
    torch.testing.assert_close(top.values_FN, expected_FN, rtol=0, atol=0)

    # Each kept context is the right window's tokens around its maximum, with the latent's activations.
    ids_XS = torch.cat([b[0] for b in batches])
    seq = ids_XS.shape[1]
    for f in range(num_latents):
        for slot in range(top_n):
            value = float(top.values_FN[f, slot])
            if value == 0:
                assert (top.tokens_FNW[f, slot] == NO_TOKEN).all()
                continue
            window = int((window_max_XF[:, f] == value).nonzero()[0])
            centre = int(window_argmax_XF[window, f])
            for w, offset in enumerate(range(-3, 3)):
                position = centre + offset
                if 0 <= position < seq:
                    assert top.tokens_FNW[f, slot, w] == ids_XS[window, position]
                    assert top.acts_FNW[f, slot, w] == codes_XSF[window, position, f]
                else:
                    assert top.tokens_FNW[f, slot, w] == NO_TOKEN and top.acts_FNW[f, slot, w] == 0


def test_frequency_max_and_token_count_match_a_brute_force_count():
    num_latents = 40
    batches = random_batches(num_latents=num_latents, seed=1)
    top = TopContexts(num_latents, 3, before=2, after=2, histogram_bins=8)
    for batch in batches:
        top.update(*batch)
    codes_XSF = dense_codes(batches, num_latents)
    assert top.tokens_seen == sum(int(b[3].sum()) for b in batches)
    assert torch.equal(top.fired_F, (codes_XSF > 0).sum((0, 1)))
    torch.testing.assert_close(top.max_F, codes_XSF.amax((0, 1)))
    torch.testing.assert_close(top.frequency_F, top.fired_F.double() / top.tokens_seen)


def test_doubling_histogram_equals_a_histogram_of_all_values_on_its_final_bins():
    generator = torch.Generator().manual_seed(0)
    rows, bins = 5, 16
    histogram = DoublingHistogram(rows, bins)
    values, owners = [], []
    for scale in (0.01, 0.5, 3.0, 40.0, 2.0):  # ranges that grow, then shrink
        values_E = torch.rand(300, generator=generator) * scale + 1e-6
        rows_E = torch.randint(0, rows - 1, (300,), generator=generator)  # the last row never gets a value
        histogram.add(values_E, rows_E)
        values.append(values_E), owners.append(rows_E)
    values_E, rows_E = torch.cat(values).double(), torch.cat(owners)
    for row in range(rows):
        mine = values_E[rows_E == row]
        width = float(histogram.width_F[row])
        if len(mine) == 0:
            assert histogram.counts_FH[row].sum() == 0
            continue
        assert mine.max() < bins * width <= 2 * mine.max() or width == 2.0**-10
        expected = torch.bincount((mine / width).long(), minlength=bins)
        assert torch.equal(histogram.counts_FH[row], expected)


def test_latent_selection_specs():
    assert parse_latent_selection("first:384") == ("first", 384)
    assert parse_latent_selection("1, 2,3") == [1, 2, 3]
    for bad in ("top:5", "first:0", "first:", "", "1,,2", "a,b"):
        with pytest.raises(ValueError, match="expected 'first:N', 'frequent:N', 'strongest:N' or latent ids"):
            parse_latent_selection(bad)
    with pytest.raises(UserError, match=r"latent 40 does not exist; this dictionary has latents 0\.\.39"):
        check_latent_selection("3,40", 40)
    check_latent_selection("frequent:1000", 40)

    top = TopContexts(4, 2, before=1, after=1, histogram_bins=4)
    top.values_FN = torch.tensor([[1.0, 0.0], [9.0, 1.0], [5.0, 0.0], [0.0, 0.0]])
    top.fired_F, top.tokens_seen = torch.tensor([30, 1, 7, 0]), 100
    assert chosen_latents("first:2", top) == [0, 1]
    assert chosen_latents("first:99", top) == [0, 1, 2, 3]
    assert chosen_latents("frequent:2", top) == [0, 2]
    assert chosen_latents("strongest:2", top) == [1, 2]
    assert chosen_latents("3,1", top) == [3, 1]


def test_records_clip_contexts_at_the_window_edge_and_mark_the_maximum():
    # One window "a b c d" (BOS first); latent 1 fires on "b" (position 2) and more on "c".
    ids_BS = torch.tensor([[0, 5, 6, 7, 8]])
    acts_BSK = torch.tensor([[[0.0], [0.0], [2.0], [4.0], [0.0]]])
    indices_BSK = torch.ones(1, 5, 1, dtype=torch.long)
    top = TopContexts(2, 2, before=4, after=1, histogram_bins=4)
    top.update(ids_BS, acts_BSK, indices_BSK, ids_BS != 0)
    words = {0: "<s>", 5: " a", 6: " b", 7: " c", 8: " d"}
    records = latent_records(top, lambda ids: {i: words[i] for i in ids})
    assert records[0]["contexts"] == [] and records[0]["fired_tokens"] == 0
    latent = records[1]
    assert latent["fired_tokens"] == 2 and latent["frequency"] == 0.5 and latent["max_activation"] == 4.0
    assert latent["contexts"] == [
        {"activation": 4.0, "max_position": 3, "tokens": ["<s>", " a", " b", " c", " d"], "acts": [0, 0, 2, 4, 0]}
    ]
    assert sum(latent["histogram"]["counts"]) == 2

    assert marked_context([" a", " b", " c"], [0, 2, 4], 4, colour=False) == " a [b 2] [c 4]"
    coloured = marked_context([" a", " b"], [0, 2], 4, colour=True)
    assert coloured.startswith(" a \x1b[48;5;") and "[b 2]\x1b[0m" in coloured
    text = latent_text(latent, colour=False)
    assert text.splitlines() == ["latent 1: fires on 50% of tokens (2), max 4", "        4  <s> a [b 2] [c 4] d"]
    assert latent_text(records[0], colour=False) == "latent 0: never fired"
