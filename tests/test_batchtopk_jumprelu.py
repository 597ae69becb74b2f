"""BatchTopK, Matryoshka and JumpReLU SAEs: selection, sparse backward, pseudo-gradients, losses, formats and a
short training run; tiny CPU checks."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dictlearn.errors import UserError
from dictlearn.formats.run_folder import load_dictionary, save_dictionary
from dictlearn.params import parse_params
from dictlearn.sae.base import StepContext, codes_to_dense
from dictlearn.sae.batchtopk import BatchTopKObjective, BatchTopKSAE, batch_top_k, padded_codes
from dictlearn.sae.jumprelu import JumpReLUObjective, JumpReLUSAE
from dictlearn.sae.losses import fvu
from dictlearn.sae.matryoshka import MatryoshkaObjective, MatryoshkaSAE, group_sizes_from_fractions
from dictlearn.sae.registry import build_objective
from dictlearn.sae.topk import TopKSAE, threshold_beta, threshold_start_step
from dictlearn.training.step import train_step

# shared/ sits beside the main checkout (parents[2] of tests/) or above a worktree's folder.
FIXTURES = next(
    (
        folder / "shared/fixtures/peer-formats/dictionary_learning"
        for folder in Path(__file__).parents
        if (folder / "shared/fixtures/peer-formats").is_dir()
    ),
    Path(__file__).parents[2] / "shared/fixtures/peer-formats/dictionary_learning",
)


def _perturb_(sae):
    """Non-zero biases and an encoder unlike the decoder, so every gradient path carries signal."""
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
    return sae


def _batchtopk(d_in=16, num_latents=64, k=4, dtype=torch.float32):
    return _perturb_(BatchTopKSAE(d_in, num_latents, k, dtype=dtype, seed=0))


def _objective(cls=BatchTopKObjective, **kwargs):
    return cls(aux_k=8, aux_coef=1 / 32, threshold_beta=0.9, threshold_start_step=0, **kwargs)


def _ctx(num_latents, step=0, total=1, dead=None):
    dead_mask_F = torch.zeros(num_latents, dtype=torch.bool) if dead is None else dead
    return StepContext(step, total, dead_mask_F)


def _planted(num_rows, d_in=16, num_atoms=48, active=3, seed=0):
    """Rows that are sums of ``active`` of ``num_atoms`` random unit directions with positive weights."""
    generator = torch.Generator().manual_seed(seed)
    atoms_AD = F.normalize(torch.randn(num_atoms, d_in, generator=generator), dim=1)
    chosen_NA = torch.rand(num_rows, num_atoms, generator=generator).argsort(1)[:, :active]
    weights_NA = torch.zeros(num_rows, num_atoms).scatter(
        1, chosen_NA, 1 + torch.rand(num_rows, active, generator=generator)
    )
    return weights_NA @ atoms_AD


# --- BatchTopK ---


def test_batch_top_k_keeps_exactly_k_times_batch_the_largest_activations():
    pre_acts_BF = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    selection = batch_top_k(pre_acts_BF, 4)
    dense_BF = torch.zeros_like(pre_acts_BF).index_put_(
        (selection.rows_E, selection.indices_E), torch.ones(selection.indices_E.numel()), accumulate=True
    )
    assert selection.indices_E.numel() == 4 * 32
    assert int(dense_BF.max()) == 1  # the kept entries are distinct
    expected = F.relu(pre_acts_BF).flatten().topk(4 * 32).indices
    assert set(dense_BF.flatten().nonzero().squeeze(1).tolist()) == set(expected.tolist())
    assert len(set(selection.row_offsets.diff().tolist())) > 1  # rows differ in how many they keep
    # The padded codes callers get: each row's kept values, then zeros at latents it did not keep.
    codes = padded_codes(pre_acts_BF[selection.rows_E, selection.indices_E], selection, pre_acts_BF)
    assert codes.values.shape == (32, int(selection.row_offsets.diff().max()))
    assert torch.equal(codes_to_dense(codes, 64), pre_acts_BF * dense_BF)
    assert all(len(set(row.tolist())) == len(row) for row in codes.indices)


@pytest.mark.parametrize("tie", [False, True])
def test_batch_top_k_keeps_exactly_k_times_batch_with_ties_and_few_positives(tie):
    pre_acts_BF = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    if tie:
        pre_acts_BF[:, :8] = 5.0  # 128 equal entries at the top, of which 4 * 16 = 64 are kept
        assert batch_top_k(pre_acts_BF, 4).indices_E.numel() == 64
    else:
        pre_acts_BF = pre_acts_BF.abs().neg()
        pre_acts_BF[2, 5] = 1.0  # one positive entry: kept alone
        selection = batch_top_k(pre_acts_BF, 4)
        assert selection.indices_E.tolist() == [5] and selection.rows_E.tolist() == [2]


def test_batch_top_k_finds_a_row_that_holds_most_of_the_batch():
    pre_acts_BF = torch.randn(8, 256, generator=torch.Generator().manual_seed(0)) - 5
    pre_acts_BF[3] += 20  # row 3 holds every kept entry: 16 * 8 = 128
    selection = batch_top_k(pre_acts_BF, 16)
    assert selection.row_offsets.diff().tolist() == [0, 0, 0, 128, 0, 0, 0, 0]


def test_training_step_keeps_k_times_batch_and_the_threshold_follows_the_smallest_kept():
    sae, objective = _batchtopk(), _objective()
    x_BD = torch.randn(32, 16)
    out = objective.loss(sae, x_BD, x_BD, _ctx(64))
    assert int((out.codes.values > 0).sum()) == 4 * 32
    smallest = out.codes.values[out.codes.values > 0].min()
    objective.after_optimizer_step(sae, out, _ctx(64))
    assert torch.allclose(sae.threshold, smallest)  # the first estimate is taken as it is
    objective.after_optimizer_step(sae, out._replace(codes=out.codes._replace(values=2 * out.codes.values)), _ctx(64))
    assert torch.allclose(sae.threshold, 0.9 * smallest + 0.1 * 2 * smallest)


def test_threshold_waits_for_its_start_step():
    sae = _batchtopk()
    objective = BatchTopKObjective(aux_k=8, aux_coef=0.0, threshold_beta=0.9, threshold_start_step=5)
    x_BD = torch.randn(32, 16)
    out = objective.loss(sae, x_BD, x_BD, _ctx(64, step=4))
    objective.after_optimizer_step(sae, out, _ctx(64, step=4))
    assert float(sae.threshold) == -1.0
    objective.after_optimizer_step(sae, out, _ctx(64, step=5))
    assert float(sae.threshold) > 0


def test_threshold_start_follows_dictionary_learning_and_a_short_run_starts_at_its_middle():
    assert threshold_start_step(None, 100_000) == 1000  # dictionary_learning's threshold_start_step
    assert threshold_start_step(None, 220) == 110  # a short run still estimates, over its second half
    assert threshold_start_step(None, 1) == 0
    assert threshold_start_step(0.0, 220) == 0 and threshold_start_step(0.25, 220) == 55
    sae_params = parse_params({"sae": {"architecture": "batchtopk"}}).sae
    objective = build_objective(sae_params, BatchTopKSAE(16, 64, 4), total_steps=220)
    assert objective.threshold_start_step == 110
    # TopK keeps the same running threshold for dictionary_learning's encode(use_threshold=True): a short run
    # must set it too, not save -1.
    topk = build_objective(parse_params({}).sae, TopKSAE(16, 64, 4), total_steps=220)
    assert topk.threshold_start_step == 110
    # Its decay: dictionary_learning's 0.999 over long estimates, a memory of a quarter of a short one.
    assert threshold_beta(None, 1000, 100_000) == 0.999 and threshold_beta(None, 1000, 5000) == 0.999
    assert threshold_beta(None, 110, 220) == pytest.approx(1 - 1 / 27.5) and threshold_beta(0.5, 110, 220) == 0.5
    assert topk.threshold_beta == objective.threshold_beta == pytest.approx(1 - 1 / 27.5)


@pytest.mark.parametrize("fraction", [1.0, -0.1])
def test_threshold_start_fraction_out_of_range_is_a_user_error(fraction):
    with pytest.raises(UserError, match=r"sae.threshold_start_fraction: input should be"):
        parse_params({"sae": {"architecture": "batchtopk", "threshold_start_fraction": fraction}})


def test_inference_encode_is_the_strict_threshold_rule():
    sae = _batchtopk()
    sae.threshold.fill_(0.3)
    x_BD = torch.randn(32, 16)
    with torch.no_grad():
        codes = sae.encode(x_BD)
        f_BF = F.relu((x_BD - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    assert torch.allclose(codes_to_dense(codes, 64), f_BF * (f_BF > 0.3), atol=1e-6)
    sae.threshold.fill_(-1.0)  # unset: every positive activation, as dictionary_learning
    with torch.no_grad():
        assert torch.allclose(codes_to_dense(sae.encode(x_BD), 64), f_BF, atol=1e-6)


def _dense_batchtopk_loss(sae, x_BD, dead_mask_F, aux_k):
    """fvu and AuxK through plain dense autograd, as dictionary_learning's BatchTopKTrainer writes them."""
    f_BF = F.relu((x_BD - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    flat = f_BF.flatten().topk(int(sae.k) * x_BD.shape[0])
    z_BF = torch.zeros_like(f_BF).flatten().scatter(0, flat.indices, flat.values).view_as(f_BF)
    x_hat_BD = z_BF @ sae.W_dec + sae.b_dec
    pre_BF = (x_BD - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    aux = pre_BF.masked_fill(~dead_mask_F, -torch.inf).topk(min(aux_k, int(dead_mask_F.sum())))
    z_aux_BF = torch.zeros_like(pre_BF).scatter(1, aux.indices, F.relu(aux.values))
    y_BD = x_BD.detach()  # the target, as the trainer passes it
    e_BD = (y_BD - x_hat_BD).detach()
    aux_loss = (e_BD - z_aux_BF @ sae.W_dec).pow(2).sum() / (e_BD - e_BD.mean(0)).pow(2).sum()
    return fvu(y_BD, x_hat_BD) + aux_loss / 32


def test_sparse_backward_matches_dense_autograd_in_float64():
    x_BD = torch.randn(32, 16, dtype=torch.float64)
    dead_mask_F = torch.zeros(64, dtype=torch.bool)
    dead_mask_F[::5] = True
    sparse, dense = _batchtopk(dtype=torch.float64), _batchtopk(dtype=torch.float64)
    dense.load_state_dict(sparse.state_dict())
    x_sparse, x_dense = x_BD.clone().requires_grad_(), x_BD.clone().requires_grad_()
    loss = _objective().loss(sparse, x_sparse, x_sparse.detach(), _ctx(64, dead=dead_mask_F)).loss
    reference = _dense_batchtopk_loss(dense, x_dense, dead_mask_F, aux_k=8)
    assert torch.allclose(loss, reference)
    loss.backward()
    reference.backward()
    for name, parameter in sparse.named_parameters():
        assert torch.allclose(parameter.grad, dict(dense.named_parameters())[name].grad, atol=1e-10), name
    assert torch.allclose(x_sparse.grad, x_dense.grad, atol=1e-10)


def test_trained_threshold_gives_l0_near_k():
    torch.manual_seed(0)
    data = _planted(4096)
    sae = BatchTopKSAE(16, 64, 4, seed=0)
    objective = _objective()
    objective.initialize_(sae, data[:512], data[:512])
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for step, x_BD in enumerate(data.split(128)):
        train_step(sae, objective, optimizer, x_BD, x_BD, _ctx(64, step, 32), max_grad_norm=1.0)
    with torch.no_grad():
        l0 = float((sae.encode(_planted(2048, seed=1)).values > 0).sum(1).float().mean())
    assert 2.5 < l0 < 6.0


# --- Matryoshka ---


def test_group_sizes_follow_dictionary_learning_and_bad_fractions_are_user_errors():
    assert group_sizes_from_fractions(64, [0.125, 0.125, 0.25, 0.5]) == [8, 8, 16, 32]
    assert group_sizes_from_fractions(100, [1 / 3, 1 / 3, 1 / 3]) == [33, 33, 34]
    with pytest.raises(UserError, match="sae.group_fractions: expected fractions summing to 1"):
        group_sizes_from_fractions(64, [0.5, 0.25])
    with pytest.raises(UserError, match="sum to num_latents=64"):
        MatryoshkaSAE(16, 64, 4, [8, 8])


def test_matryoshka_loss_is_the_weighted_sum_of_the_prefix_reconstructions():
    sae = _perturb_(MatryoshkaSAE(16, 64, 4, [8, 8, 16, 32], seed=0))
    weights = [0.1, 0.2, 0.3, 0.4]
    objective = _objective(MatryoshkaObjective, group_weights=weights)
    x_BD = torch.randn(32, 16)
    out = objective.loss(sae, x_BD, x_BD, _ctx(64))  # no dead latents: AuxK is 0
    with torch.no_grad():
        f_BF = F.relu((x_BD - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
        flat = f_BF.flatten().topk(4 * 32)
        z_BF = torch.zeros_like(f_BF).flatten().scatter(0, flat.indices, flat.values).view_as(f_BF)
        expected, ends = 0.0, [8, 16, 32, 64]
        for weight, end in zip(weights, ends):
            x_hat_BD = z_BF[:, :end] @ sae.W_dec[:end] + sae.b_dec
            expected += weight * ((x_BD - x_hat_BD) ** 2).sum() / ((x_BD - x_BD.mean(0)) ** 2).sum()
    assert torch.allclose(out.loss, torch.as_tensor(expected), atol=1e-6)
    assert torch.allclose(out.terms["fvu"], out.terms["fvu_prefix_3"])


# --- JumpReLU ---


def test_jumprelu_pseudo_gradients_follow_equations_11_and_12():
    eps, lam = 0.5, 0.25
    sae = JumpReLUSAE(2, 3, initial_threshold=1.0, dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3, 2, dtype=torch.float64))
        sae.W_dec.zero_()
        sae.threshold.copy_(torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    # Pre-activations (row, latent): z - theta = 0.1 (inside the window, active), -0.2 (inside, inactive),
    # 0.3 (outside, active), -1.9 (outside, inactive); latent 2 always has z = 0 (outside).
    x_BD = torch.tensor([[1.1, 0.8], [1.3, -0.9]], dtype=torch.float64)
    y_BD = torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=torch.float64)
    objective = JumpReLUObjective(lam, eps, l0_warmup_steps=0)
    out = objective.loss(sae, x_BD, y_BD, _ctx(3))
    out.loss.backward()
    z_BF = x_BD @ sae.W_enc.detach().T
    theta_F = sae.threshold.detach()
    x_hat_BD = (z_BF * (z_BF > theta_F)) @ sae.W_dec.detach() + sae.b_dec.detach()
    # dL/df from the squared error, mean over the batch: -2 (y - x_hat) W_dec^T / B.
    grad_f_BF = -2 * (y_BD - x_hat_BD) @ sae.W_dec.detach().T / 2
    window_BF = ((z_BF - theta_F).abs() < eps / 2).double()
    grad_theta_F = (-(theta_F / eps) * window_BF * grad_f_BF).sum(0)  # Eq. 11
    grad_theta_F += lam * (-(1 / eps) * window_BF).sum(0) / 2  # Eq. 12 on the L0 term, mean over the batch
    assert torch.allclose(sae.threshold.grad, grad_theta_F)
    assert window_BF.sum() == 2 and grad_theta_F[2] == 0
    # The L0 term alone: lambda * mean_b sum_i of Eq. 12.
    sae.zero_grad()
    objective.loss(sae, x_BD, sae.b_dec.detach().expand_as(x_BD), _ctx(3)).loss.backward()
    assert torch.allclose(sae.threshold.grad, lam * (-(1 / eps) * window_BF).sum(0) / 2)


def test_jumprelu_l0_coefficient_warms_up_linearly():
    objective = JumpReLUObjective(2.0, 0.001, l0_warmup_steps=4)
    assert [objective.l0_coefficient_at(step) for step in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def test_jumprelu_encode_is_strict_and_does_not_subtract_b_dec():
    sae = _perturb_(JumpReLUSAE(16, 64, initial_threshold=0.2, seed=0))
    x_BD = torch.randn(32, 16)
    with torch.no_grad():
        pre_BF = x_BD @ sae.W_enc.T + sae.b_enc
        codes = sae.encode(x_BD)
        assert torch.equal(codes_to_dense(codes, 64), F.relu(pre_BF * (pre_BF > 0.2)))
        assert torch.allclose(sae(x_BD).x_hat, F.relu(pre_BF * (pre_BF > 0.2)) @ sae.W_dec + sae.b_dec, atol=1e-6)


def test_jumprelu_fold_input_scale_scales_codes_and_reconstruction():
    sae = _perturb_(JumpReLUSAE(16, 64, initial_threshold=0.2, seed=0))
    x_BD = torch.randn(32, 16)
    with torch.no_grad():
        before = sae(x_BD / 3)
        sae.fold_input_scale_(3.0)
        after = sae(x_BD)
    assert torch.allclose(codes_to_dense(after.codes, 64), 3 * codes_to_dense(before.codes, 64), atol=1e-5)
    assert torch.allclose(after.x_hat, 3 * before.x_hat, atol=1e-5)


# --- Formats ---


def _all_saes():
    jumprelu = _perturb_(JumpReLUSAE(16, 64, initial_threshold=0.05, seed=0))
    batchtopk = _batchtopk()
    batchtopk.threshold.fill_(0.2)
    matryoshka = _perturb_(MatryoshkaSAE(16, 64, 4, [8, 8, 16, 32], seed=0))
    matryoshka.threshold.fill_(0.2)
    return {"BatchTopKSAE": batchtopk, "MatryoshkaBatchTopKSAE": matryoshka, "JumpReluAutoEncoder": jumprelu}


@pytest.mark.parametrize("dict_class", ["BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"])
def test_save_load_round_trip_gives_the_same_outputs(tmp_path, dict_class):
    sae = _all_saes()[dict_class]
    save_dictionary(tmp_path, sae, {"trainer": {"dict_class": dict_class}})
    loaded, _ = load_dictionary(tmp_path)
    assert type(loaded) is type(sae)
    x_BD = torch.randn(32, 16)
    with torch.no_grad():
        before, after = sae(x_BD), loaded(x_BD)
    assert torch.equal(codes_to_dense(before.codes, 64), codes_to_dense(after.codes, 64))
    assert torch.equal(before.x_hat, after.x_hat)
    assert loaded.config() == sae.config()


def test_saved_files_have_dictionary_learnings_keys_and_shapes(tmp_path):
    expected = {
        "BatchTopKSAE": {
            "encoder.weight": [64, 16],
            "encoder.bias": [64],
            "decoder.weight": [16, 64],
            "b_dec": [16],
            "k": [],
            "threshold": [],
        },
        "MatryoshkaBatchTopKSAE": {
            "W_enc": [16, 64],
            "b_enc": [64],
            "W_dec": [64, 16],
            "b_dec": [16],
            "k": [],
            "threshold": [],
            "group_sizes": [4],
        },
        "JumpReluAutoEncoder": {"W_enc": [16, 64], "b_enc": [64], "W_dec": [64, 16], "b_dec": [16], "threshold": [64]},
    }
    for dict_class, sae in _all_saes().items():
        folder = tmp_path / dict_class
        folder.mkdir()
        save_dictionary(folder, sae, {"trainer": {"dict_class": dict_class}})
        state_dict = torch.load(folder / "ae.pt", weights_only=True)
        assert {key: list(value.shape) for key, value in state_dict.items()} == expected[dict_class]


def test_wrong_keys_are_a_user_error(tmp_path):
    sae = _all_saes()["JumpReluAutoEncoder"]
    save_dictionary(tmp_path, sae, {})
    # A config that names another class than the weights hold (as a hand-edited or mixed-up folder would).
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "MatryoshkaBatchTopKSAE"}}))
    with pytest.raises(UserError, match="not a dictionary_learning MatryoshkaBatchTopKSAE state dict: expected keys"):
        load_dictionary(tmp_path)


@pytest.mark.parametrize("case", ["batchtopk", "jumprelu", "matryoshka_batchtopk"])
def test_dictionary_learning_fixture_reproduces_codes_and_x_hat(case):
    folder = FIXTURES / case / "trainer_0"
    if not folder.is_dir():
        pytest.skip(f"fixture {folder} absent")
    from safetensors.torch import load_file

    reference = load_file(FIXTURES / case / "reference.safetensors")
    sae, _ = load_dictionary(folder)
    with torch.no_grad():
        out = sae(reference["x"])
    codes_BF = codes_to_dense(out.codes, sae.num_latents)
    assert torch.equal(codes_BF != 0, reference["codes"] != 0)
    assert torch.allclose(codes_BF, reference["codes"], atol=1e-5)
    assert torch.allclose(out.x_hat, reference["x_hat"], atol=1e-5)
    if "codes_batch_topk" in reference:  # the training-time selection on the same 64 rows
        with torch.no_grad():
            codes = padded_codes(*_objective().forward_selected(sae, reference["x"]))
        assert torch.allclose(codes_to_dense(codes, sae.num_latents), reference["codes_batch_topk"], atol=1e-5)
        assert torch.allclose(sae.decode(codes), reference["x_hat_batch_topk"], atol=1e-5)


# --- Training ---


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka", "jumprelu"])
def test_short_training_run_on_planted_data_lowers_fvu(architecture):
    torch.manual_seed(0)
    data = _planted(4096)
    if architecture == "jumprelu":
        sae = JumpReLUSAE(16, 64, initial_threshold=0.1, seed=0)
        objective = JumpReLUObjective(0.01, 0.05, l0_warmup_steps=8)
    elif architecture == "matryoshka":
        sae = MatryoshkaSAE(16, 64, 4, [8, 8, 16, 32], seed=0)
        objective = _objective(MatryoshkaObjective, group_weights=[0.25] * 4)
    else:
        sae, objective = BatchTopKSAE(16, 64, 4, seed=0), _objective()
    objective.initialize_(sae, data[:512], data[:512])
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    held_out = _planted(1024, seed=1)
    with torch.no_grad():
        before = float(fvu(held_out, sae(held_out).x_hat))
    for step, x_BD in enumerate(data.split(128)):
        train_step(sae, objective, optimizer, x_BD, x_BD, _ctx(64, step, 32), max_grad_norm=1.0)
    with torch.no_grad():
        after = float(fvu(held_out, sae(held_out).x_hat))
    assert after < 0.5 * before
