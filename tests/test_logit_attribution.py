"""Direct logit attribution against the same product computed by hand from each tiny model's own modules: the
final norm's weight (and, for a LayerNorm, the centring), then the output embedding, tied or not."""

from __future__ import annotations

import pytest
import torch

from dictlearn.analysis.logit_attribution import logit_attribution
from dictlearn.lm.models import resolve_hook
from tests.conftest import TINY_MODELS

# Per architecture: the final norm, the unembedding written out by hand, and whether the norm is a LayerNorm.
BY_HAND = {
    "gpt2": (lambda m: m.transformer.ln_f, lambda m: m.transformer.wte.weight, True),
    "neox_parallel": (lambda m: m.gpt_neox.final_layer_norm, lambda m: m.lm_head.weight, True),
    "llama": (lambda m: m.model.norm, lambda m: m.model.embed_tokens.weight, False),
}


@pytest.fixture(params=sorted(BY_HAND))
def model_and_hand(request):
    torch.manual_seed(0)
    model = TINY_MODELS[request.param]().eval()
    norm, unembedding, centre = BY_HAND[request.param]
    with torch.no_grad():  # a norm weight of ones would hide a missing product
        norm(model).weight.uniform_(0.5, 2.0)
    return model, norm(model).weight, unembedding(model), centre


def test_dla_equals_the_product_by_hand(model_and_hand):
    model, gain_D, W_U_VD, centre = model_and_hand
    hook = resolve_hook(model.config, "blocks.2.hook_resid_post")
    W_dec_FD = torch.randn(12, model.config.hidden_size)
    dla = logit_attribution(model, hook, W_dec_FD, top=5)

    directions_FD = W_dec_FD - W_dec_FD.mean(1, keepdim=True) if centre else W_dec_FD
    logits_FV = (directions_FD * gain_D.detach()) @ W_U_VD.detach().T
    expected_up, expected_down = logits_FV.topk(5), logits_FV.topk(5, largest=False)
    torch.testing.assert_close(dla.promoted_values_FT, expected_up.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dla.suppressed_values_FT, expected_down.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(dla.promoted_ids_FT, expected_up.indices)
    assert torch.equal(dla.suppressed_ids_FT, expected_down.indices)


def test_an_untied_model_reads_its_output_embedding_not_its_input_embedding():
    torch.manual_seed(0)
    model = TINY_MODELS["neox_parallel"]().eval()
    assert not torch.equal(model.lm_head.weight, model.gpt_neox.embed_in.weight)
    hook = resolve_hook(model.config, "blocks.1.hook_mlp_out")
    W_dec_FD = torch.randn(4, model.config.hidden_size)
    dla = logit_attribution(model, hook, W_dec_FD, top=3)
    centred_FD = W_dec_FD - W_dec_FD.mean(1, keepdim=True)
    by_hand = (centred_FD * model.gpt_neox.final_layer_norm.weight) @ model.lm_head.weight.T
    torch.testing.assert_close(dla.promoted_values_FT, by_hand.detach().topk(3).values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_latent_at_mlp_hook_post_goes_through_the_output_projection_first(name):
    torch.manual_seed(0)
    model = TINY_MODELS[name]().eval()
    hook = resolve_hook(model.config, "blocks.0.mlp.hook_post")
    down = model.get_submodule(hook.module_path)
    hidden = down.weight.shape[0] if name == "gpt2" else down.weight.shape[1]  # GPT-2's Conv1D is (in, out)
    W_dec_FH = torch.randn(6, hidden)
    dla = logit_attribution(model, hook, W_dec_FH, top=4, vocab_size=90)

    written_FD = W_dec_FH @ down.weight if name == "gpt2" else W_dec_FH @ down.weight.T
    if name == "gpt2":
        written_FD = written_FD - written_FD.mean(1, keepdim=True)
        gain_D, W_U_VD = model.transformer.ln_f.weight, model.transformer.wte.weight
    else:
        gain_D, W_U_VD = model.model.norm.weight, model.model.embed_tokens.weight
    by_hand = ((written_FD * gain_D) @ W_U_VD[:90].T).detach()
    torch.testing.assert_close(dla.promoted_values_FT, by_hand.topk(4).values, rtol=1e-4, atol=1e-5)
    assert int(dla.promoted_ids_FT.max()) < 90 and int(dla.suppressed_ids_FT.max()) < 90
