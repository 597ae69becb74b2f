"""The sparsity analyzer on tiny models: sparsity against hand counts, structured pruning, polysemantic neurons
built by hand, and sparsity.py end to end with its one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dictlearn.analysis.sparsity.activation_sparsity import SparsityAnalyzer, SparsityCounter, hoyer_sparsity
from dictlearn.analysis.sparsity.polysemantic import Dictionary, LatentExplainer, TopRows
from dictlearn.analysis.sparsity.prune import params_per_neuron, pruned_neurons
from dictlearn.errors import UserError
from dictlearn.lm.models import LanguageModel, capture_activations, resolve_hook
from dictlearn.params import Params, parse_params
from dictlearn.sae.topk import TopKSAE
from tests.conftest import TINY_MODELS, WORDS, tiny_llama, word_tokenizer, write_corpus, write_dictionary
from tests.test_params import assert_one_line_error
from tests.test_scripts import run


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    write_corpus(path, sentences=600)
    return path


def analyzer_for(model, corpus, device: str = "cpu", **sparsity) -> SparsityAnalyzer:
    dtype = next(model.parameters()).dtype
    lm = LanguageModel(model.eval(), word_tokenizer(), "tiny", torch.device(device), dtype)
    params = Params().with_overrides(
        model={"name": "tiny", "device": device},
        data={"source": "files", "path": str(corpus), "context_size": 16},
        sparsity={"tokens": 600, "lm_loss_windows": 4, "batch_size": 4, "dictionary": None, **sparsity},
    )
    return SparsityAnalyzer(lm, params)


def random_windows(count: int, length: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat(
        [torch.zeros(count, 1, dtype=torch.long), torch.randint(5, 48, (count, length - 1), generator=g)], 1
    )


# --- activation sparsity ---------------------------------------------------------------------------------------


def test_sparsity_matches_a_hand_count():
    acts_RD = torch.tensor([[0.0, 0.5, -0.02, 0.0], [0.01, 0.0, 3.0, 0.0], [-0.2, 0.04, 0.05, 0.0]])
    counter = SparsityCounter("hand", width=4, eps=0.05)
    counter.update(acts_RD[:2])
    counter.update(acts_RD[2:])
    stats = counter.result()
    # |a| <= 0.05: unit 0 on rows 0 and 1; unit 1 on rows 1 and 2; unit 2 on rows 0 and 2; unit 3 on all three.
    assert stats.tokens == 3
    assert stats.sparsity_D.tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 1.0])
    assert stats.firing_frequency_D.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])
    assert stats.mean_abs_D.tolist() == pytest.approx([0.21 / 3, 0.54 / 3, 3.07 / 3, 0.0])
    assert stats.mean_sparsity == pytest.approx(0.75)
    assert stats.never_firing_fraction == pytest.approx(0.25)
    # Hoyer: (sqrt(D) - L1/L2) / (sqrt(D) - 1) per row, averaged.
    expected = [
        (2 - (0.52 / math.sqrt(0.2504))) / 1,
        (2 - 3.01 / math.sqrt(9.0001)) / 1,
        (2 - 0.29 / math.sqrt(0.0441)),
    ]
    assert stats.hoyer == pytest.approx(sum(expected) / 3)


def test_hoyer_extremes():
    assert hoyer_sparsity(
        torch.tensor([[0.0, 0.0, 5.0, 0.0], [1.0, -1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    ).tolist() == [
        1.0,
        0.0,
        1.0,
    ]


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_sparsity_through_a_model_matches_the_captured_activations(name, corpus):
    torch.manual_seed(0)
    model = TINY_MODELS[name]()
    analyzer = analyzer_for(model, corpus, eps=0.02)
    windows = random_windows(6)
    hooks = ["blocks.1.mlp.hook_post", "blocks.0.hook_resid_post"]
    result = analyzer.compute_activation_sparsity([windows[:4], windows[4:]], hooks)
    for hook in hooks:
        with torch.no_grad():
            acts = capture_activations(model, resolve_hook(model.config, hook), windows)[:, 1:]  # BOS left out
        inactive = (acts.abs() <= 0.02).flatten(0, 1).double().mean(0)
        assert result[hook].tokens == 6 * 15
        torch.testing.assert_close(result[hook].sparsity_D, inactive)


def test_texts_and_the_default_training_text(corpus):
    torch.manual_seed(0)
    analyzer = analyzer_for(tiny_llama(), corpus)
    from_texts = analyzer.compute_activation_sparsity(["the little time", "she said no"], "blocks.0.mlp.hook_post")
    assert from_texts["blocks.0.mlp.hook_post"].tokens == 6
    default = analyzer.compute_activation_sparsity()
    assert list(default) == [f"blocks.{layer}.mlp.hook_post" for layer in range(3)]
    # 600 tokens asked for: 40 windows of 15 text tokens after BOS.
    assert all(stats.tokens == 600 for stats in default.values())


def test_text_too_short_is_a_one_line_error(tmp_path):
    short = tmp_path / "short.txt"
    write_corpus(short, sentences=8)  # a few windows of 16 tokens: none held out (1 in 50), some for statistics
    analyzer = analyzer_for(tiny_llama(), short)
    with pytest.raises(UserError, match=r"^data: no held-out windows for the LM loss; the text is shorter than 50 "):
        analyzer.prune_network(0.9)
    write_corpus(short, sentences=1)
    with pytest.raises(UserError, match=r"^no text tokens reached blocks\.0\.mlp\.hook_post"):
        analyzer_for(tiny_llama(), short).compute_activation_sparsity()


# --- pruning ---------------------------------------------------------------------------------------------------


def silence_neuron_(model, layer: int, neuron: int) -> None:
    """Make a hidden neuron output exactly zero on every input, through its input weights alone."""
    with torch.no_grad():
        if model.config.model_type == "llama":
            model.model.layers[layer].mlp.up_proj.weight[neuron] = 0  # SiLU(gate) * 0
        elif model.config.model_type == "gpt2":
            model.transformer.h[layer].mlp.c_fc.weight[:, neuron] = 0
            model.transformer.h[layer].mlp.c_fc.bias[neuron] = -100  # GELU(-100) == 0 in float32
        else:
            model.gpt_neox.layers[layer].mlp.dense_h_to_4h.weight[neuron] = 0
            model.gpt_neox.layers[layer].mlp.dense_h_to_4h.bias[neuron] = -100


# Weights one hidden neuron owns in the tiny models (width 32): the input rows (and bias entries), the output column.
PARAMS_PER_NEURON = {"llama": 32 + 32 + 32, "gpt2": 32 + 1 + 32, "neox_parallel": 65, "neox_sequential": 65}


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_pruning_a_silent_neuron_changes_nothing_and_an_active_one_changes_the_output(name, corpus):
    torch.manual_seed(0)
    model = TINY_MODELS[name]().eval()
    silence_neuron_(model, layer=1, neuron=5)
    windows = random_windows(4)
    analyzer = analyzer_for(model, corpus, eps=0.0)
    sparsity = analyzer.compute_activation_sparsity([windows], "blocks.1.mlp.hook_post")["blocks.1.mlp.hook_post"]
    assert (
        sparsity.sparsity_D[5] == 1.0 and (sparsity.sparsity_D[torch.arange(len(sparsity.sparsity_D)) != 5] < 1).all()
    )
    active = int(sparsity.mean_abs_D.argmax())
    assert params_per_neuron(model, 1) == PARAMS_PER_NEURON[name]

    before = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        clean = model(windows).logits
        with pruned_neurons(model, {1: torch.tensor([5])}):
            torch.testing.assert_close(model(windows).logits, clean, rtol=0, atol=0)
        with pruned_neurons(model, {1: torch.tensor([active])}):
            assert (model(windows).logits - clean).abs().max() > 1e-4
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} not restored"

    result = analyzer.prune_network(0.99, layers=[1], sparsity={sparsity.hook: sparsity})
    assert [(layer.layer, layer.pruned, layer.params_removed) for layer in result.layers] == [
        (1, 1, PARAMS_PER_NEURON[name])
    ]
    assert result.loss_after == pytest.approx(result.loss_before, abs=1e-6)
    assert result.model_params == sum(p.numel() for p in model.parameters())


def test_pruning_everything_costs_loss_and_saves_a_loadable_checkpoint(corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = tiny_llama()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(5)  # large enough activations that the MLPs matter to the loss
    analyzer = analyzer_for(model, corpus, eps=1e6)  # every neuron counts as inactive everywhere
    result = analyzer.prune_network(0.0, save_to=tmp_path / "pruned")
    assert [layer.pruned for layer in result.layers] == [48, 48, 48]
    assert result.params_removed == 3 * 48 * 96
    assert result.loss_after != pytest.approx(result.loss_before, abs=1e-3)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert saved.model.layers[2].mlp.down_proj.weight.abs().sum() == 0
    assert model.model.layers[2].mlp.down_proj.weight.abs().sum() > 0  # the analyzer's model is restored
    assert json.loads((tmp_path / "pruned" / "pruning.json").read_text())["pruned_neurons"]["0"] == list(range(48))


# --- polysemantic neurons --------------------------------------------------------------------------------------

# Word ids (word_tokenizer: 5 + index in WORDS) of the directions the hand-built neurons read.
A, B, C = 5 + WORDS.index("she"), 5 + WORDS.index("time"), 5 + WORDS.index("good")


def token_direction_model():
    """A tiny Llama whose layer-0 residual is the token's embedding (attention and MLP outputs zeroed), with
    hidden neuron 0 reading the directions of tokens A and B and neuron 1 the direction of token C alone."""
    torch.manual_seed(0)
    model = tiny_llama()
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        unit = torch.nn.functional.normalize(model.model.embed_tokens.weight, dim=1)
        for neuron, direction in ((0, unit[A] + unit[B]), (1, unit[C])):
            layer.mlp.gate_proj.weight[neuron] = 3 * direction
            layer.mlp.up_proj.weight[neuron] = 3 * direction
    return model, unit


def planted_windows() -> list[list[int]]:
    """Random words, with A and B six times each and C twelve times."""
    g = torch.Generator().manual_seed(3)
    others = [i for i in range(5, 48) if i not in (A, B, C)]
    tokens = [others[int(i)] for i in torch.randint(len(others), (8 * 15,), generator=g)]
    for position, token in zip(range(0, 120, 5), [A, B] * 6 + [C] * 12):
        tokens[position] = token
    return [[0, *tokens[i : i + 15]] for i in range(0, 120, 15)]


def token_dictionary(unit) -> Dictionary:
    """One latent per token, along its embedding: each row's only active latent (k = 1) is its own token."""
    sae = TopKSAE(32, unit.shape[0], k=1)
    with torch.no_grad():
        sae.W_enc.copy_(unit)
        sae.W_dec.copy_(unit)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    model, _ = token_direction_model()
    return Dictionary(sae, resolve_hook(model.config, "blocks.0.hook_resid_post"))


