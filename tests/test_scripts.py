"""The scripts end to end on a tiny checkpoint: harvest a store, train from it and live, kill and resume,
evaluate, and refuse a mismatched dictionary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import write_dictionary
from tests.test_params import assert_one_line_error

REPO = Path(__file__).resolve().parents[1]


def tiny_params(model: Path, corpus: Path, tmp_path: Path, **train) -> dict:
    return {
        "model": {"name": str(model), "device": "cpu"},
        "data": {"source": "files", "path": str(corpus), "context_size": 16},
        "hook": "blocks.1.hook_resid_post",
        "buffer": {"size_tokens": 2048, "batch_size": 256, "model_batch_size": 8},
        "store": {"path": str(tmp_path / "store"), "tokens": 3000, "shard_tokens": 1024},
        "sae": {"expansion_factor": 4, "k": 4},
        "train": {
            "tokens": 3000,
            "checkpoint_every": 2,
            "log_every": 1,
            "output_dir": str(tmp_path / "dicts"),
            **train,
        },
        "eval": {"tokens": 300, "lm_loss_windows": 4, "batch_size": 4},
    }


def run(script: str, params: dict, tmp_path: Path, *extra: str, **popen) -> subprocess.CompletedProcess:
    (tmp_path / "params.json").write_text(json.dumps(params))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO / script), "--params", str(tmp_path / "params.json"), *extra]
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


def test_harvest_then_train_from_the_store(tmp_path, tiny_checkpoint_with_text):
    model, corpus = tiny_checkpoint_with_text
    params = tiny_params(model, corpus, tmp_path, source="store")
    harvest = run("get_activations.py", params, tmp_path)
    assert harvest.returncode == 0, harvest.stderr
    meta = json.loads((tmp_path / "store" / "meta.json").read_text())
    assert meta["tokens"] == 3000 and meta["d_in"] == 32 and meta["hook"] == "blocks.1.hook_resid_post"
    assert "tokens/s" in harvest.stdout
    again = run("get_activations.py", params, tmp_path)
    assert again.returncode == 0 and "is up to date (3,000 tokens)" in again.stdout
    other_hook = {**params, "hook": "blocks.0.hook_resid_post"}
    refused = run("training_script.py", {**other_hook, "store": {**params["store"]}}, tmp_path)
    assert_one_line_error(
        refused, r"activation store .*store was harvested with other hook settings; run get_activations.py"
    )
    trained = run("training_script.py", params, tmp_path)
    assert trained.returncode == 0, trained.stderr
    folder = tmp_path / "dicts" / "model" / "blocks.1.hook_resid_post" / "128_k4"
    for name in ("ae.pt", "config.json", "metrics.jsonl", "eval.json", "loss.png", "sparsity.png", "density.png"):
        assert (folder / name).is_file(), name
    assert not (folder / "checkpoint.pt").exists()
    result = json.loads((folder / "eval.json").read_text())
    assert 0 <= result["fvu"] < 1.5 and 0 < result["l0"] <= 4 and "loss_recovered" in result
    assert "LM loss recovered" in trained.stdout

    again = run("evaluate.py", params, tmp_path, "--dictionary", str(folder))
    assert again.returncode == 0, again.stderr
    full = json.loads((folder / "eval.json").read_text())  # evaluate.py reads more held-out text than training's
    assert abs(full["fvu"] - result["fvu"]) < 0.1 and full["explained_variance"] <= 1 and "ce_loss_score" in full


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_checkpoint_with_text):
    model, corpus = tiny_checkpoint_with_text
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight_dir.mkdir(), killed_dir.mkdir()
    # Long enough (78 steps) that the kill lands mid-run, right after the first checkpoint.
    straight = run("training_script.py", tiny_params(model, corpus, straight_dir, tokens=20000), straight_dir)
    assert straight.returncode == 0, straight.stderr

    params = tiny_params(model, corpus, killed_dir, tokens=20000)
    (killed_dir / "params.json").write_text(json.dumps(params))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO / "training_script.py"), "--params", str(killed_dir / "params.json")]
    folder = killed_dir / "dicts" / "model" / "blocks.1.hook_resid_post" / "128_k4"
    process = subprocess.Popen(command, cwd=killed_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (folder / "checkpoint.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (folder / "checkpoint.pt").exists(), "the run finished before a checkpoint could be killed"
    resumed = run("training_script.py", params, killed_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    a = torch.load(folder / "ae.pt")
    b = torch.load(straight_dir / "dicts" / "model" / "blocks.1.hook_resid_post" / "128_k4" / "ae.pt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_dictionary_of_another_width_is_refused(tmp_path, tiny_checkpoint_with_text):
    from dictlearn.sae.topk import TopKSAE

    model, corpus = tiny_checkpoint_with_text
    folder = tmp_path / "wrong"
    folder.mkdir()
    write_dictionary(folder, TopKSAE(48, 96, 4), str(model), "blocks.1.hook_resid_post")
    result = run("evaluate.py", tiny_params(model, corpus, tmp_path), tmp_path, "--dictionary", str(folder))
    assert_one_line_error(result, r"dictionary .*wrong has width 48, but blocks.1.hook_resid_post of .* has width 32")


def test_comparing_dictionaries_gives_each_the_figures_it_gets_alone(tmp_path, tiny_checkpoint_with_text):
    """Dictionaries at one hook share evaluate.py's held-out pass; one at another hook gets its own."""
    from dictlearn.sae.topk import TopKSAE

    model, corpus = tiny_checkpoint_with_text
    folders = {}
    for name, sae, hook in (
        ("a", TopKSAE(32, 64, 4, seed=1), "blocks.1.hook_resid_post"),
        ("b", TopKSAE(32, 128, 8, seed=2), "blocks.1.hook_resid_post"),
        ("c", TopKSAE(32, 64, 4, seed=3), "blocks.0.hook_resid_post"),
    ):
        folders[name] = tmp_path / "dicts" / name
        folders[name].mkdir(parents=True)
        write_dictionary(folders[name], sae, str(model), hook)
    params = tiny_params(model, corpus, tmp_path)
    params["eval"].update(evaluate_tokens=600, evaluate_lm_loss_tokens=120, absorption_words=0)
    alone = {}
    for name, folder in folders.items():
        result = run("evaluate.py", params, tmp_path, "--dictionary", str(folder))
        assert result.returncode == 0, result.stderr
        alone[name] = json.loads((folder / "eval.json").read_text())
    compared = run(
        "evaluate.py", params, tmp_path, "--dictionary", str(tmp_path / "dicts"), "--out", str(tmp_path / "cmp")
    )
    assert compared.returncode == 0, compared.stderr
    assert compared.stdout.count("(one pass for 2 dictionaries)") == 2
    record = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert sorted(record) == sorted(str(folder) for folder in folders.values())
    for name, folder in folders.items():
        together = json.loads((folder / "eval.json").read_text())
        for key in ("fvu", "l0", "ce_loss_score", "kl_div_score", "tokens", "lm_loss_tokens"):
            assert together[key] == pytest.approx(alone[name][key], rel=1e-6), (name, key)
    assert alone["a"]["fvu"] != pytest.approx(alone["c"]["fvu"])  # the other hook's activations, not a's


