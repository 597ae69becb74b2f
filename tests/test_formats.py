"""Every peer library's files (shared/fixtures/peer-formats, saved by the real libraries) read through detection
and reproduce that library's codes and reconstructions; every conversion round-trips; every bad file is one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from dictlearn.errors import UserError
from dictlearn.formats.convert import TARGETS, write_as
from dictlearn.formats.detect import open_any
from dictlearn.formats.remote import openai_url
from dictlearn.formats.run_folder import check_dictionary_matches, load_dictionary
from dictlearn.sae.base import SparseCodes, StepContext, codes_to_dense
from dictlearn.sae.batchtopk import BatchTopKObjective, padded_codes
from dictlearn.sae.registry import ARCHITECTURES
from dictlearn.sae.topk import TopKObjective, TopKSAE, layer_norm_rows
from tests.conftest import word_tokenizer, write_corpus

REPO = Path(__file__).resolve().parents[1]
# ../shared/fixtures/peer-formats beside the checkout (a git worktree sits one level deeper).
FIXTURES = next(
    (
        folder / "shared" / "fixtures" / "peer-formats"
        for folder in Path(__file__).resolve().parents[2:4]
        if (folder / "shared" / "fixtures" / "peer-formats").is_dir()
    ),
    Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "peer-formats",
)
TOLERANCE = 1e-5

# case -> (what to open, relative to the case folder; the architecture our class needs)
CASES = {
    "dictionary_learning/standard": ("trainer_0", "relu"),
    "dictionary_learning/topk": ("trainer_0", "topk"),
    "dictionary_learning/batchtopk": ("trainer_0", "batchtopk"),
    "dictionary_learning/jumprelu": ("trainer_0", "jumprelu"),
    "dictionary_learning/gated": ("trainer_0", "gated"),
    "dictionary_learning/matryoshka_batchtopk": ("trainer_0", "matryoshka"),
    "dictionary_learning/topk_checkpoint": ("trainer_0/checkpoints/ae_2.pt", "topk"),
    "saelens/standard": (".", "relu"),
    "saelens/topk": (".", "topk"),
    "saelens/topk_rescale": (".", "topk"),
    "saelens/jumprelu": (".", "jumprelu"),
    "saelens/gated": (".", "gated"),
    "saelens/batchtopk": (".", "jumprelu"),
    "sparsify/topk": ("layers.6", "topk"),
    "sparsify/transcoder": ("layers.6.mlp", "topk"),
    "sparsify/transcoder_skip": ("layers.6.mlp", "topk"),
    "openai/topk": ("resid_post_mlp/autoencoders/6.pt", "topk"),
    "openai/relu": ("resid_post_mlp/autoencoders/6.pt", "relu"),
}
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"{FIXTURES} is absent")


def _case(case: str) -> tuple[Path, dict[str, torch.Tensor]]:
    relative, architecture = CASES[case]
    if architecture not in ARCHITECTURES:
        pytest.skip(f"the {architecture} architecture has not landed")
    return FIXTURES / case / relative, load_file(FIXTURES / case / "reference.safetensors")


def _outputs(sae, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense codes, x_hat) of ``sae`` on ``x_BD``."""
    with torch.no_grad():
        out = sae(x_BD)
    return codes_to_dense(out.codes, sae.num_latents), out.x_hat


