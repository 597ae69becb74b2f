"""CUDA paths against the dense float32 reference: the TopK family's sparse backward, and a bfloat16 training step
of every architecture. Skipped where CUDA is absent; run them on a machine with a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dictlearn.params import SAE_PARAMS
from dictlearn.sae.base import StepContext
from dictlearn.sae.losses import auxk_loss, fvu
from dictlearn.sae.registry import ARCHITECTURES, build_objective, build_sae
from dictlearn.sae.topk import TopKSAE
from dictlearn.training.step import train_step
from dictlearn.training.trainer import adam

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

D, F_LATENTS, K = 64, 512, 8


def _dense_reference(sae: TopKSAE, x_BD: torch.Tensor, dead_mask_F: torch.Tensor, aux_k: int) -> torch.Tensor:
    """FVU + AuxK/32 through plain dense autograd (Gao et al. 2024 read literally)."""
    pre_acts_BF = (x_BD - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    top = pre_acts_BF.topk(K)
    z_BF = torch.zeros_like(pre_acts_BF).scatter(1, top.indices, F.relu(top.values))
    x_hat_BD = z_BF @ sae.W_dec + sae.b_dec
    aux = pre_acts_BF.masked_fill(~dead_mask_F, -torch.inf).topk(aux_k)
    z_aux_BF = torch.zeros_like(pre_acts_BF).scatter(1, aux.indices, F.relu(aux.values))
    e_BD = (x_BD - x_hat_BD).detach()
    aux_loss = (e_BD - z_aux_BF @ sae.W_dec).pow(2).sum() / (e_BD - e_BD.mean(0)).pow(2).sum()
    return fvu(x_BD, x_hat_BD) + aux_loss / 32


def test_sparse_backward_on_cuda_matches_the_dense_float32_reference():
    torch.manual_seed(0)
    sae = TopKSAE(D, F_LATENTS, K, seed=0, device="cuda")
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x_BD = torch.randn(256, D, device="cuda")
    dead_mask_F = torch.zeros(F_LATENTS, dtype=torch.bool, device="cuda")
    dead_mask_F[::4] = True
    out = sae(x_BD)
    loss = fvu(x_BD, out.x_hat) + auxk_loss(sae, x_BD, x_BD, out.x_hat, out.codes.pre_acts, dead_mask_F, 16) / 32
    tensors = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    sparse = torch.autograd.grad(loss, tensors)
    dense = torch.autograd.grad(_dense_reference(sae, x_BD, dead_mask_F, 16), tensors)
    for name, a, b in zip(["W_enc", "b_enc", "W_dec", "b_dec"], sparse, dense):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_a_bfloat16_step_on_cuda_follows_the_float32_step(architecture):
    """One step from the same weights in bfloat16 and float32: the same loss to bf16 precision, and weight changes
    pointing the same way (bf16 rounds a 1e-3 step on weights of size ~0.05 by up to ~20% per entry, so the
    direction, not each entry, is compared)."""
    fields = {"architecture": architecture, "num_latents": F_LATENTS}
    if "k" in SAE_PARAMS[architecture].model_fields:
        fields["k"] = K
    steps = {}
    for dtype in ("float32", "bfloat16"):
        sae_params = SAE_PARAMS[architecture](**fields, dtype=dtype)
        sae = build_sae(sae_params, d_in=D, d_out=None, num_latents=F_LATENTS, device="cuda", seed=0)
        objective = build_objective(sae_params, sae, 10)
        x_BD = torch.randn(512, D, generator=torch.Generator().manual_seed(1)).to("cuda", sae.dtype)
        objective.initialize_(sae, x_BD, x_BD)
        before = {name: value.detach().float().clone() for name, value in sae.state_dict().items()}
        optimizer = adam(sae, 1e-3, objective.adam_betas)
        ctx = StepContext(5, 10, torch.zeros(F_LATENTS, dtype=torch.bool, device="cuda"))
        out = train_step(sae, objective, optimizer, x_BD, x_BD, ctx, max_grad_norm=None)
        changes = {name: value.detach().float() - before[name] for name, value in sae.state_dict().items()}
        steps[dtype] = (out.loss, changes)
    (loss32, changes32), (loss16, changes16) = steps["float32"], steps["bfloat16"]
    assert loss16 == pytest.approx(loss32, rel=0.02)
    for name, change in changes32.items():
        if change.abs().max() == 0:
            continue
        cosine = F.cosine_similarity(changes16[name].flatten(), change.flatten(), dim=0)
        assert cosine > 0.9, f"{name}: the bf16 step points {cosine:.3f} along the fp32 one"
