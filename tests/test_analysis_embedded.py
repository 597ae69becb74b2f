"""The analysis pass and direct logit attribution on the embedded SmolLM2 and the Austen corpus (a random
dictionary of the right width: these check the wiring on the real model, not what a trained dictionary learns)."""

from __future__ import annotations

import pytest
import torch

from dictlearn.analysis.feature_records import AnalysisPass, analysis_records
from dictlearn.analysis.logit_attribution import logit_attribution
from dictlearn.analysis.top_contexts import corpus_windows, scan
from dictlearn.lm.text import check_source
from dictlearn.params import AnalysisParams, DataParams
from dictlearn.report.token_display import token_strings

pytestmark = pytest.mark.slow


def test_embedded_dla_reads_the_tied_embedding_through_the_rms_norm_weight(smollm_with_sae):
    lm, hook, sae = smollm_with_sae
    model = lm.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    dla = logit_attribution(model, hook, sae.W_dec[:64], top=5, vocab_size=len(lm.tokenizer))
    by_hand = (sae.W_dec[:64] * model.model.norm.weight) @ model.model.embed_tokens.weight.T
    torch.testing.assert_close(dla.promoted_values_FT, by_hand.detach().topk(5).values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        dla.suppressed_values_FT, by_hand.detach().topk(5, largest=False).values, rtol=1e-4, atol=1e-4
    )


def test_embedded_analysis_pass_records_contexts_within_their_levels(smollm_with_sae):
    lm, hook, sae = smollm_with_sae
    data = DataParams(context_size=64)
    check_source(data)
    settings = AnalysisParams(top_n=3, per_level=2, quiet_windows=2, histogram_bins=16, dla_tokens=3)
    analysis = AnalysisPass(sae.num_latents, settings, data.context_size)
    scan(lm, hook, sae, corpus_windows(data, lm.tokenizer, 12 * 63), batch_size=4, top=analysis)
    assert analysis.tokens_seen == 12 * 63
    dla = logit_attribution(lm.model, hook, sae.W_dec, settings.dla_tokens, len(lm.tokenizer))
    records, windows = analysis_records(analysis, dla, settings.levels, lambda ids: token_strings(lm.tokenizer, ids))
    fired = [r for r in records if r["fired_tokens"]]
    assert len(fired) > 100
    for record in fired:
        top = record["top_contexts"][0]
        assert top["activation"] == record["max_activation"]
        assert len(windows[top["window"]]) == 64
        assert dict(top["acts"])[top["max_position"]] == pytest.approx(top["activation"], abs=1e-3)
        assert record["mean_activation"] <= record["max_activation"]
        for level in record["levels"]:
            for context in level["contexts"]:
                fraction = context["activation"] / record["max_activation"]
                assert level["low"] - 1e-3 <= fraction <= level["high"] + 1e-3
                assert max(act for _, act in context["acts"]) == pytest.approx(context["activation"], abs=1e-3)
        assert all(w in windows for w in record["quiet_windows"])
        assert len(record["dla"]["promoted"]) == 3
