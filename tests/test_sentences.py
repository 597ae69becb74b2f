"""Sentence codes: reading the CSV (every bad case has its message), averaging that ignores padding, and the
statistics checked by hand."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from dictlearn.analysis.code_stats import (
    active_matrix,
    dense_row_stats,
    group_latents,
    most_common,
    sparse_row_stats,
    spread,
    top_latents,
)
from dictlearn.analysis.sentences import (
    encode_sentences,
    mean_over_tokens,
    read_sentences,
    skipped_note,
    tokenize_sentences,
    truncated_note,
)
from dictlearn.errors import UserError
from dictlearn.lm.models import LanguageModel, resolve_hook
from dictlearn.report.sentence_report import summary_frame
from dictlearn.sae.topk import TopKSAE
from tests.conftest import TINY_MODELS, word_tokenizer


def tiny_lm(kind: str) -> LanguageModel:
    torch.manual_seed(0)
    model = TINY_MODELS[kind]().eval()
    return LanguageModel(model, word_tokenizer(), kind, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("per_token", [False, True])
def test_a_sentence_gets_the_same_code_alone_and_in_a_padded_batch(kind, per_token):
    lm = tiny_lm(kind)
    hook = resolve_hook(lm.config, "blocks.1.hook_resid_post")
    sae = TopKSAE(32, 96, 4, seed=0)
    short = "she was very good ."
    longer = "the time of all that he would know when there was no more to think of it ."
    tokens, truncated = tokenize_sentences(lm.tokenizer, [longer, short], 60, prepend_bos=True)
    assert truncated == 0 and len(tokens[1]) < len(tokens[0])
    together = encode_sentences(lm, hook, sae, tokens, batch_size=2, per_token=per_token)
    alone = encode_sentences(lm, hook, sae, tokens[1:], batch_size=1, per_token=per_token)
    rows = together.sentence_R == 1
    torch.testing.assert_close(together.x_RD[rows], alone.x_RD, rtol=1e-5, atol=1e-5)

    # Codes come in no particular order within a row (``top_k_indices``): compare them as dense rows.
    def dense(acts_RK, indices_RK):
        return torch.zeros(len(acts_RK), sae.num_latents).scatter(1, indices_RK, acts_RK)

    torch.testing.assert_close(
        dense(together.top_acts_RK[rows], together.top_indices_RK[rows]),
        dense(alone.top_acts_RK, alone.top_indices_RK),
        rtol=1e-4,
        atol=1e-4,
    )
    assert torch.equal(together.top_indices_RK[rows].sort(1).values, alone.top_indices_RK.sort(1).values)
    # BOS is not text: a sentence row averages only its words; a token row is one word.
    expected_tokens = [1] * len(short.split()) if per_token else [len(short.split())]
    assert alone.tokens_R.tolist() == expected_tokens
    if per_token:
        assert [t.strip() for t in alone.token_R] == short.split()


def test_mean_over_tokens_skips_masked_positions():
    acts_BTD = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    text_BT = torch.tensor([[True, True, False]])
    torch.testing.assert_close(mean_over_tokens(acts_BTD, text_BT), torch.tensor([[2.0, 3.0]]))


def test_long_sentences_are_truncated_and_counted():
    tokens, truncated = tokenize_sentences(word_tokenizer(), ["the " * 20, "a little time"], 8, prepend_bos=True)
    assert truncated == 1 and [len(t) for t in tokens] == [8, 4] and tokens[0][0] == 0
    assert truncated_note(truncated, 8) == "1 sentence(s) longer than data.context_size=8 tokens were truncated to it"
    assert truncated_note(0, 8) is None


def test_row_statistics_match_a_hand_computation():
    original = dense_row_stats(torch.tensor([[1.0, 2.0, 3.0, 6.0], [-2.0, 0.0, 0.0, 2.0]]))
    assert original.mean_R.tolist() == [3.0, 0.0]
    assert original.variance_R.tolist() == [3.5, 2.0]  # (4 + 1 + 0 + 9) / 4 and (4 + 0 + 0 + 4) / 4
    assert original.max_weight_R.tolist() == [6.0, 2.0] and original.max_position_R.tolist() == [3, 3]
    assert original.l0_R.tolist() == [4, 2]

    # Codes over F = 6 latents: [0, 0, 0, 2, 0, 4] and all zero.
    top_acts_RK = torch.tensor([[2.0, 0.0, 4.0], [0.0, 0.0, 0.0]])
    top_indices_RK = torch.tensor([[3, 0, 5], [1, 2, 4]])
    sparse = sparse_row_stats(top_acts_RK, top_indices_RK, 6)
    torch.testing.assert_close(sparse.mean_R, torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(sparse.variance_R, torch.tensor([14 / 6, 0.0], dtype=torch.float64))
    assert sparse.max_weight_R.tolist() == [4.0, 0.0] and sparse.max_position_R.tolist() == [5, -1]
    assert sparse.l0_R.tolist() == [2, 0]
    dense = dense_row_stats(active_matrix(top_acts_RK, top_indices_RK, 6))
    torch.testing.assert_close(sparse.mean_R, dense.mean_R)
    torch.testing.assert_close(sparse.variance_R, dense.variance_R)
    assert top_latents(top_acts_RK, top_indices_RK, 2) == [[(5, 4.0), (3, 2.0)], []]


def test_summary_over_rows_matches_a_hand_computation():
    assert spread(torch.tensor([1.0, 3.0]))._asdict() == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0}
    assert most_common(torch.tensor([7, 2, 7, 2, 7])) == (7, 3)
    frame = pd.DataFrame(
        {
            **{f"original_{s}": [1.0, 3.0] for s in ("mean", "variance", "max_weight")},
            "original_max_position": [5, 5],
            **{f"sparse_{s}": [0.0, 4.0] for s in ("mean", "variance", "max_weight", "l0")},
            "sparse_max_position": [9, 2],
        }
    )
    summary = summary_frame(frame).set_index(["representation", "statistic"])
    assert summary.loc[("original", "mean"), ["mean", "std", "min", "max"]].tolist() == [2.0, 1.0, 1.0, 3.0]
    assert summary.loc[("sparse", "l0"), ["mean", "std", "min", "max"]].tolist() == [2.0, 2.0, 0.0, 4.0]
    assert summary.loc[("original", "max_position"), ["most_common", "rows"]].tolist() == [5, 2]
    assert summary.loc[("sparse", "max_position"), ["most_common", "rows"]].tolist() == [2, 1]


def test_group_latents_rank_what_a_group_shares_and_the_others_lack():
    # Latent 0 is active everywhere, latent 1 in group 0 only, latent 2 in group 1 and once in group 0.
    codes_RF = torch.tensor([[1.0, 2.0, 0.0], [1.0, 3.0, 1.0], [1.0, 0.0, 5.0], [1.0, 0.0, 5.0]])
    shared = group_latents(codes_RF, torch.tensor([0, 0, 1, 1]), 2, count=1)
    assert shared[0][0]._asdict() == {
        "latent": 1,
        "in_group": 2,
        "group_size": 2,
        "outside": 0,
        "outside_size": 2,
        "mean_weight": 2.5,
    }
    assert shared[1][0].latent == 2 and (shared[1][0].in_group, shared[1][0].outside) == (2, 1)


def write(tmp_path, content: bytes | str, name: str = "s.csv"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# Each bad CSV and its message (test_read_scripts.py checks some end to end: one line, exit code 2).
BAD_CSVS = [
    (None, r"sentences CSV .*missing.csv not found; pass --csv PATH or set sentences.csv"),
    ("", r"s.csv is empty; expected a header row with a 'sentence' column, then one sentence a row"),
    ("sentence\n", r"s.csv has a header but no rows; add one sentence a row under 'sentence'"),
    ("text,group\nhello there,a\n", r"s.csv: no column 'sentence' \(columns: text, group\); pass --column NAME"),
    (b"sentence\ncaf\xe9 au lait\n", r"s.csv: not UTF-8 text \(byte 0xe9 on line 2\); save the file as UTF-8"),
    ('sentence\n"an unclosed quote\n', r"s.csv: not a valid CSV \("),
    ("sentence\n\n42\n---\n", r"s.csv: all 2 cells of column 'sentence' are empty or non-text"),
]


@pytest.mark.parametrize(("content", "pattern"), BAD_CSVS)
def test_bad_csv_has_its_message(tmp_path, content, pattern):
    path = tmp_path / "missing.csv" if content is None else write(tmp_path, content)
    with pytest.raises(UserError, match=pattern):
        read_sentences(path, "sentence", "group")


def test_empty_and_non_text_cells_are_skipped_and_counted(tmp_path):
    path = write(tmp_path, 'group,sentence\na,"Hello, there."\na,\nb,1999\nb,  NA  \nb,...\nc,It rained.\n')
    table = read_sentences(path, "sentence", "group")
    assert table.sentences == ["Hello, there.", "NA", "It rained."]
    assert table.groups == ["a", "b", "c"]
    assert table.skipped_rows == [3, 4, 6]
    assert (
        skipped_note(table, "sentence") == "skipped 3 empty or non-text cell(s) in column 'sentence' (CSV rows 3, 4, 6)"
    )


def test_a_byte_order_mark_and_no_group_column_are_fine(tmp_path):
    table = read_sentences(write(tmp_path, "\ufeffsentence\nOne line.\n"), "sentence", "group")
    assert table.sentences == ["One line."] and table.groups is None and skipped_note(table, "sentence") is None