def _assert_close(found: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert found.shape == expected.shape, what
    difference = float((found - expected).abs().max())
    assert difference <= TOLERANCE, f"{what}: max difference {difference:.2e}"


@needs_fixtures
@pytest.mark.parametrize("case", sorted(CASES))
def test_fixture_reproduces_its_library(case):
    path, reference = _case(case)
    sae, info = open_any(path)
    codes_BF, x_hat_BD = _outputs(sae, reference["x"])
    _assert_close(codes_BF, reference["codes"], f"{case} codes")
    assert torch.equal(codes_BF != 0, reference["codes"] != 0), f"{case}: active sets differ"
    _assert_close(x_hat_BD, reference["x_hat"], f"{case} x_hat")
    assert info.format == {"dictionary": "dictionary_learning"}.get(case.split("/")[0], case.split("/")[0])
    assert info.hook == ("blocks.6.ln2.hook_normalized" if "transcoder" in case else "blocks.6.hook_resid_post")
    assert info.target_hook == ("blocks.6.hook_mlp_out" if "transcoder" in case else None)
    # The model is named where the format has a field for it; OpenAI's and sparsify's files do not.
    assert info.model == (None if case.split("/")[0] in ("openai", "sparsify") else "smollm2-135m")


@needs_fixtures
def test_dictionary_learning_extras():
    """The final ae.pt beside a checkpoint, the batch top-k training path, and the TopK threshold kept."""
    path, reference = _case("dictionary_learning/topk_checkpoint")
    sae, _ = open_any(path.parents[1])
    codes_BF, x_hat_BD = _outputs(sae, reference["x"])
    _assert_close(codes_BF, reference["codes_final"], "codes_final")
    _assert_close(x_hat_BD, reference["x_hat_final"], "x_hat_final")
    facts = json.loads((FIXTURES / "dictionary_learning/topk/reference.json").read_text())["param_facts"]
    sae, _ = open_any(FIXTURES / "dictionary_learning/topk/trainer_0")
    assert float(sae.threshold) == pytest.approx(facts["threshold_min"], abs=1e-6)
    for case in ("dictionary_learning/batchtopk", "dictionary_learning/matryoshka_batchtopk"):
        if CASES[case][1] not in ARCHITECTURES:
            continue
        path, reference = _case(case)
        sae, _ = open_any(path)
        with torch.no_grad():  # the batch top-k is the training forward, the objective's
            values_E, selection, pre_acts_BF = BatchTopKObjective(1, 0.0, 0.999, 0).forward_selected(
                sae, reference["x"]
            )
            x_hat_BD = sae.decode_without_bias(values_E, selection) + sae.b_dec
            codes = padded_codes(values_E, selection, pre_acts_BF)
        _assert_close(codes_to_dense(codes, sae.num_latents), reference["codes_batch_topk"], f"{case} batch top-k")
        _assert_close(x_hat_BD, reference["x_hat_batch_topk"], f"{case} batch top-k x_hat")


@needs_fixtures
@pytest.mark.parametrize("case", sorted(CASES))
def test_conversions_round_trip(case, tmp_path):
    """Every target either writes a dictionary that reads back to the same outputs, or refuses in one line."""
    path, reference = _case(case)
    sae, info = open_any(path)
    expected_codes, expected_x_hat = _outputs(sae, reference["x"])
    written = []
    for target in TARGETS:
        try:
            out = write_as(sae, info, target, tmp_path / target)
        except UserError as err:
            assert "\n" not in str(err) and target != "ours", f"{target}: {err}"
            continue
        written.append(target)
        again, again_info = open_any(out)
        codes_BF, x_hat_BD = _outputs(again, reference["x"])
        _assert_close(codes_BF, expected_codes, f"{case} -> {target} codes")
        _assert_close(x_hat_BD, expected_x_hat, f"{case} -> {target} x_hat")
        assert (again_info.hook, again_info.target_hook) == (info.hook, info.target_hook), target
        if target in ("ours", "dictionary_learning", "saelens"):
            assert again_info.model == info.model, target
        # And back into the source's own format.
        source_format = "ours" if info.format == "dictlearn" else info.format
        if source_format in TARGETS and source_format != target:
            back = write_as(again, again_info._replace(model=info.model), source_format, tmp_path / f"{target}_back")
            codes_BF, x_hat_BD = _outputs(open_any(back)[0], reference["x"])
            _assert_close(codes_BF, expected_codes, f"{case} -> {target} -> {source_format} codes")
            _assert_close(x_hat_BD, expected_x_hat, f"{case} -> {target} -> {source_format} x_hat")
    assert "ours" in written and info.format.replace("dictlearn", "ours") in written


@needs_fixtures
def test_targets_that_cannot_hold_a_dictionary_refuse(tmp_path):
    openai_sae, openai_info = open_any(FIXTURES / "openai/topk")
    with pytest.raises(UserError, match=r"^dictionary_learning has no class .* layer-normalises its input"):
        write_as(openai_sae, openai_info, "dictionary_learning", tmp_path / "a")
    with pytest.raises(UserError, match=r"^SAELens has no class that holds an input-normalised"):
        write_as(openai_sae, openai_info, "saelens", tmp_path / "b")
    topk, topk_info = open_any(FIXTURES / "sparsify/topk")
    with pytest.raises(UserError, match=r"^OpenAI's TopK Autoencoder always layer-normalises its input"):
        write_as(topk, topk_info, "openai", tmp_path / "c")
    transcoder, transcoder_info = open_any(FIXTURES / "sparsify/transcoder_skip")
    with pytest.raises(
        UserError, match=r"^dictionary_learning has no class .* \(it is a transcoder\); convert it to .ours. instead$"
    ):
        write_as(transcoder, transcoder_info, "dictionary_learning", tmp_path / "d")
    with pytest.raises(
        UserError,
        match=r"^SAELens has no class that holds a topk transcoder exactly \(its transcoders are ReLU and JumpReLU\);",
    ):
        write_as(transcoder, transcoder_info, "saelens", tmp_path / "f")
    batchtopk, batchtopk_info = open_any(FIXTURES / "dictionary_learning/batchtopk")
    with pytest.raises(UserError, match=r"^sparsify has no class that holds a batchtopk SAE exactly"):
        write_as(batchtopk, batchtopk_info, "sparsify", tmp_path / "e")
    gated, gated_info = open_any(FIXTURES / "saelens/gated")
    with pytest.raises(UserError, match=r"^dictionary_learning has no class .* GatedAutoEncoder's normalize_decoder"):
        write_as(gated, gated_info, "dictionary_learning", tmp_path / "g")
    # A refusal comes before any folder is made (make test-peers loads every folder an export leaves).
    assert not any((tmp_path / name).exists() for name in "abcdefg")


@needs_fixtures
def test_sparsify_export_claims_a_normalised_decoder_only_when_it_is(tmp_path):
    """sparsify renormalises decoder rows while training when cfg.json says normalize_decoder: a SAELens TopK with
    free decoder norms must not claim it; sparsify's own unit-norm SAE keeps it."""
    for case, expected in (("saelens/topk", False), ("sparsify/topk", True)):
        sae, info = open_any(FIXTURES / case)
        out = write_as(sae, info, "sparsify", tmp_path / case.replace("/", "_"))
        assert json.loads((out / "cfg.json").read_text())["normalize_decoder"] is expected, case


def test_openai_input_norm_round_trips_exactly():
    """decode(encode(x)) is OpenAI's decode(*encode(x)): (W_dec z + pre_bias) * std + mu, std without the eps."""
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, 4, input_norm=True, seed=0)
    x_BD = 3 * torch.randn(8, 16) + 1
    codes = sae.encode(x_BD)
    mu_B1, std_B1 = codes.input_norm
    x_n, _, _ = layer_norm_rows(x_BD)
    plain = TopKSAE(16, 64, 4, seed=0)
    plain_codes = plain.encode(x_n)
    assert torch.equal(codes.indices, plain_codes.indices)
    torch.testing.assert_close(sae.decode(codes), plain.decode(plain_codes) * std_B1 + mu_B1)
    assert sae.decode(codes._replace(input_norm=None)).shape == (8, 16)  # hand-built codes: normalised units


