"""The ReLU (bricken2023, april2024) and gated SAEs: their codes, losses, constraints, neuron resampling,
dictionary_learning files and short training runs. Tiny dimensions, CPU, seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dictlearn.activations.buffer import ShuffledBuffer
from dictlearn.activations.harvest import ActivationChunk
from dictlearn.formats.dictionary_learning import holds_exactly
from dictlearn.formats.run_folder import dictionary_config, load_dictionary, save_dictionary
from dictlearn.lm.models import HookPoint
from dictlearn.params import Params, parse_params
from dictlearn.sae.base import EventContext, StepContext, codes_to_dense
from dictlearn.sae.gated import GatedObjective, GatedSAE
from dictlearn.sae.losses import frozen_decoder_loss
from dictlearn.sae.registry import build_objective, build_sae
from dictlearn.sae.relu import ReLUObjective, ReLUSAE, penalty_warmup
from dictlearn.training.step import train_step
from dictlearn.training.trainer import Trainer, adam

D, F_LATENTS = 8, 16


def _fixtures() -> Path | None:
    """shared/fixtures/peer-formats beside the repository (``../shared``), or beside the folder holding a git
    worktree of it (``../../shared`` from ``wt/<name>``)."""
    for parent in Path(__file__).resolve().parents[1:4]:
        candidate = parent / "shared/fixtures/peer-formats"
        if candidate.is_dir():
            return candidate
    return None


def _params(sae: dict, **sections) -> Params:
    """Default params with the ``sae`` section replaced whole (the default one is TopK's) and other sections
    updated."""
    data = Params().with_overrides(**sections).model_dump()
    data["sae"] = {"num_latents": F_LATENTS, **sae}
    return parse_params(data)


def _ctx(step: int = 0, total: int = 100, dead=None) -> StepContext:
    return StepContext(step, total, torch.zeros(F_LATENTS, dtype=torch.bool) if dead is None else dead)


def _trained_relu(seed: int = 0):
    """A bricken2023 ReLU SAE after three Adam steps, so that every moment is non-zero."""
    torch.manual_seed(seed)
    sae = ReLUSAE(D, F_LATENTS, seed=seed)
    objective = ReLUObjective("bricken2023", 0.1, 0.0, 100, resample_every=5, resample_rows=64)
    optimizer = adam(sae, 1e-2)
    for step in range(3):
        train_step(sae, objective, optimizer, torch.randn(32, D), torch.randn(32, D), _ctx(step), max_grad_norm=None)
    return sae, objective, optimizer


def _event(optimizer, dead_F, inputs_SD, step=5):
    def sample(rows):
        return inputs_SD[:rows], inputs_SD[:rows]

    return EventContext(step, optimizer, dead_F, sample)


def test_resampling_changes_only_the_dead_latents_and_their_adam_moments():
    sae, objective, optimizer = _trained_relu()
    with torch.no_grad():
        sae.b_dec.add_(2.0)  # far from zero, so that directions of x and of x - b_dec differ
    dead_F = torch.zeros(F_LATENTS, dtype=torch.bool)
    dead_F[[3, 7, 12]] = True
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    moments = {
        name: {key: optimizer.state[p][key].clone() for key in ("exp_avg", "exp_avg_sq")}
        for name, p in sae.named_parameters()
    }
    inputs_SD = torch.randn(64, D) * 3
    result = objective.scheduled_event(sae, _event(optimizer, dead_F, inputs_SD))

    assert result["resampled"] == 3 and result["revived_latents"].tolist() == [3, 7, 12]
    alive_F = ~dead_F
    for name in ("W_enc", "b_enc", "W_dec"):
        parameter = getattr(sae, name)
        assert torch.equal(parameter[alive_F], before[name][alive_F]), name
        assert not torch.equal(parameter[dead_F], before[name][dead_F]), name
        for key in ("exp_avg", "exp_avg_sq"):
            state = optimizer.state[parameter][key]
            assert torch.equal(state[alive_F], moments[name][key][alive_F]), (name, key)
            assert torch.equal(state[dead_F], torch.zeros_like(state[dead_F])), (name, key)
    assert torch.equal(sae.b_dec, before["b_dec"])
    assert torch.equal(optimizer.state[sae.b_dec]["exp_avg"], moments["b_dec"]["exp_avg"])
    # Decoder rows: unit-norm directions of sampled inputs as the encoder sees them (x - b_dec); encoder rows:
    # the same directions, 0.2 x the mean alive encoder norm; encoder biases zero.
    W_dec_ND = sae.W_dec[dead_F]
    torch.testing.assert_close(W_dec_ND.norm(dim=1), torch.ones(3))
    cosines_NS = W_dec_ND @ F.normalize(inputs_SD - sae.b_dec.detach(), dim=1).T
    assert torch.allclose(cosines_NS.max(1).values, torch.ones(3))
    alive_norm = before["W_enc"][alive_F].norm(dim=1).mean()
    torch.testing.assert_close(sae.W_enc[dead_F], W_dec_ND * 0.2 * alive_norm)
    assert torch.equal(sae.b_enc[dead_F], torch.zeros(3))


def test_resampled_directions_are_centred_so_they_do_not_add_up_on_a_shared_mean():
    """Inputs with a large shared mean, as residual streams have, and b_dec at that mean (where the geometric
    median puts it): directions of x - b_dec leave the reconstruction better than before resampling half the
    latents; the raw inputs' directions (all close to the mean) would add up and make it worse (FVU 1.05 -> 1.31
    here, against 0.70)."""
    torch.manual_seed(0)
    d_in, latents = 32, 64
    sae = ReLUSAE(d_in, latents, seed=0)
    g = torch.Generator().manual_seed(0)
    mean_D = 4.0 * d_in**0.5 * F.normalize(torch.randn(d_in, generator=g), dim=0)
    inputs_SD = mean_D + torch.randn(4096, d_in, generator=g)
    with torch.no_grad():
        sae.b_dec.copy_(mean_D)
    objective = ReLUObjective("bricken2023", 0.1, 0.0, 100, resample_every=5, resample_rows=1024)
    dead_F = torch.zeros(latents, dtype=torch.bool)
    dead_F[::2] = True
    variance = (inputs_SD - inputs_SD.mean(0)).pow(2).sum(1).mean()

    def fvu() -> float:
        with torch.no_grad():
            return float((inputs_SD - sae(inputs_SD).x_hat).pow(2).sum(1).mean() / variance)

    before = fvu()
    assert objective.scheduled_event(sae, _event(adam(sae, 1e-3), dead_F, inputs_SD))["resampled"] == 32
    directions_ND = sae.W_dec.detach()[dead_F]
    assert float(F.cosine_similarity(directions_ND, mean_D[None]).abs().mean()) < 0.5
    assert fvu() < before


def test_resampling_draws_the_inputs_the_sae_reconstructs_worst():
    sae, objective, optimizer = _trained_relu()
    with torch.no_grad():
        sae.W_enc.zero_()  # codes 0, x_hat = b_dec: only rows away from b_dec have a loss
    inputs_SD = sae.b_dec.detach().repeat(64, 1)
    inputs_SD[41] += torch.arange(D, dtype=torch.float32)
    dead_F = torch.zeros(F_LATENTS, dtype=torch.bool)
    dead_F[5] = True
    assert objective.scheduled_event(sae, _event(optimizer, dead_F, inputs_SD))["resampled"] == 1
    torch.testing.assert_close(sae.W_dec[5], F.normalize(torch.arange(D, dtype=torch.float32), dim=0))


def test_resampling_runs_only_on_its_schedule_and_never_in_april2024():
    sae, objective, optimizer = _trained_relu()
    dead_F = torch.ones(F_LATENTS, dtype=torch.bool)
    assert objective.scheduled_event(sae, _event(optimizer, dead_F, torch.randn(64, D), step=4)) is None
    april = ReLUObjective("april2024", 5.0, 0.05, 100, resample_every=5)
    assert april.scheduled_event(sae, _event(optimizer, dead_F, torch.randn(64, D), step=5)) is None
    no_dead = objective.scheduled_event(sae, _event(optimizer, ~dead_F, torch.randn(64, D), step=10))
    assert no_dead == {"resampled": 0}
    # Not in the last resample_every steps: a latent resampled then would end the run untrained.
    assert [step for step in range(1, 101) if objective.resamples_at(step)] == list(range(5, 96, 5))
    assert objective.scheduled_event(sae, _event(optimizer, dead_F, torch.randn(64, D), step=100)) is None


def test_l1_coefficient_warms_up_linearly_from_zero():
    objective = ReLUObjective("bricken2023", 4.0, 0.1, 200)
    assert [objective.coefficient(step) for step in (0, 5, 10, 20, 199)] == [0.0, 1.0, 2.0, 4.0, 4.0]
    assert penalty_warmup(0, 200, 0.0) == 1.0
    sae = ReLUSAE(D, F_LATENTS, seed=0)
    out = objective.loss(sae, torch.randn(4, D), torch.randn(4, D), _ctx(step=10, total=200))
    assert float(out.terms["l1_coefficient"]) == 2.0


def _fixed_relu(decoder_scale: float = 1.0) -> ReLUSAE:
    g = torch.Generator().manual_seed(3)
    sae = ReLUSAE(D, F_LATENTS)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(F_LATENTS, D, generator=g))
        sae.b_enc.copy_(torch.randn(F_LATENTS, generator=g))
        sae.W_dec.copy_(torch.randn(F_LATENTS, D, generator=g) * decoder_scale)
        sae.b_dec.copy_(torch.randn(D, generator=g))
    return sae


@pytest.mark.parametrize("recipe", ["bricken2023", "april2024"])
def test_relu_loss_equals_the_recipe_formula(recipe):
    sae = _fixed_relu(decoder_scale=0.7)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(4))
    out = ReLUObjective(recipe, 3.0, 0.0, 10).loss(sae, x, x, _ctx())
    with torch.no_grad():
        f = torch.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
        x_hat = f @ sae.W_dec + sae.b_dec
        norms = sae.W_dec.norm(dim=1) if recipe == "april2024" else torch.ones(F_LATENTS)
        rows = [
            ((x[b] - x_hat[b]) ** 2).sum() + 3.0 * sum(f[b, i] * norms[i] for i in range(F_LATENTS)) for b in range(6)
        ]
        expected = torch.stack(rows).mean()
    torch.testing.assert_close(out.loss.detach(), expected)
    torch.testing.assert_close(codes_to_dense(out.codes, F_LATENTS), f)


def test_relu_encode_decode_forward_agree_with_the_dense_formula():
    sae = _fixed_relu()
    x = torch.randn(5, D)
    codes = sae.encode(x)
    f = torch.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    torch.testing.assert_close(codes_to_dense(codes, F_LATENTS), f.detach())
    torch.testing.assert_close(sae.decode(codes), (f @ sae.W_dec + sae.b_dec).detach())
    torch.testing.assert_close(sae(x).x_hat, sae.decode(codes))


def _fixed_gated() -> GatedSAE:
    g = torch.Generator().manual_seed(5)
    sae = GatedSAE(D, F_LATENTS)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.5)
    return sae


def test_gated_forward_and_loss_match_a_hand_computation():
    sae = _fixed_gated()
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        f_rows, gate_rows = [], []
        for b in range(7):
            centred = x[b] - sae.b_dec
            f_row, gate_row = torch.zeros(F_LATENTS), torch.zeros(F_LATENTS)
            for i in range(F_LATENTS):
                pi_gate = centred @ sae.W_enc[i] + sae.b_gate[i]
                magnitude = centred @ (sae.W_enc[i] * torch.exp(sae.r_mag[i])) + sae.b_mag[i]
                f_row[i] = float(pi_gate > 0) * max(float(magnitude), 0.0)
                gate_row[i] = max(float(pi_gate), 0.0)
            f_rows.append(f_row)
            gate_rows.append(gate_row)
        f, gate = torch.stack(f_rows), torch.stack(gate_rows)
        x_hat = f @ sae.W_dec + sae.b_dec
        x_hat_gate = gate @ sae.W_dec + sae.b_dec
        expected = ((x - x_hat) ** 2).sum(1).mean() + 2.0 * gate.sum(1).mean() + ((x - x_hat_gate) ** 2).sum(1).mean()
    out = sae(x)
    torch.testing.assert_close(codes_to_dense(out.codes, F_LATENTS), f)
    torch.testing.assert_close(out.x_hat, x_hat)
    loss = GatedObjective(2.0, 0.0, 10).loss(sae, x, x, _ctx())
    torch.testing.assert_close(loss.loss.detach(), expected)
    torch.testing.assert_close(loss.terms["aux_loss"], ((x - x_hat_gate) ** 2).sum(1).mean())


def test_gated_auxiliary_loss_does_not_train_the_decoder():
    sae = _fixed_gated()
    x = torch.randn(7, D)
    objective = GatedObjective(0.0, 0.0, 10)
    gate_BF, acts_BF = sae.activations(x)
    frozen_decoder_loss(x, F.relu(gate_BF), sae.W_dec, sae.b_dec).backward()
    # b_dec still gets the gradient of its role as the pre-encoder bias (x - b_dec), as in dictionary_learning.
    assert sae.W_dec.grad is None and sae.W_enc.grad is not None and sae.b_gate.grad is not None
    assert sae.r_mag.grad is None and sae.b_mag.grad is None
    assert objective.normalize_inputs


def _unit_rows(sae):
    with torch.no_grad():
        sae.W_dec.copy_(F.normalize(sae.W_dec, dim=1))
    return sae


@pytest.mark.parametrize(
    "sae, objective",
    [
        (_unit_rows(_fixed_relu()), ReLUObjective("bricken2023", 1.0, 0.0, 10)),
        (_unit_rows(_fixed_gated()), GatedObjective(1.0, 0.0, 10)),
    ],
    ids=["relu", "gated"],
)
def test_projected_decoder_gradient_is_orthogonal_and_rows_stay_unit_norm(sae, objective):
    x = torch.randn(16, D)
    objective.loss(sae, x, x, _ctx()).loss.backward()
    objective.before_optimizer_step(sae)
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(F_LATENTS), atol=1e-5, rtol=0)
    sae.zero_grad()
    train_step(sae, objective, adam(sae, 1e-2), x, x, _ctx(), max_grad_norm=1.0)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(F_LATENTS))


def test_april2024_keeps_free_decoder_norms_and_starts_small():
    params = _params({"architecture": "relu", "recipe": "april2024"})
    sae = build_sae(params.sae, d_in=D, d_out=None, num_latents=F_LATENTS, seed=0)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((F_LATENTS,), 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec) and not sae.b_enc.any() and not sae.b_dec.any()
    objective = build_objective(params.sae, sae, 100)
    assert objective.l1_coefficient == 5.0 and objective.resample_every is None
    train_step(sae, objective, adam(sae, 1e-2), torch.randn(16, D), torch.randn(16, D), _ctx(50), max_grad_norm=1.0)
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.full((F_LATENTS,), 0.1))


def _hook():
    return HookPoint("blocks.1.hook_resid_post", 1, "hook_resid_post", "model.layers.1", "output")


@pytest.mark.parametrize(
    "architecture, extra, layout, dict_class",
    [
        ("relu", {"recipe": "bricken2023"}, "dictionary_learning", "AutoEncoder"),
        ("relu", {"recipe": "april2024"}, "dictlearn", "dictlearn.relu"),
        ("gated", {}, "dictionary_learning", "GatedAutoEncoder"),
    ],
)
def test_save_load_round_trip_gives_the_same_outputs(tmp_path, architecture, extra, layout, dict_class):
    params = _params({"architecture": architecture, **extra})
    sae = build_sae(params.sae, d_in=D, d_out=None, num_latents=F_LATENTS, seed=1)
    with torch.no_grad():
        for name, parameter in sae.named_parameters():
            if name.startswith(("b_", "r_")):
                parameter.normal_()
    config = dictionary_config(
        params, sae, hook=_hook(), lr=1e-3, steps=10, warmup_steps=1, decay_start=8, device="cpu"
    )
    save_dictionary(tmp_path, sae, config)
    loaded, loaded_config = load_dictionary(tmp_path)
    assert loaded_config["sae"]["layout"] == layout and loaded_config["trainer"]["dict_class"] == dict_class
    assert type(loaded) is type(sae)
    x = torch.randn(9, D)
    torch.testing.assert_close(codes_to_dense(loaded.encode(x), F_LATENTS), codes_to_dense(sae.encode(x), F_LATENTS))
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat)


def test_a_relu_sae_without_unit_norm_decoder_is_not_written_as_autoencoder():
    sae = _fixed_relu(decoder_scale=0.7)
    assert not holds_exactly(sae)
    assert holds_exactly(_unit_rows(sae))


@pytest.mark.parametrize("case, sae_class", [("standard", ReLUSAE), ("gated", GatedSAE)])
def test_dictionary_learning_fixture_reproduces_its_codes_and_reconstruction(case, sae_class):
    fixtures = _fixtures()
    if fixtures is None:
        pytest.skip("shared/fixtures/peer-formats is absent")
    folder = fixtures / "dictionary_learning" / case
    reference = load_file(folder / "reference.safetensors")
    sae, _ = load_dictionary(folder / "trainer_0")
    assert type(sae) is sae_class
    with torch.no_grad():
        out = sae(reference["x"])
    codes = codes_to_dense(out.codes, sae.num_latents)
    torch.testing.assert_close(codes, reference["codes"], atol=1e-5, rtol=1e-5)
    assert torch.equal(codes > 0, reference["codes"] > 0)
    torch.testing.assert_close(out.x_hat, reference["x_hat"], atol=1e-5, rtol=1e-5)


def planted_data(rows: int, d: int = D, num_features: int = 24, seed: int = 0) -> torch.Tensor:
    """Sparse non-negative sums of fixed unit directions plus an offset: the data an L1 SAE should fit."""
    g = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(num_features, d, generator=torch.Generator().manual_seed(11)), dim=1)
    codes = torch.rand(rows, num_features, generator=g) * 3 * (torch.rand(rows, num_features, generator=g) < 0.1)
    return codes @ directions + 0.5


@pytest.mark.parametrize(
    "architecture, extra",
    [("relu", {"recipe": "bricken2023"}), ("relu", {"recipe": "april2024"}), ("gated", {})],
)
def test_short_training_on_planted_data_lowers_fvu(architecture, extra):
    torch.manual_seed(0)
    params = _params({"architecture": architecture, "num_latents": 32, "l1_coefficient": 0.05, **extra})
    sae = build_sae(params.sae, d_in=D, d_out=None, num_latents=32, seed=0)
    objective = build_objective(params.sae, sae, 300)
    data = planted_data(4096)
    objective.initialize_(sae, data[:512], data[:512])
    optimizer = adam(sae, 1e-2)
    dead = torch.zeros(32, dtype=torch.bool)
    fvus = []
    for step in range(300):
        x = data[(step * 64) % 4096 :][:64]
        fvus.append(
            train_step(sae, objective, optimizer, x, x, StepContext(step, 300, dead), max_grad_norm=1.0).terms["fvu"]
        )
    assert sum(fvus[-20:]) / 20 < 0.5 * sum(fvus[:5]) / 5
    assert sum(fvus[-20:]) / 20 < 0.3


def _planted_source(total_rows: int = 16384, chunk_rows: int = 512):
    def source(start: int):
        for index in range(start, total_rows // chunk_rows):
            yield ActivationChunk(planted_data(chunk_rows, seed=100 + index), torch.zeros(chunk_rows, dtype=torch.long))

    return source


def _dead_after_training(tmp_path, resample_every: int | None) -> int:
    """Train through the Trainer with half the latents switched off at the start (encoder bias -100, so they
    never fire and get no gradient): without resampling they stay dead."""
    params = _params(
        {
            "architecture": "relu",
            "num_latents": 32,
            "l1_coefficient": 0.05,
            "dead_tokens": 1024,
            "resample_every": resample_every,
            "resample_rows": 1024,
        },
        buffer={"size_tokens": 2048, "batch_size": 128, "refill_fraction": 0.5},
        train={"tokens": 12288, "checkpoint_every": 1000, "log_every": 10, "lr": 1e-2},
    )
    torch.manual_seed(0)
    tmp_path.mkdir()
    sae = build_sae(params.sae, d_in=D, d_out=None, num_latents=32, seed=0)
    buffer = ShuffledBuffer(_planted_source(), d_in=D, size=2048, batch_size=128, seed=0)
    trainer = Trainer(sae, build_objective(params.sae, sae, 96), buffer, params, tmp_path, lr=1e-2)
    trainer.initialize()
    with torch.no_grad():
        sae.b_enc[16:] = -100.0
    trainer.fit()
    if resample_every:
        resampled = [record for record in trainer.metrics if "resampled" in record]
        assert resampled and all(isinstance(record["resampled"], int) for record in resampled)
        assert (tmp_path / "metrics.jsonl").read_text().count("resampled") == len(resampled)
    with torch.no_grad():
        fired = codes_to_dense(sae.encode(planted_data(2048, seed=999) / trainer.input_scale), 32) > 0
    return int((~fired.any(0)).sum())


def test_resampling_ends_with_fewer_dead_latents(tmp_path):
    without = _dead_after_training(tmp_path / "plain", None)
    with_resampling = _dead_after_training(tmp_path / "resampled", 30)
    assert without >= 16
    assert with_resampling < without
