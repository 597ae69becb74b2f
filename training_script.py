"""Train sparse autoencoders of any registered architecture (``sae.architecture``): one at the params' hook, one
at each of several hooks (a list or a pattern), or every ``sweep`` variant at every hook, all from one forward.

    python training_script.py [--params params.json] [--resume | --overwrite | --if-missing]
    torchrun --nproc_per_node N training_script.py ...   (data-parallel, or whole runs per process: train.distribute)

Writes dictionaries/<model>/<hook>/<run>/: ae.pt, config.json, metrics.jsonl, eval.json, plots; several runs
also write dictionaries/<model>/sweeps/<name>/: sweep.json and sweep.png (L0 against FVU). Under torchrun rank 0
takes the locks, writes, prints and evaluates (the others stop when training ends); with train.distribute
'modules' each rank writes and evaluates its own runs.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

from tqdm import tqdm

from dictlearn.activations.source import training_buffers
from dictlearn.cli import argument_parser, keep_freed_memory, only_first_rank_prints, prepare_hooks, threads_from_env
from dictlearn.errors import UserError, run_script
from dictlearn.evaluation.evaluate import evaluate_dictionaries
from dictlearn.files import check_output_folder, make_folder, read_json, write_json
from dictlearn.formats.run_folder import AE_FILE, CHECKPOINT_FILE, EVAL_FILE, claim_run_folder, save_dictionary
from dictlearn.locks import output_lock
from dictlearn.params import load_params
from dictlearn.report.common import (
    evaluation_rows,
    plot_density_histogram,
    plot_sweep,
    plot_training_curves,
    print_table,
)
from dictlearn.report.tracking import NoTracking, start_tracking
from dictlearn.training.distributed import Distributed
from dictlearn.training.runs import (
    BUFFERS_FILE,
    Training,
    check_module_layout,
    evaluation_groups,
    module_folder,
    plan_runs,
    set_up,
    start_in_step,
    train_in_step,
)
from dictlearn.training.trainer import Trainer


def main() -> None:
    parser = argument_parser(__doc__.strip().splitlines()[0])
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--resume", action="store_true", help="continue the run folders' last checkpoints")
    modes.add_argument("--overwrite", action="store_true", help="remove the run folders' earlier results and train")
    modes.add_argument(
        "--if-missing", action="store_true", help="train only the runs whose folder holds no dictionary yet"
    )
    parser.add_argument(
        "--init-from", metavar="DICTIONARY", help="start from this dictionary's weights (any format; one run only)"
    )
    args = parser.parse_args()
    threads_from_env()
    keep_freed_memory()
    distributed = Distributed.from_env(load_params(args.params).model.device)
    only_first_rank_prints(distributed)
    params, lm, hooks = prepare_hooks(args.params, needs_text=True)
    runs = plan_runs(params, lm.config, lm.short_name, hooks, args.params)
    for run in runs:
        check_output_folder(run.folder, "train.output_dir")
    if len(runs) == 1 and params.sweep is None:
        folder = runs[0].folder
        if args.if_missing and (folder / AE_FILE).is_file():
            print(f"{folder} already holds a trained dictionary; python training_script.py --overwrite trains it again")
            return
        buffer = training_buffers(params, lm, [runs[0].hooks], distributed.part)[0]  # a missing store is refused first
        with ExitStack() as locks:

            def claim() -> None:
                locks.enter_context(output_lock(folder, "run folder"))
                claim_run_folder(folder, resume=args.resume, overwrite=args.overwrite)

            distributed.on_first(claim)
            train(params, lm, runs[0], buffer, resume=args.resume, init_from=args.init_from, distributed=distributed)
        distributed.close()
        return
    if args.init_from:
        raise UserError(f"--init-from starts one run; these params plan {len(runs)} (several hooks or a sweep)")
    sweep_folder = (
        Path(params.train.output_dir) / lm.short_name / "sweeps" / (params.sweep.name if params.sweep else "hooks")
    )
    modules = params.train.distribute == "modules" and distributed.world_size > 1
    with ExitStack() as locks:

        def claim() -> list[int]:
            """Lock and claim the pending runs' folders; their indices (the same list on every rank)."""
            locks.enter_context(output_lock(make_folder(sweep_folder, "sweep folder"), "sweep folder"))
            for run in runs:
                locks.enter_context(output_lock(run.folder, "run folder"))
            finished = [
                run for run in runs if (run.folder / AE_FILE).is_file() and not (run.folder / CHECKPOINT_FILE).is_file()
            ]
            skip = finished if (args.resume or args.if_missing) else []
            pending = [index for index, run in enumerate(runs) if run not in skip]
            for index in pending:
                claim_run_folder(runs[index].folder, resume=args.resume, overwrite=args.overwrite)
            if not args.resume:
                for path in sweep_folder.glob(f"**/{BUFFERS_FILE}"):
                    path.unlink()
            elif modules:
                check_module_layout(sweep_folder, distributed.world_size)
            if skip:
                print(f"{len(skip)} of {len(runs)} runs already hold a dictionary and are left as they are")
            return pending

        pending = [runs[index] for index in distributed.on_first(claim)]
        if modules:
            # sparsify's --distribute_modules: whole runs per rank, each on every batch of all the data.
            mine = pending[distributed.rank :: distributed.world_size]
            print(f"train.distribute 'modules': {len(pending)} runs over {distributed.world_size} processes")
            if mine:
                # Each rank's shared buffers are checkpointed in a folder of its own.
                sweep(params, lm, mine, module_folder(sweep_folder, distributed), resume=args.resume)
            distributed.wait_for_all()  # every rank's eval.json is written before the summary reads them
        elif pending:
            sweep(params, lm, pending, sweep_folder, resume=args.resume, distributed=distributed)
        if distributed.is_first:
            summarise(runs, sweep_folder)
    distributed.close()


