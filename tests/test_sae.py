"""TopK SAE, its sparse backward, losses, training step and dictionary_learning format: tiny CPU checks."""

import pytest
import torch
import torch.nn.functional as F

from dictlearn.errors import UserError
from dictlearn.formats.dictionary_learning import topk_from_state_dict, topk_to_state_dict
from dictlearn.formats.run_folder import load_dictionary, save_dictionary
from dictlearn.sae.base import StepContext
from dictlearn.sae.kernels import Selection, _SelectionPattern, top_k_indices
from dictlearn.sae.losses import auxk_loss, fvu
from dictlearn.sae.topk import TopKObjective, TopKSAE, geometric_median
from dictlearn.training.step import train_step


def sae_step(sae, optimizer, x_BD, dead_mask_F, *, aux_k, aux_coef, max_grad_norm):
    objective = TopKObjective(aux_k, aux_coef)
    return train_step(
        sae, objective, optimizer, x_BD, x_BD, StepContext(0, 1, dead_mask_F), max_grad_norm=max_grad_norm
    )


def _sae(d_in=16, num_latents=64, k=4, dtype=torch.float32):
    sae = TopKSAE(d_in, num_latents, k, dtype=dtype, seed=0)
    with torch.no_grad():
        # Non-zero biases and an encoder unlike the decoder, so every gradient path carries signal.
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
    return sae


def _dead_mask(num_latents, num_dead):
    dead_mask_F = torch.zeros(num_latents, dtype=torch.bool)
    dead_mask_F[torch.randperm(num_latents, generator=torch.Generator().manual_seed(1))[:num_dead]] = True
    return dead_mask_F


def _dense_reference_losses(sae, x_BD, dead_mask_F, aux_k):
    """fvu and AuxK through ordinary dense autograd, as a plain reading of Gao et al. 2024 would write them."""
    pre_acts_BF = (x_BD - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    top_BK = pre_acts_BF.topk(int(sae.k))
    z_BF = torch.zeros_like(pre_acts_BF).scatter(1, top_BK.indices, F.relu(top_BK.values))
    x_hat_BD = z_BF @ sae.W_dec + sae.b_dec
    masked_BF = pre_acts_BF.masked_fill(~dead_mask_F, -torch.inf)
    aux_BK = masked_BF.topk(min(aux_k, int(dead_mask_F.sum())))
    z_aux_BF = torch.zeros_like(pre_acts_BF).scatter(1, aux_BK.indices, F.relu(aux_BK.values))
    e_BD = (x_BD - x_hat_BD).detach()
    aux = (e_BD - z_aux_BF @ sae.W_dec).pow(2).sum() / (e_BD - e_BD.mean(0)).pow(2).sum()
    return fvu(x_BD, x_hat_BD), aux


def test_encode_keeps_exactly_k_positive_latents_per_row():
    sae = _sae()
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive, so relu keeps all k selected
    top_acts_BK, top_indices_BK, pre_acts_BF, _ = sae.encode(torch.randn(32, 16))
    z_BF = torch.zeros(32, 64).scatter(1, top_indices_BK, top_acts_BK.detach())
    assert ((z_BF != 0).sum(1) == 4).all()
    assert torch.equal(top_acts_BK.detach().sort(1).values, pre_acts_BF.topk(4).values.sort(1).values)
    assert not pre_acts_BF.requires_grad


def test_top_k_indices_selects_the_same_values_as_torch_topk():
    """1024 columns and k = 8 take the two-pass path (64 groups >= 4k); values rounded to force ties."""
    values_BF = (torch.randn(64, 1024, generator=torch.Generator().manual_seed(0)) * 4).round()
    indices_BK = top_k_indices(values_BF, 8)
    assert indices_BK.shape == (64, 8)
    assert (indices_BK.sort(1).values.diff(dim=1) > 0).all()  # distinct columns
    assert torch.equal(values_BF.gather(1, indices_BK).sort(1).values, values_BF.topk(8).values.sort(1).values)


@pytest.mark.parametrize("num_columns, k", [(1000, 100), (1030, 64)])
def test_wide_top_k_indices_select_the_same_values_as_torch_topk(num_columns, k):
    """At least 8 columns per selected entry takes the bounded path (``_top_k_above_bound``); 1030 columns
    leave a partial slab outside the groups. Values rounded to force ties at the bound."""
    values_BF = (torch.randn(64, num_columns, generator=torch.Generator().manual_seed(0)) * 4).round()
    indices_BK = top_k_indices(values_BF, k)
    assert indices_BK.shape == (64, k)
    assert (indices_BK.sort(1).values.diff(dim=1) > 0).all()  # distinct columns
    assert torch.equal(values_BF.gather(1, indices_BK).sort(1).values, values_BF.topk(k).values.sort(1).values)


def test_bad_k_is_a_user_error():
    with pytest.raises(UserError, match=r"k must be in 1\.\.num_latents=64, found k=65"):
        TopKSAE(16, 64, 65)


def test_forward_equals_decode_of_encode():
    sae = _sae()
    x_BD = torch.randn(32, 16)
    out = sae(x_BD)
    codes = sae.encode(x_BD)
    assert torch.equal(out.x_hat, sae.decode(codes))
    assert torch.equal(out.codes.indices, codes.indices)


def test_decoder_rows_unit_norm_after_init_and_after_a_step():
    sae = TopKSAE(16, 64, 4, seed=0)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64))
    assert torch.equal(sae.W_enc, sae.W_dec)
    assert not sae.b_enc.any() and not sae.b_dec.any()
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    sae_step(sae, optimizer, torch.randn(64, 16), _dead_mask(64, 8), aux_k=8, aux_coef=1 / 32, max_grad_norm=1.0)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64))
    assert all(p.grad is None for p in sae.parameters())


