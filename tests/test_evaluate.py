"""Evaluation: reconstruction statistics and the LM loss with the reconstruction spliced in."""

from __future__ import annotations

import pytest
import torch

from dictlearn.evaluation.evaluate import reconstruction_stats, spliced_lm_loss
from dictlearn.lm.models import LanguageModel, resolve_hook
from dictlearn.sae.topk import TopKSAE
from tests.conftest import tiny_gpt2, tiny_llama


def identity_sae(d_in: int) -> TopKSAE:
    """A TopK SAE that reconstructs exactly: latents +e_i and -e_i, k = d_in, so x = relu(x) - relu(-x)."""
    sae = TopKSAE(d_in, 2 * d_in, d_in)
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def windows(count: int, length: int = 12):
    g = torch.Generator().manual_seed(4)
    return [[1, *torch.randint(5, 100, (length - 1,), generator=g).tolist()] for _ in range(count)]


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama])
@pytest.mark.parametrize("hook_name", ["blocks.1.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out"])
def test_perfect_reconstruction_recovers_all_the_loss(make_model, hook_name):
    torch.manual_seed(0)
    model = make_model().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3)  # sharper predictions, so that zero-ablation clearly costs loss
    lm = LanguageModel(model, tokenizer=None, name="tiny", device=torch.device("cpu"), dtype=torch.float32)
    hook = resolve_hook(model.config, hook_name)
    result = spliced_lm_loss(lm, hook, identity_sae(model.config.hidden_size), iter(windows(6)), 4, torch.tensor([1]))
    assert result["spliced"] == pytest.approx(result["clean"], abs=1e-5)
    assert result["zero_ablated"] != pytest.approx(result["clean"], abs=1e-3)
    assert result["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert result["lm_loss_tokens"] == 6 * 11


def test_a_useless_reconstruction_recovers_nothing():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    lm = LanguageModel(model, tokenizer=None, name="tiny", device=torch.device("cpu"), dtype=torch.float32)
    hook = resolve_hook(model.config, "blocks.1.hook_resid_post")
    zero_sae = identity_sae(model.config.hidden_size)
    with torch.no_grad():
        zero_sae.W_dec.mul_(1e-12)  # reconstructs ~0, the same as zero-ablation
    result = spliced_lm_loss(lm, hook, zero_sae, iter(windows(4)), 4, torch.tensor([1]))
    assert result["loss_recovered"] == pytest.approx(0.0, abs=1e-3)


def test_reconstruction_stats_by_hand():
    sae = identity_sae(4)
    x = torch.tensor([[1.0, -2.0, 0.0, 0.5], [0.0, 1.0, 3.0, -1.0]])
    stats = reconstruction_stats(sae, [x])
    assert stats["fvu"] == pytest.approx(0.0, abs=1e-12)
    # Non-zero entries: 3 in row one, 3 in row two; latents +e0,-e1,+e3,+e1,+e2,-e3 fire; -e0, -e2 never.
    assert stats["l0"] == pytest.approx(3.0)
    assert stats["dead_fraction"] == pytest.approx(2 / 8)
    assert stats["density"].tolist() == [0.5, 0.5, 0.5, 0.5, 0.0, 0.5, 0.0, 0.5]
    with torch.no_grad():
        sae.W_dec.zero_()
    assert reconstruction_stats(sae, [x])["fvu"] == pytest.approx(float((x**2).sum() / ((x - x.mean(0)) ** 2).sum()))