def test_topk_threshold_is_the_running_estimate_dictionary_learning_keeps():
    """TopKTrainer's rule: unset (-1) before the start step, then the mean of each row's smallest kept value,
    folded in with beta; the dictionary_learning file carries it."""
    from dictlearn.formats.dictionary_learning import topk_to_state_dict

    sae = TopKSAE(16, 64, 4, seed=0)
    objective = TopKObjective(8, 1 / 32)
    values_BK = torch.tensor([[3.0, 2.0, 1.0, 0.0], [5.0, 4.0, 0.5, 0.25]])
    out = type("Out", (), {"codes": SparseCodes(values_BK, torch.zeros(2, 4, dtype=torch.long), None)})()
    mask = torch.zeros(64, dtype=torch.bool)
    objective.after_optimizer_step(sae, out, StepContext(10, 2000, mask))
    assert float(sae.threshold) == -1.0
    objective.after_optimizer_step(sae, out, StepContext(1000, 2000, mask))
    assert float(sae.threshold) == pytest.approx((1.0 + 0.25) / 2)
    objective.after_optimizer_step(sae, out, StepContext(1001, 2000, mask))
    assert float(sae.threshold) == pytest.approx(0.625)
    assert float(topk_to_state_dict(sae)["threshold"]) == pytest.approx(0.625)