def train(params, lm, run, buffer, *, resume: bool, init_from: str | None, distributed: Distributed) -> None:
    training = set_up(run, lm, buffer, init_from=init_from, distributed=distributed)
    trainer = training.trainer
    if resume and trainer.checkpoint_path.is_file():
        for note in trainer.load_checkpoint():
            print(note)
        print(f"resuming {run.folder} at step {trainer.step} of {trainer.total_steps}")
    else:
        if resume:
            print(trainer.progress_without_checkpoint())
        trainer.initialize(keep_weights=init_from is not None)
    print(describe(training, distributed))
    tracker = start_tracking(params, run.folder) if distributed.is_first else NoTracking()
    start, start_tokens = time.perf_counter(), trainer.tokens
    total = trainer.total_steps * params.buffer.batch_size
    with tqdm(total=total, initial=trainer.tokens, unit="tok", disable=not distributed.is_first) as bar:

        def show(trainer: Trainer, record: dict) -> None:
            tracker.log(record, step=trainer.step)
            bar.update(record["tokens"] - bar.n)
            bar.set_postfix(
                fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}", dead=f"{100 * record['dead_fraction']:.1f}%"
            )

        trainer.fit(on_step=show)
    if distributed.is_first:  # evaluation on rank 0 alone; the other ranks are done
        finish([training], lm, (trainer.tokens - start_tokens) / (time.perf_counter() - start), tracker)


def sweep(params, lm, runs, sweep_folder: Path, *, resume: bool, distributed: Distributed | None = None) -> None:
    """Train ``runs`` in step; with ``distributed``, data-parallel over its ranks (rank 0 saves and evaluates)."""
    distributed = distributed or Distributed()
    make_folder(sweep_folder, "sweep folder")
    groups = list(dict.fromkeys(tuple(hook.name for hook in run.hooks) for run in runs))
    hooks_of = {tuple(hook.name for hook in run.hooks): run.hooks for run in runs}
    buffers = training_buffers(params, lm, [hooks_of[group] for group in groups], distributed.part)
    buffer_of = [groups.index(tuple(hook.name for hook in run.hooks)) for run in runs]
    trainings = [
        set_up(run, lm, buffers[index], distributed=distributed) for run, index in zip(runs, buffer_of, strict=True)
    ]
    for note in start_in_step(trainings, buffers, sweep_folder, resume):
        print(note)
    if params.train.wandb is not None:
        print("note: train.wandb is not used when several runs train together")
    print(f"training {len(trainings)} SAEs on {len(groups)} buffers from one forward per batch:")
    for training in trainings:
        print(f"  {describe(training, distributed)}")
    first = trainings[0].trainer
    start, start_tokens = time.perf_counter(), first.tokens
    with tqdm(total=first.total_steps, initial=first.step, unit="step", disable=not distributed.is_first) as bar:

        def show(training: Training, record: dict) -> None:
            if training is trainings[-1]:
                bar.update(record["step"] - bar.n)

        train_in_step(trainings, buffers, buffer_of, sweep_folder, on_step=show)
    tokens_per_s = (first.tokens - start_tokens) / (time.perf_counter() - start)
    if not distributed.is_first:
        return
    finish(trainings, lm, tokens_per_s)
    (sweep_folder / BUFFERS_FILE).unlink(missing_ok=True)


