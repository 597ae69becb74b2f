"""Sentence codes and the top-contexts scan on the embedded SmolLM2 and the Austen corpus (a random dictionary of
the right width: these check the wiring on the real model, not what a trained dictionary learns)."""

from __future__ import annotations

import pytest
import torch

from dictlearn.analysis.sentences import encode_sentences, tokenize_sentences
from dictlearn.analysis.top_contexts import TopContexts, corpus_windows, latent_records, scan
from dictlearn.lm.text import check_source
from dictlearn.params import DataParams
from dictlearn.report.token_display import token_strings

pytestmark = pytest.mark.slow


def test_embedded_sentence_code_does_not_depend_on_the_batch(smollm_with_sae):
    lm, hook, sae = smollm_with_sae
    sentences = ["It rained all day, and the roads were deep in mud on the way to Highbury.", "She smiled."]
    tokens, _ = tokenize_sentences(lm.tokenizer, sentences, 128, prepend_bos=True)
    together = encode_sentences(lm, hook, sae, tokens, batch_size=2, per_token=False)
    alone = encode_sentences(lm, hook, sae, tokens[1:], batch_size=1, per_token=False)
    torch.testing.assert_close(together.x_RD[1:], alone.x_RD, rtol=1e-4, atol=1e-3)
    assert together.tokens_R.tolist() == [len(tokens[0]) - 1, len(tokens[1]) - 1]


def test_embedded_scan_of_austen_windows(smollm_with_sae):
    lm, hook, sae = smollm_with_sae
    data = DataParams(context_size=64)
    check_source(data)
    top = TopContexts(sae.num_latents, 3, before=6, after=2, histogram_bins=16)
    scan(lm, hook, sae, corpus_windows(data, lm.tokenizer, 8 * 63), batch_size=4, top=top)
    assert top.tokens_seen == 8 * 63
    records = latent_records(top, lambda ids: token_strings(lm.tokenizer, ids))
    fired = [r for r in records if r["contexts"]]
    assert len(fired) > 100
    bos = lm.tokenizer.decode([lm.tokenizer.bos_token_id])
    for record in fired:
        assert sum(record["histogram"]["counts"]) == record["fired_tokens"]
        for context in record["contexts"]:
            assert context["tokens"][context["max_position"]] != bos
            assert context["acts"][context["max_position"]] == pytest.approx(context["activation"], abs=1e-3)