def test_hooks_and_models_compare_resolved(tmp_path):
    """dictionary_learning's submodule names and the embedded model's two names are accepted as what they are."""
    sae = TopKSAE(16, 64, 4, seed=0)
    for name in ("resid_out_layer6", "resid_post_layer_6", "blocks.6.hook_resid_post"):
        config = {"trainer": {"lm_name": "HuggingFaceTB/SmolLM2-135M-Instruct", "submodule_name": name}}
        check_dictionary_matches(config, sae, model_name="smollm2-135m", hook_name="blocks.6.hook_resid_post", d_in=16)
    config = {"trainer": {"lm_name": "smollm2-135m", "submodule_name": "resid_out_layer6"}}
    with pytest.raises(
        UserError,
        match=r"^dictionary was trained at hook 'resid_out_layer6', not 'blocks.5.hook_resid_post'; set hook to 'blocks.6.hook_resid_post'$",
    ):
        check_dictionary_matches(config, sae, model_name="smollm2-135m", hook_name="blocks.5.hook_resid_post", d_in=16)
    with pytest.raises(UserError, match=r"^dictionary was trained on model 'smollm2-135m', not 'gpt2'"):
        check_dictionary_matches(config, sae, model_name="gpt2", hook_name="blocks.6.hook_resid_post", d_in=16)
    with pytest.raises(UserError, match=r"^dictionary width 16 does not match the activation width 32"):
        check_dictionary_matches(config, sae, model_name="smollm2-135m", hook_name="blocks.6.hook_resid_post", d_in=32)