def describe(training: Training, distributed: Distributed) -> str:
    run, sae = training.run, training.sae
    reads = f"{run.hook.name} -> {run.target_hook.name}" if run.target_hook else run.hook.name
    kind = "transcoder" if run.target_hook else "SAE"
    processes = (
        f" ({distributed.world_size} processes, {training.trainer.buffer.batch_size} rows each a step)"
        if distributed.world_size > 1
        else ""
    )
    return (
        f"a {run.params.sae.architecture} {kind}, {sae.num_latents} latents, on {run.params.model.name} {reads} -> "
        f"{run.folder}{processes}"
    )


def finish(trainings: list[Training], lm, tokens_per_s: float, tracker=None) -> None:
    """Save each dictionary, its plots and its evaluation (one held-out pass for the runs that read the same
    hooks and held-out text); remove the checkpoints. ``tracker`` serves a single run."""
    for training in trainings:
        run, trainer = training.run, training.trainer
        if trainer.step < trainer.total_steps:
            print(
                f"note: the activations ran out after {trainer.tokens:,} of the {run.params.train.tokens:,} tokens "
                "asked for"
            )
        trainer.finish()
        save_dictionary(run.folder, training.sae, training.config)
        plot_training_curves(trainer.metrics, run.folder)
    for group in evaluation_groups(trainings):
        run = group[0].run
        results = evaluate_dictionaries(
            lm, run.hook, [training.sae for training in group], run.params, target_hook=run.target_hook
        )
        for training, result in zip(group, results, strict=True):
            run, trainer = training.run, training.trainer
            plot_density_histogram(result.pop("density").numpy(), run.folder)
            result["train_tokens"], result["train_tokens_per_s"] = trainer.tokens, tokens_per_s
            write_json(run.folder / EVAL_FILE, result)
            if tracker is not None:
                tracker.summary(result)
                tracker.finish()
            trainer.checkpoint_path.unlink(missing_ok=True)
            print_table(
                evaluation_rows(result) + [["training tokens/s", f"{result['train_tokens_per_s']:,.0f}"]],
                headers=["evaluation", str(run.folder)],
            )


def summarise(runs, sweep_folder: Path) -> None:
    """The sweep's table, sweep.json and sweep.png, from every run's eval.json."""
    rows = []
    for run in runs:
        result = read_json(run.folder / EVAL_FILE, "evaluation")
        rows.append(
            {
                "hook": run.hook.name + (f" -> {run.target_hook.name}" if run.target_hook else ""),
                "run": run.folder.name,
                "l0": result["l0"],
                "fvu": result["fvu"],
                "loss_recovered": result.get("loss_recovered"),
                "dead_fraction": result["dead_fraction"],
                "folder": str(run.folder),
            }
        )
    write_json(sweep_folder / "sweep.json", rows)
    plot_sweep(rows, sweep_folder / "sweep.png")
    print_table(
        [
            [r["hook"], r["run"], r["l0"], r["fvu"], r["loss_recovered"], f"{100 * r['dead_fraction']:.1f}%"]
            for r in rows
        ],
        headers=["hook", "run", "L0", "FVU", "LM loss recovered", "dead"],
    )
    print(f"sweep summary: {sweep_folder / 'sweep.json'}, {sweep_folder / 'sweep.png'}")


if __name__ == "__main__":
    run_script(main)
