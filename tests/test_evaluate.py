"""Evaluation: each metric against a hand computation, the spliced LM loss and KL at their two ends, the
decoder similarity, and absorption on a planted toy case."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dictlearn.evaluation.absorption import first_letter_absorption, fit_logistic
from dictlearn.evaluation.evaluate import LMLossSums, held_out_pass, held_out_passes
from dictlearn.evaluation.metrics import ReconstructionMetrics, mean_max_cosine_similarity
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


def sharp_model(make_model):
    torch.manual_seed(0)
    model = make_model().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3)  # sharper predictions, so that zero-ablation clearly costs loss
    return LanguageModel(model, tokenizer=None, name="tiny", device=torch.device("cpu"), dtype=torch.float32)


def test_reconstruction_metrics_by_hand():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    x_hat = torch.tensor([[3.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    values = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, 0.0], [3.0, 1.0, 0.0]])
    indices = torch.tensor([[0, 1, 2], [0, 1, 2], [2, 1, 0]])
    metrics = ReconstructionMetrics(num_latents=4)
    metrics.update(x[:2], x_hat[:2], values[:2], indices[:2])  # two batches give the same as one
    metrics.update(x[2:], x_hat[2:], values[2:], indices[2:])
    result = metrics.result()
    err_sq = 16 + 1 + 1  # per-row squared errors 16, 1, 1
    mean = torch.tensor([4 / 3, 2.0])
    total_variance = (25 + 1 + 4) / 3 - float(mean.square().sum())
    assert result["tokens"] == 3
    assert result["mse"] == pytest.approx(err_sq / 3 / 2)
    assert result["fvu"] == pytest.approx(err_sq / 3 / total_variance)
    assert result["explained_variance"] == pytest.approx(1 - err_sq / 3 / total_variance)
    assert result["cossim"] == pytest.approx((3 / 5 + 1 + 1) / 3)
    assert result["l2_norm_in"] == pytest.approx((5 + 1 + 2) / 3)
    assert result["l2_norm_out"] == pytest.approx((3 + 2 + 1) / 3)
    assert result["l2_ratio"] == pytest.approx((3 / 5 + 2 + 1 / 2) / 3)
    assert result["relative_reconstruction_bias"] == pytest.approx((9 + 4 + 1) / (9 + 2 + 2))
    assert result["l0"] == pytest.approx((2 + 1 + 2) / 3)
    assert result["l1"] == pytest.approx((3 + 0.5 + 4) / 3)
    # Latent 0 fires on rows 1 and 2, latent 1 on rows 1 and 3 (-2 is non-zero), latent 2 on row 3; 3 never.
    assert result["density"].tolist() == pytest.approx([2 / 3, 2 / 3, 1 / 3, 0.0])
    assert result["frac_alive"] == 0.75 and result["dead_fraction"] == 0.25
    assert result["freq_over_1_percent"] == 0.75 and result["freq_over_10_percent"] == 0.75


def test_perfect_reconstruction_scores_one():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    metrics = ReconstructionMetrics(3)
    metrics.update(x, x.clone(), torch.ones(50, 1), torch.zeros(50, 1, dtype=torch.long))
    result = metrics.result()
    assert result["explained_variance"] == pytest.approx(1.0) and result["fvu"] == pytest.approx(0.0)
    assert result["cossim"] == pytest.approx(1.0) and result["l2_ratio"] == pytest.approx(1.0)
    assert result["relative_reconstruction_bias"] == pytest.approx(1.0)
    shrunk = ReconstructionMetrics(3)
    shrunk.update(x, 0.8 * x, torch.ones(50, 1), torch.zeros(50, 1, dtype=torch.long))
    assert shrunk.result()["relative_reconstruction_bias"] == pytest.approx(0.8)
    assert shrunk.result()["l2_ratio"] == pytest.approx(0.8)


def test_mean_max_cosine_similarity_by_hand_and_in_chunks():
    W = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [-1.0, 0.0]])
    # Largest similarity to another row: 1/sqrt2, 1/sqrt2, 1/sqrt2, 0 (row 4 is orthogonal to row 3).
    expected = (3 / math.sqrt(2) + 0) / 4
    assert mean_max_cosine_similarity(W) == pytest.approx(expected)
    assert mean_max_cosine_similarity(W, chunk_rows=3) == pytest.approx(expected)
    big = torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    unit = F.normalize(big, dim=1)
    dense = (unit @ unit.T).fill_diagonal_(-2).amax(1).mean()
    assert mean_max_cosine_similarity(big, chunk_rows=7) == pytest.approx(float(dense), rel=1e-5)


def test_lm_loss_sums_by_hand():
    clean = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    spliced = torch.log(torch.tensor([[[0.25, 0.75], [0.5, 0.5]]]))
    zero = torch.zeros(1, 2, 2)
    input_ids, text = torch.tensor([[0, 1]]), torch.tensor([[True, True]])
    sums = LMLossSums()
    sums.update(clean, spliced, zero, input_ids, text)  # one prediction: position 0 -> token 1
    result = sums.result()
    assert result["ce_loss_without_sae"] == pytest.approx(-math.log(0.5))
    assert result["ce_loss_with_sae"] == pytest.approx(-math.log(0.75))
    kl_sae = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert result["kl_div_with_sae"] == pytest.approx(kl_sae)
    assert result["kl_div_with_ablation"] == pytest.approx(0.0, abs=1e-7)
    assert result["lm_loss_tokens"] == 1


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama])
@pytest.mark.parametrize("hook_name", ["blocks.1.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out"])
def test_perfect_reconstruction_recovers_all_the_loss(make_model, hook_name):
    lm = sharp_model(make_model)
    hook = resolve_hook(lm.model.config, hook_name)
    sae = identity_sae(lm.model.config.hidden_size)
    result = held_out_pass(
        lm, hook, sae, iter(windows(6)), batch_size=4, excluded_ids=torch.tensor([1]), lm_loss_windows=3
    )
    assert result["ce_loss_with_sae"] == pytest.approx(result["ce_loss_without_sae"], abs=1e-5)
    assert result["ce_loss_with_ablation"] != pytest.approx(result["ce_loss_without_sae"], abs=1e-3)
    assert result["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert result["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-5) and result["kl_div_with_ablation"] > 1e-3
    assert result["kl_div_score"] == pytest.approx(1.0, abs=1e-4)
    assert result["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert result["relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-6)
    assert result["lm_loss_tokens"] == 4 * 11  # LM windows are rounded up to a whole batch of 4
    assert result["tokens"] == 6 * 11  # reconstruction reads every window; BOS (id 1) is left out


def test_a_zero_reconstruction_gives_the_zero_ablation_values():
    lm = sharp_model(tiny_llama)
    hook = resolve_hook(lm.model.config, "blocks.1.hook_resid_post")
    zero_sae = identity_sae(lm.model.config.hidden_size)
    with torch.no_grad():
        zero_sae.W_dec.zero_()  # reconstructs exactly 0, the same as zero-ablation
    result = held_out_pass(
        lm, hook, zero_sae, iter(windows(4)), batch_size=4, excluded_ids=torch.tensor([1]), lm_loss_windows=4
    )
    assert result["ce_loss_with_sae"] == pytest.approx(result["ce_loss_with_ablation"], abs=1e-6)
    assert result["kl_div_with_sae"] == pytest.approx(result["kl_div_with_ablation"], abs=1e-6)
    assert result["ce_loss_score"] == pytest.approx(0.0, abs=1e-5)
    assert result["kl_div_score"] == pytest.approx(0.0, abs=1e-5)
    assert result["fvu"] > 1 and result["explained_variance"] < 0  # 0 is worse than the mean
    assert result["l2_ratio"] == 0.0 and result["cossim"] == 0.0


def test_dictionaries_evaluated_in_one_pass_match_each_alone_with_fewer_forwards():
    lm = sharp_model(tiny_llama)
    hook = resolve_hook(lm.model.config, "blocks.1.hook_resid_post")
    width = lm.model.config.hidden_size
    torch.manual_seed(0)
    saes = [identity_sae(width), TopKSAE(width, 16, 4, seed=1), TopKSAE(width, 32, 2, seed=2)]
    forwards = []
    handle = lm.model.register_forward_pre_hook(lambda *_args: forwards.append(1))
    options = {"batch_size": 4, "excluded_ids": torch.tensor([1]), "lm_loss_windows": 4}
    alone = [held_out_pass(lm, hook, sae, iter(windows(8)), **options) for sae in saes]
    forwards_alone = len(forwards)
    forwards.clear()
    together = held_out_passes(lm, hook, saes, iter(windows(8)), **options)
    handle.remove()
    # One LM batch (and one reconstruction batch, whose capture stops inside the model): alone, the whole model
    # runs clean, spliced and zero-ablated for each; together, clean and zero-ablated once and a spliced run each.
    assert (forwards_alone, len(forwards)) == (3 * 3, 2 + 3)
    for one, shared in zip(alone, together, strict=True):
        assert one.keys() == shared.keys()
        for key, value in one.items():
            if torch.is_tensor(value):
                assert torch.equal(value, shared[key]), key
            else:
                assert shared[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert together[0]["ce_loss_score"] == pytest.approx(1.0, abs=1e-4) and together[1]["ce_loss_score"] < 0.99


def test_logistic_probe_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    x = torch.randn(300, 5, generator=g) * 0.1 + F.one_hot(labels, 5).float()
    W, b = fit_logistic(x, labels, 3)
    assert ((x @ W.T + b).argmax(1) == labels).all()


class PlantedSAE(nn.Module):
    """Letters a, b, c along e0, e1, e2; word identity in e4..e7; a token feature e3 that only some a-words
    carry. Latent 0 is 'starts with a' but is switched off by e3; latent 3 fires on e3 and its decoder carries
    e0: on those words it has absorbed the letter feature."""

    def __init__(self):
        super().__init__()
        d_in = 8
        self.W_enc = torch.zeros(d_in, d_in)
        self.W_enc[0, 0], self.W_enc[0, 3] = 1.0, -4.0
        self.W_enc[1, 1] = self.W_enc[2, 2] = 1.0
        self.W_enc[3, 3] = 1.0
        self.W_enc[4:, 4:] = torch.eye(4)
        self.b_enc = torch.tensor([-0.5, -0.5, -0.5, -0.5, 0, 0, 0, 0])
        self.W_dec = torch.eye(d_in)
        self.W_dec[3] = F.normalize(torch.tensor([1.0, 0, 0, 1.0, 0, 0, 0, 0]), dim=0)

    def encode(self, x_BD):
        values_BF = torch.relu(x_BD @ self.W_enc.T + self.b_enc)
        indices_BF = torch.arange(len(self.W_enc)).expand_as(values_BF)
        return values_BF, indices_BF


def test_absorption_finds_the_planted_absorbing_latent():
    g = torch.Generator().manual_seed(0)
    letters = torch.arange(3000) % 3
    x = F.one_hot(letters, 8).float() * 2 + torch.randn(3000, 8, generator=g) * 0.05
    x[:, 4:] += torch.randn(3000, 4, generator=g).abs()  # word identity, not letter-aligned
    absorbed = (letters == 0) & (torch.rand(3000, generator=g) < 0.04)
    x[absorbed, 3] += 2.0
    sae = PlantedSAE()
    result = first_letter_absorption(x, letters, sae.encode, sae.W_dec, num_classes=3, test_fraction=0.5)
    a, b = result["per_class"][0], result["per_class"][1]
    assert a["main_latents"] == [0]
    assert list(a["absorbing_latents"]) == [3]
    expected_rate = a["absorbed"] / a["probe_correct_test_words"]
    assert a["absorbed"] >= 10 and a["absorption_rate"] == pytest.approx(expected_rate)
    assert a["absorbed"] == a["false_negatives"]  # every silent main latent here is the planted absorption
    assert 0.02 < a["absorption_rate"] < 0.07  # about 4% of a-words were planted
    assert b["main_latents"] == [1] and b["absorbed"] == 0
    assert result["probe_accuracy"] > 0.99
    assert result["absorption_rate"] == pytest.approx(a["absorption_rate"] / 3)


def eval_params(model, corpus, **data):
    from dictlearn.params import parse_params

    return parse_params(
        {
            "model": {"name": str(model), "device": "cpu"},
            "data": {"source": "files", "path": str(corpus), "context_size": 16, "held_out_every": 4, **data},
            "hook": "blocks.1.hook_resid_post",
            "eval": {"evaluate_tokens": 10**6, "evaluate_lm_loss_tokens": 150, "absorption_words": 50, "batch_size": 4},
        }
    )


def test_evaluate_dictionary_uses_the_held_out_text_there_is(tiny_checkpoint_with_text):
    from dictlearn.evaluation.evaluate import evaluate_dictionary, full_size
    from dictlearn.lm.models import load_language_model

    model, corpus = tiny_checkpoint_with_text
    params = eval_params(model, corpus)
    lm = load_language_model(params.model)
    hook = resolve_hook(lm.config, params.hook)
    bars = []

    class Bar:
        def __init__(self, description, total):
            bars.append([description, total, 0])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            bars[-1][2] += n

    result = evaluate_dictionary(lm, hook, identity_sae(32), params, full_size(params), Bar)
    assert 0 < result["tokens"] < 10**6 and result["tokens_asked"] == 10**6
    assert result["lm_loss_tokens"] == 12 * 15  # 150 tokens -> 10 windows of 15, rounded up to whole batches of 4
    assert result["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert result["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert math.isnan(result["absorption_rate"])  # a word-level toy vocabulary has no " word" tokens
    assert bars[0][0].startswith("held-out pass") and bars[0][2] == result["tokens"]
    assert set(result["seconds"]) == {"held_out_pass", "similarity", "absorption"}


def test_no_held_out_text_is_one_line(tiny_checkpoint_with_text):
    from dictlearn.errors import UserError
    from dictlearn.evaluation.evaluate import evaluate_dictionary, full_size
    from dictlearn.lm.models import load_language_model

    model, corpus = tiny_checkpoint_with_text
    params = eval_params(model, corpus, context_size=64, held_out_every=10**6)
    lm = load_language_model(params.model)
    with pytest.raises(UserError, match=r"held-out text .* has no text tokens to evaluate on; give more text"):
        evaluate_dictionary(lm, resolve_hook(lm.config, params.hook), identity_sae(32), params, full_size(params))


def test_finding_and_naming_dictionaries(tmp_path):
    from dictlearn.errors import UserError
    from dictlearn.evaluation.compare import dictionary_label, find_dictionaries

    for run in ("sweep/a", "sweep/b/deeper"):
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "ae.pt").write_bytes(b"")
    found = find_dictionaries([str(tmp_path / "sweep"), str(tmp_path / "sweep" / "a")])
    assert found == [tmp_path / "sweep" / "a", tmp_path / "sweep" / "b" / "deeper"]
    with pytest.raises(UserError, match="no ae.pt in .* or any folder below it"):
        (tmp_path / "empty").mkdir()
        find_dictionaries([str(tmp_path / "empty")])
    with pytest.raises(UserError, match="is not a folder"):
        find_dictionaries([str(tmp_path / "missing")])
    assert dictionary_label(TopKSAE(16, 4608, 32)) == "topk 4608 k32"


def test_comparison_table_and_pareto_plots(tmp_path):
    from dictlearn.evaluation.compare import comparison_record
    from dictlearn.report.evaluation_report import _pareto_front, comparison_table, plot_pareto

    results = {
        "runs/a": {"label": "topk 512 k8", "l0": 8.0, "explained_variance": 0.7, "ce_loss_score": 0.9},
        "runs/b": {"label": "relu 512", "l0": 30.0, "explained_variance": 0.8, "ce_loss_score": 0.85},
    }
    record = comparison_record(results)
    assert record["runs/a"]["kl_div_score"] is None and record["runs/b"]["l0"] == 30.0
    rows, headers = comparison_table(record)
    assert headers[:3] == ["dictionary", "label", "L0"] and rows[1][:3] == ["runs/b", "relu 512", "30.0"]
    assert plot_pareto(record, tmp_path) == ["pareto_explained_variance.png", "pareto_ce_loss_score.png"]
    assert (tmp_path / "pareto_ce_loss_score.png").stat().st_size > 1000
    assert _pareto_front([(8, 0.9), (30, 0.85), (50, 0.95)]) == [(8, 0.9), (50, 0.95)]


def test_tracking_is_a_no_op_by_default_and_says_how_to_install(monkeypatch, tmp_path):
    import sys

    from dictlearn.errors import UserError
    from dictlearn.params import parse_params
    from dictlearn.report.tracking import NoTracking, start_tracking

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, as where it is not installed
    tracker = start_tracking(parse_params({}), tmp_path)
    assert type(tracker) is NoTracking
    tracker.log({"fvu": 0.1}, step=1)
    tracker.summary({"fvu": 0.1})
    tracker.finish()
    with pytest.raises(UserError, match="wandb is not installed; pip install wandb"):
        start_tracking(parse_params({"train": {"wandb": {"project": "sae"}}}), tmp_path)