# --- bad files: one line each, naming the file and what was expected ---


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@needs_fixtures
def test_broken_files_are_one_line(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "dictionary_learning/topk/trainer_0", run)
    (run / "ae.pt").write_bytes((FIXTURES / "dictionary_learning/topk/trainer_0/ae.pt").read_bytes()[:500])
    with pytest.raises(UserError) as err:
        open_any(run)
    assert _one_line(err) == f"{run / 'ae.pt'}: dictionary weights is not a PyTorch file (corrupt or truncated)"

    saelens = tmp_path / "saelens"
    shutil.copytree(FIXTURES / "saelens/topk", saelens)
    (saelens / "sae_weights.safetensors").write_bytes(
        (FIXTURES / "saelens/topk/sae_weights.safetensors").read_bytes()[:300]
    )
    with pytest.raises(
        UserError, match=r"sae_weights.safetensors: SAELens weights is not a readable safetensors file"
    ) as err:
        open_any(saelens)
    _one_line(err)

    # Wrong keys: a ReLU AutoEncoder's state dict under a config that says AutoEncoderTopK.
    wrong = tmp_path / "wrong_keys"
    wrong.mkdir()
    shutil.copy(FIXTURES / "dictionary_learning/topk/trainer_0/config.json", wrong / "config.json")
    torch.save({"bias": torch.zeros(16), "encoder.weight": torch.zeros(64, 16)}, wrong / "ae.pt")
    with pytest.raises(UserError) as err:
        open_any(wrong)
    assert _one_line(err).startswith(
        f"{wrong / 'ae.pt'}: not a dictionary_learning AutoEncoderTopK state dict: expected keys"
    )

    shapes = tmp_path / "wrong_shapes"
    shutil.copytree(FIXTURES / "sparsify/topk/layers.6", shapes / "layers.6")
    tensors = load_file(shapes / "layers.6" / "sae.safetensors")
    tensors["b_dec"] = torch.zeros(15)
    save_file(tensors, str(shapes / "layers.6" / "sae.safetensors"))
    with pytest.raises(
        UserError, match=r"sae\.safetensors\) state dict: b_dec should have shape \[16\] \(F=64, D=16\), found \[15\]"
    ) as err:
        open_any(shapes)
    _one_line(err)

    openai_file = tmp_path / "resid_post_mlp" / "autoencoders" / "6.pt"
    openai_file.parent.mkdir(parents=True)
    state = torch.load(FIXTURES / "openai/topk/resid_post_mlp/autoencoders/6.pt", weights_only=True)
    state["activation"] = "Sigmoid"
    torch.save(state, openai_file)
    with pytest.raises(
        UserError, match=r"6\.pt: OpenAI activation 'Sigmoid' is not supported; expected 'TopK' or 'ReLU'$"
    ) as err:
        open_any(openai_file)
    _one_line(err)


def test_unknown_formats_are_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^no dictionary at .*nowhere: ae\.pt is missing") as err:
        open_any(tmp_path / "nowhere")
    _one_line(err)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"notes\.txt: not a dictionary file; expected a run folder") as err:
        open_any(tmp_path / "notes.txt")
    _one_line(err)
    bare = tmp_path / "bare"
    bare.mkdir()
    torch.save({"W_enc": torch.zeros(16, 64), "W_dec": torch.zeros(64, 16)}, bare / "ae.pt")
    with pytest.raises(
        UserError, match=r"bare/ae\.pt: no config\.json says which class .* not dictionary_learning AutoEncoder's"
    ) as err:
        open_any(bare)
    _one_line(err)
    half = tmp_path / "half"
    half.mkdir()
    (half / "cfg.json").write_text("{}")
    with pytest.raises(
        UserError, match=r"half: has cfg\.json but neither sae_weights\.safetensors \(SAELens\) nor"
    ) as err:
        open_any(half)
    _one_line(err)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"^no dictionary at .*empty: ae\.pt is missing; expected") as err:
        load_dictionary(empty)
    _one_line(err)


@needs_fixtures
def test_a_folder_of_several_dictionaries_asks_for_one(tmp_path):
    shutil.copytree(FIXTURES / "sparsify/topk/layers.6", tmp_path / "layers.6")
    shutil.copytree(FIXTURES / "sparsify/transcoder/layers.6.mlp", tmp_path / "layers.6.mlp")
    with pytest.raises(UserError, match=r"holds 2 dictionaries \(layers\.6, layers\.6\.mlp\); give one of them$"):
        open_any(tmp_path)


@pytest.mark.parametrize(
    "spec",
    [
        "az://openaipublic/sparse-autoencoder/gpt2-small/resid_post_mlp_v5_32k/autoencoders/6.pt",
        "openai:v5_32k/resid_post_mlp/6",
        "hf://someone/some-saes/layers.6",
    ],
)
def test_remote_without_network_is_one_line(spec, monkeypatch, tmp_path):
    """No network here: one line naming the remote path, at once (one short probe)."""
    monkeypatch.setattr("dictlearn.formats.remote.REMOTE_CACHE", tmp_path)
    monkeypatch.setattr("dictlearn.formats.remote._unreachable", lambda host, port=443: "Name or service not known")
    with pytest.raises(UserError) as err:
        open_any(spec)
    assert _one_line(err).startswith(f"{spec}: cannot download the dictionary: ")
    assert "cannot be reached (Name or service not known); no network?" in str(err.value)


