"""Many SAEs from one forward: a sweep equals separate runs and resumes exactly, a killed harvest continues
bit for bit, and a transcoder trains end to end (tiny Llama checkpoint, CPU)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from dictlearn.activations.harvest import LiveActivations
from dictlearn.activations.source import training_buffers
from dictlearn.activations.store import ActivationStore, StoreWriter, write_stores
from dictlearn.errors import UserError
from dictlearn.formats.run_folder import load_dictionary
from dictlearn.lm.models import hook_width, load_language_model, resolve_hook, resolve_hooks
from dictlearn.lm.text import training_windows
from dictlearn.params import parse_params
from dictlearn.training.runs import evaluation_groups, plan_runs, set_up, start_in_step, train_in_step
from tests.test_scripts import run as run_script
from tests.test_scripts import tiny_params

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
VARIANTS = [{"sae": {"k": 2}}, {"sae": {"k": 4}, "lr": 2e-3}, {"sae": {"num_latents": 64}}]


def sweep_params(model, corpus, tmp_path, **train):
    data = tiny_params(model, corpus, tmp_path, tokens=2048, checkpoint_every=3, **train)
    data["buffer"] = {"size_tokens": 512, "batch_size": 128, "model_batch_size": 8}
    data["hook"] = HOOKS
    data["sweep"] = {"name": "ks", "variants": VARIANTS}
    return parse_params(data)


class Killed(Exception):
    pass


def sweep(params, lm, tmp_path, *, resume=False, kill_at=None):
    runs = plan_runs(params, lm.config, "model", resolve_hooks(lm.config, params.hook), "params")
    groups = [run.hooks for run in runs[:: len(VARIANTS)]]
    buffers = training_buffers(params, lm, groups)
    buffer_of = [index // len(VARIANTS) for index in range(len(runs))]
    trainings = [set_up(run, lm, buffers[i]) for run, i in zip(runs, buffer_of, strict=True)]
    for run in runs:
        run.folder.mkdir(parents=True, exist_ok=True)
    (tmp_path / "sweep").mkdir(exist_ok=True)
    start_in_step(trainings, buffers, tmp_path / "sweep", resume)

    def on_step(training, record):
        if kill_at is not None and record["step"] == kill_at:
            raise Killed

    train_in_step(trainings, buffers, buffer_of, tmp_path / "sweep", on_step)
    return trainings


def test_a_sweep_trains_each_variant_at_each_hook_as_separate_runs_would(tmp_path, tiny_checkpoint_with_text):
    model, corpus = tiny_checkpoint_with_text
    params = sweep_params(model, corpus, tmp_path)
    lm = load_language_model(params.model)
    trainings = sweep(params, lm, tmp_path)
    assert [t.run.folder.relative_to(tmp_path / "dicts" / "model").as_posix() for t in trainings] == [
        f"{hook}/{name}" for hook in HOOKS for name in ("128_k2", "128_k4", "64_k4")
    ]
    assert trainings[1].trainer.lr == 2e-3 and trainings[2].sae.num_latents == 64
    for training in trainings:
        alone_params = training.run.params
        assert alone_params.hook in HOOKS and alone_params.sweep is None
        buffer = training_buffers(alone_params, lm, [training.run.hooks])[0]
        alone = set_up(training.run, lm, buffer)
        alone.trainer.folder = tmp_path / "alone"
        alone.trainer.folder.mkdir(exist_ok=True)
        alone.trainer.initialize()
        alone.trainer.fit()
        assert alone.trainer.step == training.trainer.step == 16
        for key, value in alone.sae.state_dict().items():
            torch.testing.assert_close(training.sae.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_a_killed_sweep_resumes_to_the_uninterrupted_weights(tmp_path, tiny_checkpoint_with_text):
    model, corpus = tiny_checkpoint_with_text
    straight = sweep(
        sweep_params(model, corpus, tmp_path / "a"),
        load_language_model(sweep_params(model, corpus, tmp_path).model),
        tmp_path / "a",
    )
    params = sweep_params(model, corpus, tmp_path / "b")
    lm = load_language_model(params.model)
    with pytest.raises(Killed):
        sweep(params, lm, tmp_path / "b", kill_at=8)  # last checkpoint at step 6
    assert (tmp_path / "b" / "sweep" / "buffers.pt").is_file()
    resumed = sweep(params, lm, tmp_path / "b", resume=True)
    for a, b in zip(straight, resumed, strict=True):
        for key, value in a.sae.state_dict().items():
            torch.testing.assert_close(b.sae.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_two_variants_writing_one_folder_are_refused(tmp_path, tiny_checkpoint_with_text):
    model, corpus = tiny_checkpoint_with_text
    params = sweep_params(model, corpus, tmp_path).with_overrides(
        sweep={"variants": [{"sae": {"k": 4}}, {"sae": {"k": 4}, "lr": 1e-3}]}
    )
    lm_config = load_language_model(params.model).config
    with pytest.raises(UserError, match=r"^sweep: 2 variants write the run folder .*128_k4; give them"):
        plan_runs(params, lm_config, "model", resolve_hooks(lm_config, params.hook), "params")
    bad = params.with_overrides(sweep={"variants": [{"sae": {"kk": 4}}]})
    with pytest.raises(UserError, match=r"^p.json: sweep.variants\[0\]: 'sae.kk' is not a setting of a 'topk' SAE"):
        plan_runs(bad, lm_config, "model", resolve_hooks(lm_config, params.hook), "p.json")


def harvest(params, lm, out, hooks, stop_after=None, batches_run=None):
    live = LiveActivations(lm, hooks, lambda: training_windows(params.data, lm.tokenizer), 4)

    def chunk_sets(start):
        for index, chunk_set in enumerate(live.iter_chunk_sets(start), start=start):
            if stop_after is not None and index == stop_after:
                raise Killed
            if batches_run is not None:
                batches_run.append(index)
            yield chunk_set

    writers = {
        hook.name: StoreWriter(out / hook.name, {"d_in": hook_width(lm.config, hook)}, 100, resume=True)
        for hook in hooks
    }
    return write_stores(chunk_sets, writers, 1000)


def test_a_killed_harvest_continues_to_the_uninterrupted_store(tmp_path, tiny_checkpoint_with_text):
    model, corpus = tiny_checkpoint_with_text
    params = parse_params(tiny_params(model, corpus, tmp_path))
    lm = load_language_model(params.model)
    hooks = resolve_hooks(lm.config, HOOKS)
    straight = harvest(params, lm, tmp_path / "straight", hooks)
    with pytest.raises(Killed):
        harvest(params, lm, tmp_path / "killed", hooks, stop_after=9)  # 9 batches of 60 rows: 5 shards of 100
    partial = tmp_path / "killed" / f"{HOOKS[0]}.partial"
    written = {p.name: p.stat().st_mtime_ns for p in partial.glob("shard_*")}
    assert sorted(written) == [f"shard_{i:05d}.safetensors" for i in range(5)]
    batches_run = []
    resumed = harvest(params, lm, tmp_path / "killed", hooks, batches_run=batches_run)
    assert batches_run[0] == 8  # shard 4 ends at row 20 of batch 8: no earlier batch runs again
    assert resumed == straight
    for hook in HOOKS:
        a, b = ActivationStore(tmp_path / "straight" / hook), ActivationStore(tmp_path / "killed" / hook)
        assert a.meta == b.meta and len(a) == 1000
        for shard in a.meta["shards"]:
            assert (a.path / shard["file"]).read_bytes() == (b.path / shard["file"]).read_bytes(), shard["file"]
    kept = tmp_path / "killed" / HOOKS[0]
    assert {name: (kept / name).stat().st_mtime_ns for name in written} == written


def test_a_killed_hook_between_two_hooks_shards_rolls_back_to_the_common_shard(tmp_path, tiny_checkpoint_with_text):
    model, corpus = tiny_checkpoint_with_text
    params = parse_params(tiny_params(model, corpus, tmp_path))
    lm = load_language_model(params.model)
    hooks = resolve_hooks(lm.config, HOOKS)
    straight = harvest(params, lm, tmp_path / "straight", hooks)
    with pytest.raises(Killed):
        harvest(params, lm, tmp_path / "killed", hooks, stop_after=9)
    # As if the kill had landed after the first hook's shard 4 but before the second's.
    second = StoreWriter(tmp_path / "killed" / HOOKS[1], {"d_in": 32}, 100, resume=True)
    second.truncate(4)
    assert harvest(params, lm, tmp_path / "killed", hooks) == straight


def test_multi_hook_harvest_script_writes_a_store_per_hook(tmp_path, tiny_checkpoint_with_text):
    model, corpus = tiny_checkpoint_with_text
    params = tiny_params(model, corpus, tmp_path)
    params["hook"] = "blocks.{0,1}.hook_resid_post"
    params["store"]["path"] = str(tmp_path / "store" / "{hook}")
    done = run_script("get_activations.py", params, tmp_path)
    assert done.returncode == 0, done.stderr
    for layer in (0, 1):
        meta = json.loads((tmp_path / "store" / f"blocks.{layer}.hook_resid_post" / "meta.json").read_text())
        assert meta["tokens"] == 3000 and meta["shards"][0]["end"] == {"batch": 8, "row": 64}
    params["store"]["path"] = str(tmp_path / "store")
    refused = run_script("get_activations.py", params, tmp_path)
    assert (
        refused.returncode == 2 and "store.path: 2 hooks need a folder each; put {hook} in store.path" in refused.stderr
    )


def test_a_transcoder_trains_and_its_folder_round_trips(tmp_path, tiny_checkpoint_with_text):
    model, corpus = tiny_checkpoint_with_text
    params = tiny_params(model, corpus, tmp_path)
    # The tiny random model's MLP output is ~1000x smaller than the MLP's normalised input, which the TopK
    # recipe's unit-norm decoder cannot start from; the residual before and after the MLP are of one scale.
    params["hook"] = "blocks.1.hook_resid_mid"
    params["sae"] = {"expansion_factor": 4, "k": 4, "target_hook": "blocks.1.hook_resid_post", "skip_connection": True}
    trained = run_script("training_script.py", params, tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "transcoder" in trained.stdout and "blocks.1.hook_resid_mid -> blocks.1.hook_resid_post" in trained.stdout
    folder = tmp_path / "dicts" / "model" / "blocks.1.hook_resid_mid" / "transcoder_128_k4"
    sae, config = load_dictionary(folder)
    assert config["sae"]["target_hook"] == "blocks.1.hook_resid_post" and sae.d_in == sae.d_out == 32
    assert sae.W_skip is not None
    result = json.loads((folder / "eval.json").read_text())
    assert 0 <= result["fvu"] < 1 and 0 < result["l0"] <= 4 and "ce_loss_score" in result
    again = run_script("evaluate.py", params, tmp_path, "--dictionary", str(folder))
    assert again.returncode == 0, again.stderr
    assert json.loads((folder / "eval.json").read_text())["fvu"] < 1


def test_a_sweeps_runs_share_one_evaluation_pass_with_the_figures_each_gets_alone(tmp_path, tiny_checkpoint_with_text):
    from dictlearn.evaluation.evaluate import evaluate_dictionary

    model, corpus = tiny_checkpoint_with_text
    data = tiny_params(model, corpus, tmp_path, tokens=1024)
    data["sweep"] = {"name": "ks", "variants": [{"sae": {"k": 2}}, {"sae": {"k": 4}}]}
    trained = run_script("training_script.py", data, tmp_path)
    assert trained.returncode == 0, trained.stderr
    params = parse_params({key: value for key, value in data.items() if key != "sweep"})
    lm = load_language_model(params.model)
    hook = resolve_hook(lm.config, data["hook"])
    runs = plan_runs(parse_params(data), lm.config, "model", [hook], "params")
    assert [len(group) for group in evaluation_groups([SimpleNamespace(run=run) for run in runs])] == [2]
    for name in ("128_k2", "128_k4"):
        folder = tmp_path / "dicts" / "model" / hook.name / name
        sae, _config = load_dictionary(folder)
        alone = evaluate_dictionary(lm, hook, sae, params)
        saved = json.loads((folder / "eval.json").read_text())
        for key in ("fvu", "l0", "ce_loss_score", "kl_div_score", "tokens", "lm_loss_tokens"):
            assert saved[key] == pytest.approx(alone[key], rel=1e-5), (name, key)