@pytest.mark.parametrize("explained_by", ["latent", "cluster"])
def test_a_neuron_on_two_directions_is_polysemantic_and_one_on_one_direction_is_not(corpus, explained_by):
    model, unit = token_direction_model()
    analyzer = analyzer_for(model, corpus, top_contexts=12, min_share=0.25, eps=0.01, context_tokens=3)
    dictionary = token_dictionary(unit) if explained_by == "latent" else None
    neurons = analyzer.find_polysemantic_neurons("blocks.0.mlp.hook_post", 2, dictionary, id_list=planted_windows())
    found = {p.neuron: p for p in neurons}
    assert 0 in found and 1 not in found
    neuron = found[0]
    assert neuron.explained_by == explained_by and neuron.contexts == 12
    assert [group.share for group in neuron.groups] == [0.5, 0.5]
    if explained_by == "latent":
        assert sorted(group.label for group in neuron.groups) == sorted([A, B])
    words = {example.split("[[")[1].rstrip("]") for group in neuron.groups for example in group.examples}
    assert words == {"she", "time"}


def test_latents_active_everywhere_explain_nothing():
    """A latent on every token (lift 1) is no candidate; two specific latents split the contexts between them."""
    explainer = LatentExplainer(TopKSAE(4, 8, 2), min_share=0.25, min_lift=2.0)
    explainer.fired_F = torch.tensor([100, 10, 10, 0, 0, 0, 0, 0])
    explainer.rows = 100
    latents_NK = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 2]])
    assert [(label, rows.tolist()) for label, rows in explainer.groups(latents_NK, min_count=2)] == [
        (1, [0, 1]),
        (2, [2, 3]),
    ]
    # Latents that always fire together take the same contexts: they count once.
    together_NK = torch.tensor([[1, 2], [1, 2], [1, 2], [1, 2]])
    assert len(explainer.groups(together_NK, min_count=2)) == 1


