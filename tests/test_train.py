"""The training loop: schedule, dead latents, exact kill-and-resume, divergence, and the run folder."""

from __future__ import annotations

import pytest
import torch

from dictlearn.activations.buffer import ShuffledBuffer
from dictlearn.activations.harvest import ActivationChunk
from dictlearn.errors import UserError
from dictlearn.formats.run_folder import (
    check_dictionary_matches,
    dictionary_config,
    load_dictionary,
    save_dictionary,
)
from dictlearn.lm.models import HookPoint
from dictlearn.params import Params
from dictlearn.sae.base import SparseCodes
from dictlearn.sae.registry import default_lr
from dictlearn.sae.topk import TopKObjective, TopKSAE
from dictlearn.training.step import GradientRule
from dictlearn.training.trainer import DIVERGED_STEPS, DeadLatentTracker, Schedule, Trainer, left_the_basin

D, F, K = 16, 64, 4


def synthetic_source(total_rows: int = 4096, chunk_rows: int = 256, poison: bool = False):
    """Sparse sums of fixed directions, restartable at any chunk; ``poison`` puts an inf in chunk 3."""
    directions = torch.nn.functional.normalize(torch.randn(48, D, generator=torch.Generator().manual_seed(7)), dim=-1)

    def source(start: int):
        for index in range(start, total_rows // chunk_rows):
            g = torch.Generator().manual_seed(100 + index)
            codes = torch.rand(chunk_rows, 48, generator=g) * (torch.rand(chunk_rows, 48, generator=g) < 0.08)
            acts = codes @ directions
            if poison and index == 3:
                acts[0, 0] = float("inf")
            yield ActivationChunk(acts, torch.zeros(chunk_rows, dtype=torch.long))

    return source


def make_params(**train) -> Params:
    return Params().with_overrides(
        sae={"num_latents": F, "k": K, "aux_k": 8, "dead_tokens": 512},
        buffer={"size_tokens": 1024, "batch_size": 128, "refill_fraction": 0.5},
        train={"tokens": 4096, "checkpoint_every": 5, "log_every": 2, "warmup_fraction": 0.1, **train},
    )


def make_trainer(params: Params, folder, poison: bool = False) -> Trainer:
    torch.manual_seed(params.train.seed)
    sae = TopKSAE(D, F, K)
    buffer = ShuffledBuffer(synthetic_source(poison=poison), d_in=D, size=1024, batch_size=128, seed=params.train.seed)
    return Trainer(sae, TopKObjective(8, 1 / 32), buffer, params, folder, lr=1e-3)


class Killed(Exception):
    pass


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    params = make_params()
    straight = make_trainer(params, tmp_path / "straight")
    straight.sae.init_b_dec_(straight.buffer.peek(512))
    straight.fit()

    first = make_trainer(params, tmp_path / "killed")
    first.sae.init_b_dec_(first.buffer.peek(512))

    def kill_at_13(trainer, record):
        if trainer.step == 13:  # two steps after the checkpoint at step 10
            raise Killed

    with pytest.raises(Killed):
        first.fit(on_step=kill_at_13)
    resumed = make_trainer(params, tmp_path / "killed")
    resumed.load_checkpoint()
    assert resumed.step == 10
    resumed.fit()
    assert resumed.step == straight.step == 32
    for name, value in straight.sae.state_dict().items():
        torch.testing.assert_close(resumed.sae.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert resumed.metrics == straight.metrics


def test_resume_with_changed_params_is_refused(tmp_path):
    trainer = make_trainer(make_params(), tmp_path)
    trainer.save_checkpoint()
    changed = make_trainer(make_params(tokens=8192), tmp_path)
    with pytest.raises(
        UserError, match=r"--resume: params changed since the checkpoint \(train.tokens: 4096 -> 8192\)"
    ):
        changed.load_checkpoint()


def test_resume_with_a_lower_lr_is_allowed_with_a_note(tmp_path):
    trainer = make_trainer(make_params(), tmp_path)
    trainer.save_checkpoint()
    notes = make_trainer(make_params(lr=1e-5), tmp_path).load_checkpoint()
    assert notes == ["note: resuming with train.lr: None -> 1e-05"]


def test_resume_before_the_first_checkpoint_says_how_far_the_run_got(tmp_path):
    first = make_trainer(make_params(checkpoint_every=50), tmp_path)

    def kill_at_7(trainer, record):
        if trainer.step == 7:
            raise Killed

    with pytest.raises(Killed):
        first.fit(on_step=kill_at_7)
    assert not first.checkpoint_path.exists()
    message = make_trainer(make_params(checkpoint_every=50), tmp_path).progress_without_checkpoint()
    assert message == (
        f"note: nothing to resume in {tmp_path}: the run got to step 6 of 32 before its first checkpoint "
        "(every 50 steps); starting over"
    )


def test_a_finite_blow_up_stops_before_anything_is_saved(tmp_path):
    """lr 1000 sends the FVU to astronomical but finite values: caught after DIVERGED_STEPS steps above 10."""
    trainer = make_trainer(make_params(checkpoint_every=2, warmup_fraction=0.0), tmp_path)
    trainer.lr = 1000.0
    trainer.sae.init_b_dec_(trainer.buffer.peek(512))
    with pytest.raises(
        UserError,
        match=r"training diverged at step \d+: FVU .* \(above 10 and 10x the best so far since step \d+, and not "
        r"halving over the last 10 steps\); no ae.pt",
    ) as err:
        trainer.fit()
    assert "lower train.lr and run again with --" in str(err.value)
    # No checkpoint is written once the FVU has blown up: the last one predates the first bad step.
    assert trainer.last_checkpoint_step is None or trainer.last_checkpoint_step <= trainer.step - trainer.bad_steps


def test_a_blown_up_fvu_that_keeps_halving_is_a_recovery_not_a_divergence():
    # The FVU after Bricken et al.'s resampling of 404 latents at once (SmolLM2-135M, 16x, L1 2), step by step.
    recovering = [305.0, 285.3, 214.8, 172.1, 147.0, 109.5, 83.2, 62.0, 37.0, 28.4, 18.4, 11.3]
    assert not any(left_the_basin(recovering[: n + 1]) for n in range(len(recovering)))
    flat = [1e14] * DIVERGED_STEPS
    assert left_the_basin(flat) and not left_the_basin(flat[:-1])
    assert left_the_basin([50.0] * (DIVERGED_STEPS - 1) + [float("nan")])
    assert left_the_basin([100.0 * 0.95**step for step in range(DIVERGED_STEPS)])  # 37% down: not a recovery


def test_divergence_stops_with_the_last_good_checkpoint(tmp_path):
    trainer = make_trainer(make_params(checkpoint_every=2), tmp_path, poison=True)
    with pytest.raises(
        UserError,
        match=r"training diverged at step \d+: loss (nan|inf); no ae.pt was written; the last good checkpoint is step",
    ):
        trainer.fit()
    good = torch.load(trainer.checkpoint_path, weights_only=False)
    assert all(torch.isfinite(v).all() for v in good["sae"].values())


def test_schedule_warms_up_and_decays_to_zero():
    schedule = Schedule(total_steps=100, warmup_steps=10, decay_start=80)
    assert schedule.factor(0) == pytest.approx(0.1) and schedule.factor(9) == 1.0
    assert schedule.factor(50) == 1.0 and schedule.factor(90) == pytest.approx(0.5) and schedule.factor(100) == 0.0


def test_default_lr_scales_with_inverse_sqrt_latents():
    assert default_lr(2**14) == pytest.approx(2e-4) and default_lr(2**16) == pytest.approx(1e-4)


def test_dead_latent_tracker_counts_tokens_since_firing():
    tracker = DeadLatentTracker(num_latents=4, dead_tokens=5)
    tracker.update(SparseCodes(torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.tensor([[0, 1], [0, 2]]), None))
    assert tracker.tokens_since_fired_F.tolist() == [0, 0, 2, 2]  # latent 2 was chosen with value 0: not fired
    tracker.update(SparseCodes(torch.ones(3, 2), torch.tensor([[0, 1]] * 3), None))
    assert tracker.dead_mask().tolist() == [False, False, True, True]


def test_dictionary_folder_round_trip_and_mismatch_messages(tmp_path):
    params = make_params()
    sae = TopKSAE(D, F, K)
    hook = HookPoint("blocks.1.hook_resid_post", 1, "hook_resid_post", "model.layers.1", "output")
    config = dictionary_config(params, sae, hook=hook, lr=1e-3, steps=10, warmup_steps=1, decay_start=8, device="cpu")
    save_dictionary(tmp_path, sae, config)
    loaded, loaded_config = load_dictionary(tmp_path)
    x = torch.randn(5, D)
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat)
    assert loaded_config["trainer"]["dict_class"] == "AutoEncoderTopK" and loaded_config["buffer"]["d_submodule"] == D
    assert set(torch.load(tmp_path / "ae.pt")) == {
        "encoder.weight",
        "encoder.bias",
        "decoder.weight",
        "b_dec",
        "k",
        "threshold",
    }
    check_dictionary_matches(config, sae, model_name="smollm2-135m", hook_name=hook.name, d_in=D)
    with pytest.raises(UserError, match=r"dictionary width 16 does not match the activation width 32 at blocks.1"):
        check_dictionary_matches(config, sae, model_name="smollm2-135m", hook_name=hook.name, d_in=32)
    with pytest.raises(UserError, match=r"trained at hook 'blocks.1.hook_resid_post', not 'blocks.2.hook_mlp_out'"):
        check_dictionary_matches(config, sae, model_name="smollm2-135m", hook_name="blocks.2.hook_mlp_out", d_in=D)
    with pytest.raises(UserError, match=r"trained on model 'smollm2-135m', not 'gpt2'; set model.name"):
        check_dictionary_matches(config, sae, model_name="gpt2", hook_name=hook.name, d_in=D)
    with pytest.raises(UserError, match=r"no dictionary at .*ae.pt is missing"):
        load_dictionary(tmp_path / "nothing")


def _with_grads(*grads):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params


def test_unit_gradient_rule_rescales_every_step_to_norm_one():
    rule = GradientRule("unit")
    for scale in (0.02, 0.84, 300.0):
        params = _with_grads(scale * torch.randn(7, 3), scale * torch.randn(5))
        direction = torch.cat([p.grad.flatten() for p in params])
        rule.apply_(params)
        after = torch.cat([p.grad.flatten() for p in params])
        assert torch.allclose(after.norm(), torch.tensor(1.0))
        assert torch.allclose(after, direction / direction.norm())


def test_running_gradient_rule_clips_to_the_running_norm_and_resumes():
    rule = GradientRule("running")
    norms = []
    for scale in (1.0, 4.0, 0.5):
        params = _with_grads(torch.full((4,), scale / 2))  # norm = scale
        rule.apply_(params)
        norms.append(float(params[0].grad.norm()))
    # The first step sets the average; a spike is cut to it; a smaller gradient passes unchanged.
    assert norms == pytest.approx([1.0, 1.0, 0.5])
    restored = GradientRule("running")
    restored.load_state_dict(rule.state_dict())
    assert restored.running_norm == pytest.approx(0.95)


def test_a_run_folder_with_another_runs_results_is_refused_unless_resume_or_overwrite(tmp_path):
    from dictlearn.formats.run_folder import claim_run_folder

    (tmp_path / "ae.pt").write_bytes(b"finished")
    (tmp_path / "eval.json").write_text("{}")
    with pytest.raises(UserError, match=r"already holds a trained dictionary; evaluate.py --dictionary .* --overwrite"):
        claim_run_folder(tmp_path, resume=False, overwrite=False)
    with pytest.raises(UserError, match=r"already holds a trained dictionary"):
        claim_run_folder(tmp_path, resume=True, overwrite=False)  # a finished run has nothing to resume
    (tmp_path / "notes.txt").write_text("mine")
    claim_run_folder(tmp_path, resume=False, overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]  # only the run's own files go

    (tmp_path / "checkpoint.pt").write_bytes(b"unfinished")
    with pytest.raises(UserError, match=r"holds the checkpoint of an unfinished run; --resume continues it"):
        claim_run_folder(tmp_path, resume=False, overwrite=False)
    claim_run_folder(tmp_path, resume=True, overwrite=False)


def test_a_second_training_on_a_locked_run_folder_is_refused_naming_the_holder(tmp_path):
    import subprocess
    import sys

    from dictlearn.locks import output_lock

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from dictlearn.locks import output_lock\n"
            f"with output_lock({str(tmp_path / 'run')!r}, 'run folder'):\n"
            "    print('held', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(UserError, match=rf"run folder .*run is in use by process {holder.pid}"),
            output_lock(tmp_path / "run", "run folder"),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with output_lock(tmp_path / "run", "run folder"):  # the killed holder's lock is taken over
        pass