def test_remote_names():
    assert openai_url("openai:v5_32k/resid_post_mlp/6") == (
        "az://openaipublic/sparse-autoencoder/gpt2-small/resid_post_mlp_v5_32k/autoencoders/6.pt"
    )
    with pytest.raises(UserError, match=r"^openai:v9/resid/6: expected openai:<v5_32k\|v5_128k>/<location>/<layer>"):
        openai_url("openai:v9/resid/6")


@needs_fixtures
def test_remote_files_are_read_from_the_cache(monkeypatch, tmp_path):
    """A fetched file is read from data/cache without the network; the path names the model (gpt2)."""
    monkeypatch.setattr("dictlearn.formats.remote.REMOTE_CACHE", tmp_path)
    monkeypatch.setattr("dictlearn.formats.remote._unreachable", lambda host, port=443: pytest.fail("probed"))
    cached = tmp_path / "az/openaipublic/sparse-autoencoder/gpt2-small/resid_post_mlp_v5_32k/autoencoders/6.pt"
    cached.parent.mkdir(parents=True)
    shutil.copy(FIXTURES / "openai/topk/resid_post_mlp/autoencoders/6.pt", cached)
    sae, info = open_any("openai:v5_32k/resid_post_mlp/6")
    assert (info.format, info.model, info.hook) == ("openai", "gpt2", "blocks.6.hook_resid_post")


# --- scripts ---


@pytest.fixture(scope="module")
def width_16_checkpoint(tmp_path_factory):
    """A tiny Llama of width 16 with 7 layers (the fixtures are d_in 16 at layer 6), a tokenizer and a corpus."""
    folder = tmp_path_factory.mktemp("tiny-llama-16")
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=7,
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=16,
        vocab_size=101,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder / "model")
    word_tokenizer().save_pretrained(folder / "model")
    write_corpus(folder / "corpus.txt", sentences=200)
    return folder / "model", folder / "corpus.txt"


def _run_get_sparse_rep(tmp_path, model: Path, corpus: Path, dictionary: Path):
    (tmp_path / "sentences.csv").write_text("group,sentence\na,she was very good .\nb,what could they know .\n")
    params = {
        "model": {"name": str(model), "device": "cpu"},
        "hook": "blocks.6.hook_resid_post",
        "data": {"source": "files", "path": str(corpus), "context_size": 16},
        "sentences": {"csv": str(tmp_path / "sentences.csv"), "batch_size": 4, "output_dir": str(tmp_path / "out")},
    }
    (tmp_path / "params.json").write_text(json.dumps(params))
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "get_sparse_rep.py"),
            "--params",
            str(tmp_path / "params.json"),
            "--dictionary",
            str(dictionary),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
    )


@needs_fixtures
@pytest.mark.parametrize(
    "case",
    ["sparsify/topk", "openai/topk", "dictionary_learning/topk", "dictionary_learning/standard", "saelens/jumprelu"],
)
def test_get_sparse_rep_reads_every_format(case, tmp_path, width_16_checkpoint):
    """The fixtures name smollm2-135m where their format records a model; a copy names the tiny checkpoint."""
    model, corpus = width_16_checkpoint
    dictionary = tmp_path / "dictionary"
    shutil.copytree(FIXTURES / case, dictionary, ignore=shutil.ignore_patterns("reference.*"))
    for config_path in [*dictionary.rglob("config.json"), *dictionary.rglob("cfg.json")]:
        config_path.write_text(config_path.read_text().replace('"smollm2-135m"', json.dumps(str(model))))
    result = _run_get_sparse_rep(tmp_path, model, corpus, dictionary)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sparse codes" in result.stdout and "summary over 2 sentences" in result.stdout
    if case.split("/")[0] in ("sparsify", "openai"):
        assert "does not record its model; using the params' model" in result.stdout


