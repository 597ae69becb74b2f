"""Every registered architecture behind the one interface: save/load round trip, exact kill-and-resume, and
every script that reads a dictionary, on a dictionary of each architecture trained by training_script.py."""

from __future__ import annotations

import json

import pytest
import torch

from dictlearn.activations.buffer import ShuffledBuffer
from dictlearn.formats.run_folder import load_dictionary, save_dictionary
from dictlearn.params import SAE_PARAMS, Params
from dictlearn.sae.registry import ARCHITECTURES, build_objective, build_sae
from dictlearn.training.trainer import Trainer
from tests.test_read_scripts import SENTENCES
from tests.test_scripts import run, tiny_params
from tests.test_train import D, Killed, synthetic_source

F = 64
ARCHITECTURE_NAMES = sorted(ARCHITECTURES)


def sae_section(architecture: str) -> dict:
    """A small, fast setting of each architecture (k 4 where it has a k; a resampling ReLU)."""
    section = {"architecture": architecture, "num_latents": F, "dead_tokens": 512}
    fields = SAE_PARAMS[architecture].model_fields
    if "k" in fields:
        section |= {"k": 4, "aux_k": 8}
    if "resample_every" in fields:
        section["resample_every"] = 6
        section["resample_rows"] = 256
    return section


def trainer_for(architecture: str, folder, seed: int = 0) -> Trainer:
    params = Params().with_overrides(
        sae=sae_section(architecture),
        buffer={"size_tokens": 1024, "batch_size": 128, "refill_fraction": 0.5},
        train={"tokens": 4096, "checkpoint_every": 5, "log_every": 2, "warmup_fraction": 0.1, "seed": seed},
    )
    torch.manual_seed(seed)
    sae = build_sae(params.sae, d_in=D, d_out=None, num_latents=F, seed=seed)
    objective = build_objective(params.sae, sae, 32)
    buffer = ShuffledBuffer(synthetic_source(), d_in=D, size=1024, batch_size=128, seed=seed)
    return Trainer(sae, objective, buffer, params, folder, lr=1e-3)


@pytest.mark.parametrize("architecture", ARCHITECTURE_NAMES)
def test_round_trip_through_the_run_folder_gives_the_same_outputs(tmp_path, architecture):
    trainer = trainer_for(architecture, tmp_path / "run")
    trainer.initialize(512)
    trainer.fit()
    trainer.finish()
    sae = trainer.sae
    save_dictionary(tmp_path, sae, {})
    loaded, _ = load_dictionary(tmp_path)
    assert type(loaded) is type(sae) and loaded.architecture == architecture
    x_BD = torch.randn(40, D)
    with torch.no_grad():
        a, b = sae(x_BD), loaded(x_BD)
    torch.testing.assert_close(b.x_hat, a.x_hat, rtol=0, atol=0)
    dense = [torch.zeros(40, F).scatter_add_(1, out.codes.indices, out.codes.values) for out in (a, b)]
    torch.testing.assert_close(dense[1], dense[0], rtol=0, atol=0)


@pytest.mark.parametrize("architecture", ARCHITECTURE_NAMES)
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, architecture):
    straight = trainer_for(architecture, tmp_path / "straight")
    straight.initialize(512)
    straight.fit()

    first = trainer_for(architecture, tmp_path / "killed")
    first.initialize(512)

    def kill_at_13(trainer, record):
        if trainer.step == 13:  # three steps after the checkpoint at step 10
            raise Killed

    with pytest.raises(Killed):
        first.fit(on_step=kill_at_13)
    resumed = trainer_for(architecture, tmp_path / "killed")
    resumed.load_checkpoint()
    assert resumed.step == 10
    resumed.fit()
    assert resumed.step == straight.step == 32
    for name, value in straight.sae.state_dict().items():
        torch.testing.assert_close(resumed.sae.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert resumed.metrics == straight.metrics


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURE_NAMES)
def test_every_dictionary_script_runs_on_a_trained_dictionary_of_each_architecture(
    tmp_path, tiny_checkpoint_with_text, architecture
):
    model, corpus = tiny_checkpoint_with_text
    params = tiny_params(model, corpus, tmp_path, source="live")
    params["sae"] = {**sae_section(architecture), "num_latents": 128}
    trained = run("training_script.py", params, tmp_path)
    assert trained.returncode == 0, trained.stderr
    (folder,) = (path.parent for path in (tmp_path / "dicts").rglob("ae.pt"))
    config = json.loads((folder / "config.json").read_text())
    assert config["sae"]["architecture"] == architecture and (folder / "eval.json").is_file()

    (tmp_path / "sentences.csv").write_text(SENTENCES)
    params |= {
        "sentences": {"dictionary": str(folder), "csv": str(tmp_path / "sentences.csv"), "batch_size": 4},
        "interpretation": {"dictionary": str(folder), "tokens": 400, "top_n": 3, "batch_size": 4, "latents": "first:3"},
        "analysis": {"dictionary": str(folder), "tokens": 400, "batch_size": 4},
    }
    for script, extra in (
        ("get_sparse_rep.py", ()),
        ("interpretation.py", ()),
        ("analyze.py", ("run",)),
        ("evaluate.py", ("--dictionary", str(folder))),
    ):
        result = run(script, params, tmp_path, *extra)
        assert result.returncode == 0, f"{script}: {result.stderr}"
    assert (folder / "interpretation" / "latents.html").is_file()
    assert (folder / "analysis" / "features.sqlite").is_file()
