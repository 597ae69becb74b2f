"""Training runs as the params ask for them: one SAE at one hook, or every sweep variant at every hook, each
into its own run folder, all trained in step from buffers that one forward per model batch fills.

A run's params are those a separate run of that SAE would have (``run_params``), and every buffer has the same
size, batch size and seed, so a run in a sweep ends with the weights it would have had alone (on the CPU, same
thread count). Shared buffers are checkpointed once, in the sweep folder, beside the runs' own checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dictlearn.activations.buffer import ShuffledBuffer
from dictlearn.errors import UserError
from dictlearn.evaluation.evaluate import shared_pass_key
from dictlearn.files import read_torch, torch_save
from dictlearn.formats.detect import open_any
from dictlearn.formats.run_folder import check_dictionary_matches, dictionary_config, num_latents_of, run_folder
from dictlearn.lm.models import HookPoint, LanguageModel, hook_width, resolve_hook
from dictlearn.params import Params, run_params
from dictlearn.sae.base import SparseAutoencoder
from dictlearn.sae.registry import architecture, build_objective, build_sae
from dictlearn.training.distributed import Distributed
from dictlearn.training.trainer import Trainer, check_world_size

BUFFERS_FILE = "buffers.pt"  # the sweep's shared buffers at the runs' last checkpoint


@dataclass(frozen=True)
class Run:
    """One SAE to train: its own params, input hook, a transcoder's target hook, and its run folder."""

    params: Params
    hook: HookPoint
    target_hook: HookPoint | None
    folder: Path

    @property
    def hooks(self) -> tuple[HookPoint, ...]:
        """The hooks whose rows sit side by side in its buffer: ``[input | target]`` for a transcoder."""
        return (self.hook,) if self.target_hook is None else (self.hook, self.target_hook)


def plan_runs(params: Params, model_config, model_short_name: str, hooks: list[HookPoint], source: str) -> list[Run]:
    """Every (hook, variant) run; one run with the params as they are when there is one hook and no sweep."""
    variants = params.sweep.variants if params.sweep is not None else [None]
    runs = []
    for hook in hooks:
        for index, variant in enumerate(variants):
            if len(hooks) == 1 and variant is None:
                own = params
            else:
                where = f"{source}: sweep.variants[{index}]" if variant is not None else source
                own = run_params(params, hook.name, variant, where)
            target_name = getattr(own.sae, "target_hook", None)
            if target_name and len(hooks) > 1:
                raise UserError(
                    f"sae.target_hook: a transcoder reads one input hook, and hook names {len(hooks)}; "
                    "train transcoders one hook at a time"
                )
            target = resolve_hook(model_config, target_name) if target_name else None
            folder = run_folder(own, model_short_name, hook.name, hook_width(model_config, hook))
            runs.append(Run(own, hook, target, folder))
    folders = [run.folder for run in runs]
    for run in runs:
        if folders.count(run.folder) > 1:
            raise UserError(
                f"sweep: {folders.count(run.folder)} variants write the run folder {run.folder}; "
                "give them different settings or a run_name each"
            )
    return runs


@dataclass
class Training:
    """A run set up to train: its SAE, trainer and the config.json it will be saved with."""

    run: Run
    sae: SparseAutoencoder
    trainer: Trainer
    config: dict