@needs_fixtures
def test_scripts_refuse_a_dictionary_of_another_width(tmp_path, width_16_checkpoint):
    model, corpus = width_16_checkpoint
    shutil.copytree(FIXTURES / "sparsify/topk/layers.6", tmp_path / "wide" / "layers.6")
    tensors = load_file(tmp_path / "wide/layers.6/sae.safetensors")
    widened = {
        "encoder.weight": torch.zeros(64, 20),
        "encoder.bias": tensors["encoder.bias"],
        "W_dec": torch.zeros(64, 20),
        "b_dec": torch.zeros(20),
    }
    save_file(widened, str(tmp_path / "wide/layers.6/sae.safetensors"))
    result = _run_get_sparse_rep(tmp_path, model, corpus, tmp_path / "wide")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: dictionary {tmp_path / 'wide'} has width 20, but blocks.6.hook_resid_post of {model} has width 16; "
        "use a dictionary trained on this model and hook"
    ]


@needs_fixtures
def test_a_bare_autoencoder_file_takes_model_and_hook_from_params(tmp_path):
    """The published 10_32768 folders: ae.pt alone, read as AutoEncoder only because its keys are exactly that
    class's; the note says where the model and hook came from."""
    from dictlearn.params import parse_params

    if "relu" not in ARCHITECTURES:
        pytest.skip("the relu architecture has not landed")
    shutil.copy(FIXTURES / "dictionary_learning/standard/trainer_0/ae.pt", tmp_path / "ae.pt")
    reference = load_file(FIXTURES / "dictionary_learning/standard/reference.safetensors")
    params = parse_params({"model": {"name": "EleutherAI/pythia-70m-deduped"}, "hook": "resid_out_layer3"}, source="t")
    sae, info = open_any(tmp_path, params)
    codes_BF, x_hat_BD = _outputs(sae, reference["x"])
    _assert_close(codes_BF, reference["codes"], "bare codes")
    _assert_close(x_hat_BD, reference["x_hat"], "bare x_hat")
    assert (info.format, info.model, info.hook) == (
        "dictionary_learning",
        "EleutherAI/pythia-70m-deduped",
        "blocks.3.hook_resid_post",
    )
    assert info.note == (
        f"note: {tmp_path / 'ae.pt'} (dictionary_learning) does not record its model or hook; using the params' "
        "model 'EleutherAI/pythia-70m-deduped' and hook 'blocks.3.hook_resid_post'"
    )


@needs_fixtures
def test_init_from_refuses_another_model_hook_or_architecture():
    """training_script.py --init-from: any format, refused in one line on the wrong model, hook or architecture."""
    from types import SimpleNamespace

    from dictlearn.params import parse_params
    from dictlearn.training.runs import initial_weights

    params = parse_params({"model": {"name": "smollm2-135m"}, "hook": "blocks.6.hook_resid_post"}, source="t")
    lm, hook = (
        SimpleNamespace(name="HuggingFaceTB/SmolLM2-135M-Instruct"),
        SimpleNamespace(name="blocks.6.hook_resid_post"),
    )
    sae = initial_weights(str(FIXTURES / "saelens/topk"), params, lm, hook, 16)
    assert sae.architecture == "topk"
    with pytest.raises(UserError, match=r"^dictionary was trained at hook 'blocks.6.hook_resid_post', not 'blocks.5"):
        initial_weights(
            str(FIXTURES / "dictionary_learning/topk"), params, lm, SimpleNamespace(name="blocks.5.hook_resid_post"), 16
        )
    with pytest.raises(UserError, match=r"^dictionary was trained on model 'smollm2-135m', not 'gpt2'"):
        initial_weights(str(FIXTURES / "dictionary_learning/topk"), params, SimpleNamespace(name="gpt2"), hook, 16)
    with pytest.raises(
        UserError, match=r"^--init-from .*: a jumprelu dictionary cannot start a sae.architecture='topk'"
    ):
        initial_weights(str(FIXTURES / "saelens/jumprelu"), params, lm, hook, 16)