def test_projected_decoder_gradient_is_orthogonal_to_each_row():
    sae = _sae()
    sae(torch.randn(32, 16)).x_hat.pow(2).sum().backward()
    assert sae.W_dec.grad.abs().sum() > 0
    sae.remove_gradient_parallel_to_decoder_directions_()
    parallel_F = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert parallel_F.abs().max() < 1e-6 * sae.W_dec.grad.abs().max()


@pytest.mark.parametrize("num_dead, aux_k", [(48, 4), (12, 6), (3, 6), (40, 5)])
def test_sparse_backward_matches_dense_autograd(num_dead, aux_k):
    """(48, 4): AuxK selection sparse (4 of 48 touched); (12, 6): dense block; (3, 6): fewer dead than aux_k;
    (40, 5): the AuxK top-k takes the bounded wide path (8 dead columns per selected entry).
    The top-k selection (4 of 64) takes the sparse CSR path in all of them."""
    sae = _sae(dtype=torch.float64)
    x_BD = torch.randn(32, 16, dtype=torch.float64, requires_grad=True)
    dead_mask_F = _dead_mask(64, num_dead)
    out = sae(x_BD)
    loss = fvu(x_BD, out.x_hat) + 0.5 * auxk_loss(sae, x_BD, x_BD, out.x_hat, out.codes.pre_acts, dead_mask_F, aux_k)
    tensors = [x_BD, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    sparse_grads = torch.autograd.grad(loss, tensors)
    ref_fvu, ref_aux = _dense_reference_losses(sae, x_BD, dead_mask_F, aux_k)
    dense_grads = torch.autograd.grad(ref_fvu + 0.5 * ref_aux, tensors)
    assert torch.allclose(loss, ref_fvu + 0.5 * ref_aux)
    for name, sparse, dense in zip(["x", "W_enc", "b_enc", "W_dec", "b_dec"], sparse_grads, dense_grads):
        assert torch.allclose(sparse, dense, atol=1e-12), name


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("num_candidates", [64, 6])
def test_gather_and_decode_backward_match_dense_for_both_layouts(num_candidates, ragged):
    """Selecting 4 of 64 latents takes the CSR path, 4 of 6 the dense-block path; a ragged selection (rows
    keep 0 to 4 of them, as BatchTopK's rows do) takes the same paths."""
    sae = _sae(dtype=torch.float64)
    x_BD = torch.randn(32, 16, dtype=torch.float64, requires_grad=True)
    pre_acts_BF = sae.encode(x_BD).pre_acts
    candidates_N = torch.arange(num_candidates) * (64 // num_candidates)
    indices_BK = candidates_N[pre_acts_BF[:, candidates_N].topk(4).indices]
    keep_BK = torch.ones(32, 4, dtype=torch.bool)
    selection = Selection(indices_BK, 64)
    if ragged:
        keep_BK = torch.rand(32, 4) < 0.6
        keep_BK[0] = False  # a row that selects nothing
        selection = Selection.ragged(keep_BK.nonzero()[:, 0], indices_BK[keep_BK], 32, 64)
    weights = torch.randn(selection.shape, dtype=torch.float64)
    weights_BD = torch.randn(32, 16, dtype=torch.float64)
    tensors = [x_BD, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]

    assert _SelectionPattern(selection).dense == (num_candidates == 6)
    acts = sae.gather(x_BD, pre_acts_BF, selection)
    loss = (acts * weights).sum() + ((sae.decode_without_bias(acts, selection) + sae.b_dec) * weights_BD).sum()
    sparse_grads = torch.autograd.grad(loss, tensors)

    dense_pre_acts_BF = (x_BD - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    rows_E = torch.arange(32).unsqueeze(1).expand(32, 4)[keep_BK]
    ref_acts_E = dense_pre_acts_BF[rows_E, indices_BK[keep_BK]]
    z_BF = torch.zeros_like(dense_pre_acts_BF).index_put((rows_E, indices_BK[keep_BK]), ref_acts_E)
    ref_loss = (ref_acts_E * weights.flatten()).sum() + ((z_BF @ sae.W_dec + sae.b_dec) * weights_BD).sum()
    dense_grads = torch.autograd.grad(ref_loss, tensors)
    for name, sparse, dense in zip(["x", "W_enc", "b_enc", "W_dec", "b_dec"], sparse_grads, dense_grads):
        assert torch.allclose(sparse, dense, atol=1e-12), name


def test_auxk_loss_is_zero_without_dead_latents_and_positive_with_them():
    sae = _sae()
    x_BD = torch.randn(32, 16)
    out = sae(x_BD)
    none_dead = auxk_loss(sae, x_BD, x_BD, out.x_hat, out.codes.pre_acts, torch.zeros(64, dtype=torch.bool), 8)
    assert none_dead.item() == 0.0
    (fvu(x_BD, out.x_hat) + none_dead).backward()  # the zero adds to a differentiable loss
    some_dead = auxk_loss(sae, x_BD, x_BD, out.x_hat, out.codes.pre_acts, _dead_mask(64, 16), 8)
    assert some_dead.item() > 0.0


def test_dictionary_learning_state_dict_keys_shapes_and_round_trip(tmp_path):
    sae = _sae(d_in=16, num_latents=64, k=4)
    state_dict = topk_to_state_dict(sae)
    shapes = {key: list(value.shape) for key, value in state_dict.items()}
    assert shapes == {
        "encoder.weight": [64, 16],
        "encoder.bias": [64],
        "decoder.weight": [16, 64],
        "b_dec": [16],
        "k": [],
        "threshold": [],
    }
    assert state_dict["k"].dtype == torch.int64 and state_dict["k"].item() == 4
    assert state_dict["threshold"].item() == -1.0
    assert torch.equal(state_dict["decoder.weight"], sae.W_dec.detach().T)

    save_dictionary(tmp_path, sae, {"trainer": {"dict_class": "AutoEncoderTopK"}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae.pt", "config.json"]
    loaded, _ = load_dictionary(tmp_path)
    x_BD = torch.randn(32, 16)
    a, b = sae(x_BD), loaded(x_BD)
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.codes.values, b.codes.values)


def test_mismatched_state_dict_and_missing_file_are_user_errors(tmp_path):
    relu_autoencoder = {
        "bias": torch.zeros(16),
        "encoder.weight": torch.zeros(64, 16),
        "encoder.bias": torch.zeros(64),
        "decoder.weight": torch.zeros(16, 64),
    }
    with pytest.raises(UserError, match=r"not a dictionary_learning AutoEncoderTopK state dict: expected keys "):
        topk_from_state_dict(relu_autoencoder, {})
    with pytest.raises(UserError, match=r"found \['bias', 'decoder.weight', 'encoder.bias', 'encoder.weight'\]"):
        topk_from_state_dict(relu_autoencoder, {})

    state_dict = topk_to_state_dict(_sae())
    state_dict["decoder.weight"] = torch.zeros(64, 16)
    with pytest.raises(UserError, match=r"decoder.weight should have shape \[16, 64\] .* found \[64, 16\]"):
        topk_from_state_dict(state_dict, {})

    backup = {"step": 10, "ae": state_dict, "optimizer": {}, "config": {}}
    with pytest.raises(UserError, match=r"found \['ae', 'config', 'optimizer', 'step'\] \(a mid-training backup"):
        topk_from_state_dict(backup, {})

    (tmp_path / "ae.pt").write_bytes(b"not a torch file")
    (tmp_path / "config.json").write_text('{"trainer": {"dict_class": "AutoEncoderTopK"}}')
    with pytest.raises(UserError, match=r".*ae\.pt: dictionary weights is not a PyTorch file \(corrupt or truncated\)"):
        load_dictionary(tmp_path)

    with pytest.raises(UserError, match=r"no dictionary at .*missing: ae\.pt is missing"):
        load_dictionary(tmp_path / "missing")
    with pytest.raises(UserError, match=r"cannot save dictionary to .*absent: the folder does not exist"):
        save_dictionary(tmp_path / "absent", _sae(), {})


def test_geometric_median_resists_an_outlier():
    generator = torch.Generator().manual_seed(0)
    centre_D = torch.tensor([1.0, -2.0, 3.0])
    points_SD = torch.cat([centre_D + 0.1 * torch.randn(50, 3, generator=generator), torch.full((1, 3), 100.0)])
    median_D = geometric_median(points_SD).float()
    assert (median_D - centre_D).norm() < 0.1
    assert (median_D - centre_D).norm() < (points_SD.mean(0) - centre_D).norm() / 10

    sae = TopKSAE(3, 8, 2, seed=0)
    sae.init_b_dec_(points_SD)
    assert torch.allclose(sae.b_dec, median_D)


def test_training_recovers_planted_dictionary():
    """Each sample is a positive mix of 3 of 32 unit directions in 32 dims; an SAE with 64 latents and k=3
    trained for 200 steps reconstructs it and learns the planted directions."""
    generator = torch.Generator().manual_seed(0)
    d_in, num_true, sparsity, batch_size = 32, 32, 3, 512
    true_TD = F.normalize(torch.randn(num_true, d_in, generator=generator), dim=1)

    def batch():
        support_BS = torch.rand(batch_size, num_true, generator=generator).topk(sparsity).indices
        coefs_BS = 0.5 + torch.rand(batch_size, sparsity, generator=generator)
        return torch.zeros(batch_size, num_true).scatter(1, support_BS, coefs_BS) @ true_TD

    sae = TopKSAE(d_in, 2 * num_true, sparsity, seed=0)
    sae.init_b_dec_(batch())
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    never_dead_F = torch.zeros(2 * num_true, dtype=torch.bool)
    for _ in range(200):
        out = sae_step(sae, optimizer, batch(), never_dead_F, aux_k=16, aux_coef=1 / 32, max_grad_norm=1.0)
    assert out.terms["fvu"] < 0.1
    best_cosine_T = (true_TD @ sae.W_dec.detach().T).max(1).values
    assert (best_cosine_T > 0.9).float().mean() >= 0.9