def set_up(
    run: Run,
    lm: LanguageModel,
    buffer: ShuffledBuffer,
    init_from: str | None = None,
    distributed: Distributed | None = None,
) -> Training:
    """The run's SAE (seeded from ``train.seed``, as a separate run's, or ``init_from``'s weights), objective,
    trainer and config; with ``distributed``, trained data-parallel over its ranks."""
    params = run.params
    d_in = hook_width(lm.config, run.hook)
    d_out = hook_width(lm.config, run.target_hook) if run.target_hook is not None else None
    torch.manual_seed(params.train.seed)
    if init_from is not None:
        sae = initial_weights(init_from, params, lm, run.hook, d_in).to(lm.device)
    else:
        sae = build_sae(params.sae, d_in=d_in, d_out=d_out, num_latents=num_latents_of(params, d_in), device=lm.device)
    num_latents = sae.num_latents
    total_steps = max(1, params.train.tokens // params.buffer.batch_size)
    objective = build_objective(params.sae, sae, total_steps)
    lr = params.train.lr or architecture(params.sae.architecture).default_lr(num_latents)
    trainer = Trainer(
        sae, objective, buffer, params, run.folder, lr, paired=run.target_hook is not None, distributed=distributed
    )
    config = dictionary_config(
        params,
        sae,
        hook=run.hook,
        target_hook=run.target_hook,
        lr=trainer.lr,
        steps=trainer.total_steps,
        warmup_steps=trainer.schedule.warmup_steps,
        decay_start=trainer.schedule.decay_start,
        device=str(lm.device),
    )
    return Training(run, sae, trainer, config)


def initial_weights(path: str, params, lm: LanguageModel, hook, d_in: int):
    """The SAE of ``--init-from``: refused in one line when trained on another model, hook or width, or when it
    is not the params' architecture."""
    sae, info = open_any(path, params)
    if info.note:
        print(info.note)
    check_dictionary_matches(info.config, sae, model_name=lm.name, hook_name=hook.name, d_in=d_in)
    if sae.architecture != params.sae.architecture or getattr(sae, "input_norm", False) or sae.d_out != d_in:
        kind = "an input-normalised topk" if getattr(sae, "input_norm", False) else f"a {sae.architecture}"
        kind = "a transcoder" if sae.d_out != d_in or getattr(sae, "transcoder", False) else kind
        raise UserError(
            f"--init-from {path}: {kind} dictionary cannot start a sae.architecture={params.sae.architecture!r} "
            "autoencoder run; set sae.architecture to the dictionary's"
        )
    return sae


def start_in_step(
    trainings: list[Training], buffers: list[ShuffledBuffer], sweep_folder: Path, resume: bool
) -> list[str]:
    """Resume every run and the shared buffers from their checkpoints (``resume`` and a complete set of them),
    or initialise every run; returns notes for the user."""
    state_path = sweep_folder / BUFFERS_FILE
    checkpoints = [t.trainer.checkpoint_path.is_file() for t in trainings]
    if resume and state_path.is_file() and all(checkpoints):
        state = read_torch(state_path, "sweep checkpoint")
        distributed = trainings[0].trainer.distributed
        check_world_size(state_path, state.get("world_size", 1), distributed.world_size)
        notes = []
        for training in trainings:
            notes += training.trainer.load_checkpoint()
        steps = {training.trainer.step for training in trainings}
        if steps != {state["step"]}:
            raise UserError(
                f"{state_path} is at step {state['step']} but the runs' checkpoints are at steps "
                f"{sorted(steps)} (the sweep was killed while checkpointing); start over with --overwrite"
            )
        # Sweep checkpoints written before data-parallel training hold one rank's buffers as "buffers".
        mine = state["ranks"][distributed.rank] if "ranks" in state else state["buffers"]
        for buffer, buffer_state in zip(buffers, mine, strict=True):
            buffer.load_state_dict(buffer_state)
        return [*dict.fromkeys(notes), f"resuming {len(trainings)} runs at step {state['step']}"]
    notes = ["note: nothing to resume in the sweep; starting over"] if resume else []
    for training in trainings:
        training.trainer.initialize()
    return notes


def train_in_step(
    trainings: list[Training],
    buffers: list[ShuffledBuffer],
    buffer_of: list[int],
    sweep_folder: Path,
    on_step: Callable[[Training, dict], None] = lambda training, record: None,
) -> None:
    """Train every run on its buffer's batches, all buffers read once per step (``buffer_of[i]`` is run i's);
    checkpoint every run (without its buffer) and then the buffers, every ``train.checkpoint_every`` steps.
    Under several ranks (the trainers' ``Distributed``) rank 0 writes every rank's buffers."""
    first = trainings[0].trainer
    distributed = first.distributed
    for training in trainings:
        training.trainer.write_metrics()
    while first.step < first.total_steps:
        batches = [buffer.next_batch() for buffer in buffers]
        shortest = None if any(batch is None for batch in batches) else min(batches, key=len)
        if not distributed.every_rank_has(shortest, buffers[0].batch_size):
            break
        for training, index in zip(trainings, buffer_of, strict=True):
            on_step(training, training.trainer.train_on(batches[index]))
        if first.step % first.params.train.checkpoint_every == 0 and all(t.trainer.bad_steps == 0 for t in trainings):
            for training in trainings:
                training.trainer.save_checkpoint(with_buffer=False)
            ranks = distributed.gather([buffer.state_dict() for buffer in buffers])
            if distributed.is_first:
                state = {"step": first.step, "world_size": distributed.world_size, "ranks": ranks}
                torch_save(sweep_folder / BUFFERS_FILE, state)


def module_folder(sweep_folder: Path, distributed: Distributed) -> Path:
    """Where a rank's shared buffers are checkpointed under ``train.distribute`` 'modules' (rank r trains runs r,
    r + N, ... as a sweep of its own)."""
    return sweep_folder / f"rank{distributed.rank}_of_{distributed.world_size}"


def check_module_layout(sweep_folder: Path, world_size: int) -> None:
    """A 'modules' sweep resumes with the process count that placed its runs."""
    others = sorted(
        path.parent.name
        for path in sweep_folder.glob(f"rank*_of_*/{BUFFERS_FILE}")
        if not path.parent.name.endswith(f"_of_{world_size}")
    )
    if others:
        processes = others[0].rpartition("_of_")[2]
        raise UserError(
            f"--resume: {sweep_folder} holds a train.distribute 'modules' sweep placed on {processes} processes and "
            f"this run has {world_size}; resume with torchrun --nproc_per_node {processes}"
        )


def evaluation_groups(trainings: list[Training]) -> list[list[Training]]:
    """The runs one held-out pass can evaluate together (equal ``shared_pass_key``; a sweep's variants differ in
    their SAE and learning rate only)."""
    groups: dict[str, list[Training]] = {}
    for training in trainings:
        run = training.run
        groups.setdefault(shared_pass_key(run.hook, run.target_hook, run.params), []).append(training)
    return list(groups.values())