def test_top_rows_keeps_the_largest_across_batches():
    top = TopRows(2)
    top.update(torch.tensor([[1.0, 5.0], [3.0, 0.0]]), {"id": torch.tensor([10, 11])})
    top.update(torch.tensor([[2.0, 4.0], [0.5, 6.0]]), {"id": torch.tensor([12, 13])})
    assert top.scores_NU.tolist() == [[3.0, 6.0], [2.0, 5.0]]
    assert top.payloads["id"].tolist() == [[11, 13], [12, 10]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_analyzer_on_cuda_in_bfloat16(corpus):
    model, unit = token_direction_model()
    windows = planted_windows()
    cpu = analyzer_for(model, corpus, eps=0.05, top_contexts=12, min_share=0.25, context_tokens=3)
    expected = cpu.compute_activation_sparsity([windows], "blocks.0.mlp.hook_post")["blocks.0.mlp.hook_post"]
    gpu_model = model.to("cuda", torch.bfloat16)
    gpu = analyzer_for(gpu_model, corpus, "cuda", eps=0.05, top_contexts=12, min_share=0.25, context_tokens=3)
    found = gpu.compute_activation_sparsity([windows], "blocks.0.mlp.hook_post")["blocks.0.mlp.hook_post"]
    # bfloat16 moves a few activations across eps; the counts agree to a few tokens in 120.
    assert (found.sparsity_D - expected.sparsity_D).abs().max() <= 4 / 120
    before = {key: value.clone() for key, value in gpu_model.state_dict().items()}
    result = gpu.prune_network(0.5, layers=[0, 1], sparsity=gpu.compute_activation_sparsity())
    assert result.params_removed > 0 and math.isfinite(result.loss_after)
    assert all(torch.equal(value, before[key]) for key, value in gpu_model.state_dict().items())
    for dictionary in (token_dictionary(unit), None):
        neurons = gpu.find_polysemantic_neurons("blocks.0.mlp.hook_post", 2, dictionary, id_list=windows)
        assert 0 in [neuron.neuron for neuron in neurons] and 1 not in [neuron.neuron for neuron in neurons]


@pytest.mark.slow
def test_the_embedded_model():
    """SmolLM2 and, when it has been trained, the default dictionary: the three measurements run end to end."""
    from dictlearn.lm.models import load_language_model
    from dictlearn.params import ModelParams

    torch.set_num_threads(2)
    lm = load_language_model(ModelParams(device="cpu"))
    params = Params().with_overrides(
        data={"context_size": 64}, sparsity={"tokens": 630, "lm_loss_windows": 2, "layers": [6], "top_contexts": 8}
    )
    analyzer = SparsityAnalyzer(lm, params)
    stats = analyzer.compute_activation_sparsity()["blocks.6.mlp.hook_post"]
    assert stats.tokens == 630 and len(stats.sparsity_D) == 1536
    assert 0.3 < stats.mean_sparsity < 0.95 and 0 < stats.hoyer < 1
    result = analyzer.prune_network(0.5, sparsity={stats.hook: stats})
    assert result.layers[0].params_removed == result.layers[0].pruned * 3 * 576
    assert result.loss_after > result.loss_before
    if Path(params.sparsity.dictionary, "ae.pt").is_file():
        neurons = analyzer.find_polysemantic_neurons()
        assert all(len(neuron.groups) >= 3 and neuron.explained_by == "latent" for neuron in neurons)


# --- the script ------------------------------------------------------------------------------------------------


def script_params(model, corpus, tmp_path, **sparsity) -> dict:
    return {
        "model": {"name": str(model), "device": "cpu"},
        "data": {"source": "files", "path": str(corpus), "context_size": 16},
        "sparsity": {
            "tokens": 1200,
            "lm_loss_windows": 4,
            "sweep_thresholds": [0.5, 0.9],
            "polysemantic_hook": "blocks.1.mlp.hook_post",
            "output_dir": str(tmp_path / "out"),
            **sparsity,
        },
    }


def test_script_writes_tables_plots_and_json(tmp_path, tiny_checkpoint_with_text, monkeypatch):
    monkeypatch.setenv("DICTLEARN_THREADS", "1")
    model, corpus = tiny_checkpoint_with_text
    folder = tmp_path / "dictionary"
    folder.mkdir()
    write_dictionary(folder, TopKSAE(32, 64, 4, seed=0), str(model), "blocks.1.hook_resid_post")
    params = script_params(model, corpus, tmp_path, dictionary=str(folder), eps=0.01, min_lift=1.0)
    result = run("sparsity.py", params, tmp_path)
    assert result.returncode == 0, result.stderr
    for heading in (
        "mean sparsity",
        "pruning at sparsity > 0.9",
        "LM loss change",
        "neurons at blocks.1.mlp.hook_post",
    ):
        assert heading in result.stdout
    out = tmp_path / "out"
    for name in ("sparsity.json", "params.json", "neuron_sparsity.safetensors", "sparsity_histograms.png"):
        assert (out / name).is_file(), name
    record = json.loads((out / "sparsity.json").read_text())
    assert [entry["hook"] for entry in record["sparsity"]] == [f"blocks.{i}.mlp.hook_post" for i in range(3)]
    assert [entry["threshold"] for entry in record["pruning"]] == [0.5, 0.9]
    assert (out / "pruning_curve.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("sparsity", "message"),
    [
        ({"layers": [1, 7]}, r"^error: sparsity\.layers: layer 7 out of range; this model has layers 0\.\.2$"),
        ({"polysemantic_hook": "blocks.1.mlp.hook_pre"}, r"^error: sparsity\.polysemantic_hook: unknown hook name"),
        (
            {"dictionary": "nowhere"},
            r"^error: sparsity\.dictionary: no dictionary at nowhere .*set sparsity\.dictionary",
        ),
        ({"save_pruned": "params.json"}, r"^error: sparsity\.save_pruned: params.json is a file; name a folder$"),
        (
            {"output_dir": "params.json/{model}", "dictionary": None},
            r"^error: sparsity\.output_dir: params.json/model cannot be made: params.json is a file; name a folder$",
        ),
    ],
)
def test_bad_sparsity_settings_are_one_line_errors(tmp_path, tiny_checkpoint_with_text, sparsity, message):
    model, corpus = tiny_checkpoint_with_text
    result = run("sparsity.py", script_params(model, corpus, tmp_path, **sparsity), tmp_path)
    assert_one_line_error(result, message)


@pytest.mark.parametrize(
    ("sparsity", "message"),
    [
        ({"prune_threshold": 1.0}, r"^params: sparsity\.prune_threshold: input should be less than 1; found 1\.0$"),
        ({"sweep_thresholds": [0.5, -0.1]}, r"^params: sparsity\.sweep_thresholds\.1: input should be greater than or"),
        ({"sweep_thresholds": []}, r"^params: sparsity\.sweep_thresholds: list should have at least 1 item"),
        ({"min_share": 0}, r"^params: sparsity\.min_share: input should be greater than 0; found 0$"),
        ({"min_shares": 0.2}, r"^params: unknown key 'sparsity\.min_shares'; did you mean 'min_share'\?$"),
    ],
)
def test_bad_sparsity_values_are_refused_with_one_line(sparsity, message):
    with pytest.raises(UserError, match=message):
        parse_params({"sparsity": sparsity})


def test_a_dictionary_of_another_layer_is_refused(tmp_path, tiny_checkpoint_with_text):
    model, corpus = tiny_checkpoint_with_text
    folder = tmp_path / "layer2"
    folder.mkdir()
    write_dictionary(folder, TopKSAE(32, 64, 4), str(model), "blocks.2.hook_resid_post")
    result = run("sparsity.py", script_params(model, corpus, tmp_path, dictionary=str(folder)), tmp_path)
    assert_one_line_error(
        result, r"sparsity\.dictionary: .* was trained at blocks\.2\.hook_resid_post \(layer 2\), but the neurons"
    )
