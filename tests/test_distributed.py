"""Data-parallel training over 2 gloo processes (CPU, one thread each): the ranks stay identical after every step,
a batch split over ranks steps as one process does on the whole batch, a stopped run resumes exactly, and the
FVU matches a one-process run; torchrun runs training_script.py end to end."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dictlearn.activations.harvest import ActivationChunk, LiveActivations, Part
from dictlearn.activations.source import training_buffers
from dictlearn.activations.store import ActivationStore, StoreWriter, write_store
from dictlearn.errors import UserError
from dictlearn.lm.models import load_language_model, resolve_hooks
from dictlearn.lm.text import training_windows
from dictlearn.params import parse_params
from dictlearn.sae.base import StepContext
from dictlearn.sae.batchtopk import update_threshold_
from dictlearn.sae.losses import fvu
from dictlearn.sae.topk import TopKObjective, TopKSAE, row_min_mean
from dictlearn.training.distributed import Distributed
from dictlearn.training.runs import plan_runs, set_up
from dictlearn.training.step import GradientRule, train_step
from dictlearn.training.trainer import adam
from tests.test_scripts import REPO, tiny_params

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(rank: int, port: int, worker, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    torch.set_num_threads(1)
    distributed = Distributed.from_env("cpu")
    try:
        worker(distributed, *args)
    finally:
        distributed.close()


def spawn(worker, *args) -> None:
    """Run ``worker(distributed, *args)`` in 2 gloo processes; an exception in either fails the test."""
    mp.spawn(_rank_entry, args=(_free_port(), worker, args), nprocs=WORLD)


# --- one step on a split batch equals one step on the whole batch ---

D, F_LATENTS, K, ROWS = 16, 64, 4, 64


def _batch_and_sae():
    generator = torch.Generator().manual_seed(1)
    x_BD = torch.randn(ROWS, D, generator=generator) * torch.linspace(0.5, 3.0, D) + 2.0
    dead_F = torch.zeros(F_LATENTS, dtype=torch.bool)
    dead_F[::3] = True  # AuxK active: its residual-variance normaliser is reduced over ranks too
    return x_BD, dead_F, TopKSAE(D, F_LATENTS, K, seed=0)


def _one_step(sae, x_BD, dead_F, distributed=None):
    objective = TopKObjective(aux_k=8, aux_coef=1 / 32)
    optimizer = adam(sae, 1e-2)
    ctx = StepContext(0, 10, dead_F, distributed or Distributed())
    out = train_step(
        sae, objective, optimizer, x_BD, x_BD, ctx, max_grad_norm=1.0, gradient_rule=GradientRule("unit"),
        distributed=distributed,
    )  # fmt: skip
    return out, optimizer


def _split_step_worker(distributed: Distributed, out_dir) -> None:
    x_BD, dead_F, sae = _batch_and_sae()
    share = ROWS // distributed.world_size
    mine_BD = x_BD[distributed.rank * share : (distributed.rank + 1) * share]
    out, optimizer = _one_step(sae, mine_BD, dead_F, distributed)
    terms = torch.tensor([out.loss, *out.terms.values()], dtype=torch.float64)
    distributed.average_([terms])
    # The running thresholds from this rank's codes, reduced over ranks.
    topk_threshold, batch_threshold = torch.tensor(-1.0), torch.tensor(-1.0)
    estimate = row_min_mean(out.codes.values, distributed)
    update_threshold_(batch_threshold, out.codes.values, 0.9, distributed)
    topk_threshold.copy_(estimate)
    torch.save(
        {
            "sae": sae.state_dict(),
            "adam": optimizer.state_dict()["state"],
            "terms": terms,
            "values": out.codes.values,
            "thresholds": (topk_threshold, batch_threshold),
        },
        out_dir / f"rank{distributed.rank}.pt",
    )


def test_one_step_on_a_batch_split_over_two_ranks_equals_one_process_on_the_whole_batch(tmp_path):
    spawn(_split_step_worker, tmp_path)
    x_BD, dead_F, sae = _batch_and_sae()
    out, optimizer = _one_step(sae, x_BD, dead_F)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    # Every rank holds bitwise the same weights and Adam state.
    for key in ranks[0]["sae"]:
        assert torch.equal(ranks[0]["sae"][key], ranks[1]["sae"][key]), key
    # One process on the whole batch: the same up to float32 rounding. The gradient is a sum over 64 rows added
    # in another order (two halves, then the all-reduce) and the FVU and AuxK normalisers are reduced from
    # per-rank sums, so the weights may differ by an ulp or so: measured at most 1.5e-8 on weights up to 0.72
    # (one float32 ulp there is 6e-8), against a step of lr 1e-2. The bound: 1e-6 relative plus 5e-8.
    for key, value in sae.state_dict().items():
        torch.testing.assert_close(ranks[0]["sae"][key], value, rtol=1e-6, atol=5e-8, msg=key)
    for param, state in optimizer.state_dict()["state"].items():
        torch.testing.assert_close(ranks[0]["adam"][param]["exp_avg"], state["exp_avg"], rtol=1e-4, atol=1e-9)
    # The loss terms averaged over ranks are the whole batch's FVU and AuxK (not the mean of per-half FVUs).
    whole = torch.tensor([out.loss, *out.terms.values()], dtype=torch.float64)
    torch.testing.assert_close(ranks[0]["terms"], whole, rtol=1e-6, atol=0)
    assert out.terms["auxk_loss"] > 0
    # Thresholds: the mean of row minima and the smallest kept value over the global batch, on every rank.
    values = torch.cat([rank["values"] for rank in ranks])
    assert ranks[0]["thresholds"] == ranks[1]["thresholds"]
    torch.testing.assert_close(ranks[0]["thresholds"][0], row_min_mean(values), rtol=1e-6, atol=0)
    assert ranks[0]["thresholds"][1] == values[values > 0].min()


# --- the pipeline: live activations of a tiny Llama, 2 ranks ---


def _params(model, corpus, out_dir, lr=None, **sae):
    data = tiny_params(model, corpus, out_dir, tokens=6144, checkpoint_every=2, log_every=1, seed=0, lr=lr)
    data["buffer"] = {"size_tokens": 1024, "batch_size": 128, "model_batch_size": 8}
    data["sae"] = {"expansion_factor": 4, **(sae or {"k": 4})}
    return parse_params(data)


class Stopped(Exception):
    pass


def _digest(trainer) -> str:
    """A hash of everything that must agree across ranks: weights, buffers, Adam state, counters, input scale."""
    digest = hashlib.sha256()
    tensors = list(trainer.sae.state_dict().values()) + [trainer.tracker.tokens_since_fired_F]
    for state in trainer.optimizer.state_dict()["state"].values():
        tensors += [state[key] for key in sorted(state)]
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(repr(trainer.input_scale).encode())
    return digest.hexdigest()


def _train(distributed, params, lm, folder, *, resume=False, stop_at=None, digests=None):
    run = plan_runs(params, lm.config, "model", resolve_hooks(lm.config, params.hook), "params")[0]
    run = dataclasses.replace(run, folder=folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = training_buffers(params, lm, [run.hooks], distributed.part)[0]
    training = set_up(run, lm, buffer, distributed=distributed)
    if resume:
        training.trainer.load_checkpoint()
    else:
        training.trainer.initialize()
        if digests is not None:
            digests.append(_digest(training.trainer))

    def on_step(trainer, record):
        if digests is not None:
            digests.append(_digest(trainer))
        if trainer.step == stop_at:
            raise Stopped

    with contextlib.suppress(Stopped):
        training.trainer.fit(on_step)
    return training


def _pipeline_worker(distributed: Distributed, model, corpus, out_dir) -> None:
    torch.manual_seed(0)
    lm = load_language_model(_params(model, corpus, out_dir).model)
    result = {}
    # A strong penalty at a high learning rate kills ReLU latents within a few steps, so resampling has work.
    relu = {
        "architecture": "relu",
        "resample_every": 5,
        "resample_rows": 256,
        "dead_tokens": 256,
        "l1_coefficient": 100.0,
    }
    batchtopk = {"architecture": "batchtopk", "k": 4, "threshold_start_fraction": 0.0}  # threshold from step 0
    for name, lr, sae in [("topk", None, {}), ("relu", 0.03, relu), ("batchtopk", None, batchtopk)]:
        params = _params(model, corpus, out_dir, lr, **sae)
        digests: list[str] = []
        whole = _train(distributed, params, lm, out_dir / name / "whole", digests=digests)
        result[name] = {"digests": digests, "steps": whole.trainer.step, "sae": whole.sae.state_dict()}
        if name == "batchtopk":
            continue
        if name == "relu":
            result[name]["resampled"] = [r.get("resampled") for r in whole.trainer.metrics if "resampled" in r]
            continue
        result[name]["metrics"] = whole.trainer.metrics
        _train(distributed, params, lm, out_dir / name / "stopped", stop_at=3)
        resumed = _train(distributed, params, lm, out_dir / name / "stopped", resume=True)
        result[name]["resumed"] = resumed.sae.state_dict()
    torch.save(result, out_dir / f"rank{distributed.rank}.pt")


def _held_out_fvu(lm, params, sae) -> float:
    hook = resolve_hooks(lm.config, params.hook)[0]
    live = LiveActivations(lm, hook, lambda: training_windows(params.data, lm.tokenizer), 32)
    x_BD = next(live.iter_chunks(0)).acts
    with torch.no_grad():
        return float(fvu(x_BD, sae(x_BD).x_hat))


def test_two_ranks_agree_every_step_resume_exactly_and_reach_one_process_fvu(tmp_path, tiny_checkpoint_with_text):
    model, corpus = tiny_checkpoint_with_text
    spawn(_pipeline_worker, model, corpus, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    for name in ("topk", "relu", "batchtopk"):
        # (1) Every rank holds the same weights, Adam state, counters (and BatchTopK's running threshold, in the
        # SAE's state) after initialisation and every step.
        assert len(ranks[0][name]["digests"]) == ranks[0][name]["steps"] + 1 > 10
        assert ranks[0][name]["digests"] == ranks[1][name]["digests"], name
    # Resampling ran (rank 0's draw, broadcast) and every rank still agreed afterwards (checked above).
    assert max(ranks[0]["relu"]["resampled"]) > 0
    assert ranks[0]["batchtopk"]["sae"]["threshold"] > 0
    # (3) Stopped after its step-2 checkpoint at step 3 and resumed: bitwise the uninterrupted 2-process run.
    for key, value in ranks[0]["topk"]["sae"].items():
        for rank in ranks:
            torch.testing.assert_close(rank["topk"]["resumed"][key], value, rtol=0, atol=0, msg=key)
    # Rank 0 alone wrote the run folder's metrics: one line per step, tokens counted over both ranks.
    lines = (tmp_path / "topk" / "whole" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, ranks[0]["topk"]["steps"] + 1))
    assert json.loads(lines[-1])["tokens"] == 128 * ranks[0]["topk"]["steps"]
    # (4) One process on the same tokens (the same global batch size and step count) reaches the same FVU.
    torch.set_num_threads(1)
    params = _params(model, corpus, tmp_path)
    lm = load_language_model(params.model)
    alone = _train(Distributed(), params, lm, tmp_path / "alone")
    assert alone.trainer.step == ranks[0]["topk"]["steps"]
    two = TopKSAE(**alone.sae.config())
    two.load_state_dict(ranks[0]["topk"]["sae"])
    fvu_alone, fvu_two = _held_out_fvu(lm, params, alone.sae), _held_out_fvu(lm, params, two)
    assert abs(fvu_two - fvu_alone) <= 0.02 * fvu_alone, (fvu_two, fvu_alone)


# --- each rank's part of the data ---


def test_ranks_read_disjoint_parts_and_live_ranks_run_the_model_only_on_their_batches(
    tmp_path, tiny_checkpoint_with_text, monkeypatch
):
    writer = StoreWriter(tmp_path / "store", {"d_in": 1}, shard_tokens=10)
    rows = torch.arange(95)
    write_store(lambda start: iter([ActivationChunk(rows[:, None].float(), rows)][start:]), writer, max_tokens=95)
    store = ActivationStore(tmp_path / "store")
    shards = [chunk.token_ids[0].item() // 10 for chunk in store.iter_chunks(0, Part(1, 3))]
    assert shards == [1, 4, 7] and [c.token_ids[0].item() // 10 for c in store.iter_chunks(1, Part(1, 3))] == [4, 7]
    model, corpus = tiny_checkpoint_with_text
    params = _params(model, corpus, tmp_path)
    lm = load_language_model(params.model)
    live = LiveActivations(
        lm, resolve_hooks(lm.config, params.hook), lambda: training_windows(params.data, lm.tokenizer), 4
    )
    whole = [chunk_set for _, chunk_set in zip(range(7), live.iter_chunk_sets(0), strict=False)]
    forwards = []
    run_batch = live.chunk_set_of
    monkeypatch.setattr(live, "chunk_set_of", lambda input_ids: forwards.append(1) or run_batch(input_ids))
    part = [chunk_set for _, chunk_set in zip(range(2), live.iter_chunk_sets(1, Part(1, 2)), strict=False)]
    assert len(forwards) == 2  # batches 3 and 5 of rank 1 of 2, from its batch 1 on: no forward for the others
    for mine, batch in zip(part, (3, 5), strict=True):
        for name, chunk in mine.items():
            torch.testing.assert_close(chunk.acts, whole[batch][name].acts, rtol=0, atol=0)


# --- one-line refusals (no process group needed) ---


def test_a_batch_that_does_not_split_evenly_over_the_ranks_is_refused(tmp_path, tiny_checkpoint_with_text):
    model, corpus = tiny_checkpoint_with_text
    params = _params(model, corpus, tmp_path)
    lm = load_language_model(params.model)
    hooks = resolve_hooks(lm.config, params.hook)
    with pytest.raises(UserError, match=r"^buffer.batch_size: 128 rows do not split evenly over 3 processes; use a"):
        training_buffers(params, lm, [hooks], Distributed(0, 3).part)


def test_resuming_with_another_number_of_processes_is_refused(tmp_path, tiny_checkpoint_with_text):
    model, corpus = tiny_checkpoint_with_text
    params = _params(model, corpus, tmp_path)
    lm = load_language_model(params.model)
    _train(Distributed(), params, lm, tmp_path / "run", stop_at=2)
    run = plan_runs(params, lm.config, "model", resolve_hooks(lm.config, params.hook), "params")[0]
    as_two = set_up(dataclasses.replace(run, folder=tmp_path / "run"), lm, None, distributed=Distributed(1, 2))
    with pytest.raises(UserError, match=r"was written by 1 process\(es\) and this run has 2; resume with torchrun "):
        as_two.trainer.load_checkpoint()


# --- torchrun, end to end ---


def torchrun(params: dict, tmp_path, *extra: str, script: str = "training_script.py") -> subprocess.CompletedProcess:
    (tmp_path / "params.json").write_text(json.dumps(params))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(REPO / script), "--params", str(tmp_path / "params.json"), *extra]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)


@pytest.mark.slow
def test_torchrun_trains_the_script_data_parallel(tmp_path, tiny_checkpoint_with_text):
    model, corpus = tiny_checkpoint_with_text
    params = tiny_params(model, corpus, tmp_path, tokens=2048, checkpoint_every=4)
    params["buffer"] = {"size_tokens": 1024, "batch_size": 128, "model_batch_size": 8}
    done = torchrun(params, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = next((tmp_path / "dicts").glob("*/blocks.1.hook_resid_post/*"))
    assert {"ae.pt", "config.json", "eval.json", "metrics.jsonl"} <= {path.name for path in folder.iterdir()}
    assert "2 processes, 64 rows each a step" in done.stdout and done.stdout.count("evaluation") == 1
    assert json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])["tokens"] == 2048


@pytest.mark.slow
def test_torchrun_places_whole_runs_on_processes_with_distribute_modules(tmp_path, tiny_checkpoint_with_text):
    model, corpus = tiny_checkpoint_with_text
    params = tiny_params(model, corpus, tmp_path, tokens=1024, checkpoint_every=4, distribute="modules")
    params["buffer"] = {"size_tokens": 1024, "batch_size": 128, "model_batch_size": 8}
    params["sweep"] = {"name": "ks", "variants": [{"sae": {"k": 2}}, {"sae": {"k": 4}}]}
    done = torchrun(params, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 runs over 2 processes" in done.stdout
    rows = json.loads(next((tmp_path / "dicts").glob("*/sweeps/ks/sweep.json")).read_text())
    assert [row["run"] for row in rows] == ["128_k2", "128_k4"]
    for row in rows:  # each rank trained its run on full batches of all the data
        metrics = (Path(row["folder"]) / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["tokens"] for line in metrics][-1] == 1024
    # A 'modules' sweep left by 3 processes is not resumed by 2.
    left = next((tmp_path / "dicts").glob("*/sweeps/ks")) / "rank0_of_3"
    left.mkdir()
    (left / "buffers.pt").write_bytes(b"")
    refused = torchrun(params, tmp_path, "--resume")
    assert refused.returncode != 0
    assert "placed on 3 processes and this run has 2; resume with torchrun --nproc_per_node 3" in refused.stderr