def test_training_from_a_missing_store_says_what_to_run(tmp_path, tiny_checkpoint_with_text):
    model, corpus = tiny_checkpoint_with_text
    result = run("training_script.py", tiny_params(model, corpus, tmp_path, source="store"), tmp_path)
    assert_one_line_error(
        result, r"train.source is 'store' but there is no activation store at .*run get_activations.py first"
    )
    assert not (tmp_path / "dicts").exists()


def test_overwrite_repairs_a_broken_store_and_a_busy_store_is_refused(tmp_path, tiny_checkpoint_with_text):
    from dictlearn.locks import output_lock

    model, corpus = tiny_checkpoint_with_text
    params = tiny_params(model, corpus, tmp_path)
    params["store"] = {**params["store"], "tokens": 600, "shard_tokens": 256}
    store = tmp_path / "store"
    assert run("get_activations.py", params, tmp_path).returncode == 0
    (store / "meta.json").write_text("{broken")
    refused = run("get_activations.py", params, tmp_path)
    assert_one_line_error(refused, r"meta.json: activation store metadata is not valid JSON at line 1, column 2")
    repaired = run("get_activations.py", params, tmp_path, "--overwrite")
    assert repaired.returncode == 0, repaired.stderr
    (store / "shard_00001.safetensors").unlink()
    assert_one_line_error(
        run("get_activations.py", params, tmp_path),
        r"store is incomplete: missing shard_00001.safetensors; run get_activations.py --overwrite",
    )
    assert run("get_activations.py", params, tmp_path, "--overwrite").returncode == 0
    assert json.loads((store / "meta.json").read_text())["tokens"] == 600
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("store")) == ["store"]

    with output_lock(store, "activation store"):
        busy = run("get_activations.py", params, tmp_path, "--overwrite")
    assert_one_line_error(busy, rf"^error: activation store {store} is in use by process {os.getpid()} \(a running ")
    (tmp_path / "file").write_text("x")
    not_a_folder = run("get_activations.py", params, tmp_path, "--out", str(tmp_path / "file"))
    assert_one_line_error(not_a_folder, r"^error: activation store: .*/file is a file; name a folder$")


@pytest.mark.parametrize("tokens", ["-5", "0", "many"])
def test_a_token_count_that_is_not_positive_is_refused(tmp_path, tokens):
    result = run("get_activations.py", {}, tmp_path, "--tokens", tokens)
    assert_one_line_error(
        result, rf"^error: argument --tokens: expected a positive integer, found '{tokens}' \(see get_activations.py"
    )
