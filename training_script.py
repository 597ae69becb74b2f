"""Train a sparse autoencoder of any registered architecture (``sae.architecture``) at the params' hook.

    python training_script.py [--params params.json] [--resume | --overwrite | --if-missing]

Writes dictionaries/<model>/<hook>/<run>/: ae.pt, config.json, metrics.jsonl, eval.json, plots.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from dictlearn.activations.source import training_buffer
from dictlearn.cli import argument_parser, keep_freed_memory, prepare, store_path, threads_from_env
from dictlearn.errors import UserError, run_script
from dictlearn.evaluation.evaluate import evaluate_dictionary
from dictlearn.files import check_output_folder, write_json
from dictlearn.formats.detect import open_any
from dictlearn.formats.run_folder import (
    AE_FILE,
    check_dictionary_matches,
    claim_run_folder,
    dictionary_config,
    num_latents_of,
    run_folder,
    save_dictionary,
)
from dictlearn.lm.models import hook_width
from dictlearn.locks import output_lock
from dictlearn.report.common import evaluation_rows, plot_density_histogram, plot_training_curves, print_table
from dictlearn.report.tracking import start_tracking
from dictlearn.sae.registry import architecture, build_objective, build_sae
from dictlearn.training.trainer import Trainer


def main() -> None:
    parser = argument_parser(__doc__.strip().splitlines()[0])
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    modes.add_argument("--overwrite", action="store_true", help="remove the run folder's earlier results and train")
    parser.add_argument(
        "--init-from",
        metavar="DICTIONARY",
        help="start from this dictionary's weights (any format --dictionary reads; same model, hook, width and "
        "architecture as the params)",
    )
    modes.add_argument(
        "--if-missing", action="store_true", help="do nothing (exit 0) when the run folder already holds a dictionary"
    )
    args = parser.parse_args()
    threads_from_env()
    keep_freed_memory()
    params, lm, hook = prepare(args.params, needs_text=True)
    folder = run_folder(params, lm.short_name, hook.name, hook_width(lm.config, hook))
    check_output_folder(folder, "train.output_dir")
    if args.if_missing and (folder / AE_FILE).is_file():
        print(f"{folder} already holds a trained dictionary; python training_script.py --overwrite trains it again")
        return
    buffer = training_buffer(params, lm, hook, store_path(params, lm, hook))  # refuses a missing store first
    with output_lock(folder, "run folder"):
        claim_run_folder(folder, resume=args.resume, overwrite=args.overwrite)
        train(params, lm, hook, folder, buffer, resume=args.resume, init_from=args.init_from)


def train(params, lm, hook, folder, buffer, *, resume: bool, init_from: str | None = None) -> None:
    d_in = hook_width(lm.config, hook)
    torch.manual_seed(params.train.seed)
    if init_from:
        sae = initial_weights(init_from, params, lm, hook, d_in).to(lm.device)
    else:
        sae = build_sae(params.sae, d_in=d_in, d_out=None, num_latents=num_latents_of(params, d_in), device=lm.device)
    num_latents = sae.num_latents
    total_steps = max(1, params.train.tokens // params.buffer.batch_size)
    objective = build_objective(params.sae, sae, total_steps)
    lr = params.train.lr or architecture(params.sae.architecture).default_lr(num_latents)
    trainer = Trainer(sae, objective, buffer, params, folder, lr)
    config = dictionary_config(
        params,
        sae,
        hook=hook,
        lr=trainer.lr,
        steps=trainer.total_steps,
        warmup_steps=trainer.schedule.warmup_steps,
        decay_start=trainer.schedule.decay_start,
        device=str(lm.device),
    )
    if resume and trainer.checkpoint_path.is_file():
        for note in trainer.load_checkpoint():
            print(note)
        print(f"resuming {folder} at step {trainer.step} of {trainer.total_steps}")
    else:
        if resume:
            print(trainer.progress_without_checkpoint())
        trainer.initialize(keep_weights=bool(init_from))
    print(
        f"training a {params.sae.architecture} SAE, {num_latents} latents, on {params.model.name} {hook.name} -> {folder}"
    )
    tracker = start_tracking(params, folder)
    start, start_tokens = time.perf_counter(), trainer.tokens
    with tqdm(total=trainer.total_steps * params.buffer.batch_size, initial=trainer.tokens, unit="tok") as bar:

        def show(trainer: Trainer, record: dict) -> None:
            tracker.log(record, step=trainer.step)
            bar.update(record["tokens"] - bar.n)
            bar.set_postfix(
                fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}", dead=f"{100 * record['dead_fraction']:.1f}%"
            )

        trainer.fit(on_step=show)
    seconds = time.perf_counter() - start
    if trainer.step < trainer.total_steps:
        print(f"note: the activations ran out after {trainer.tokens:,} of the {params.train.tokens:,} tokens asked for")
    trainer.finish()
    save_dictionary(folder, sae, config)
    plot_training_curves(trainer.metrics, folder)
    result = evaluate_dictionary(lm, hook, sae, params)
    plot_density_histogram(result.pop("density").numpy(), folder)
    result["train_tokens"], result["train_tokens_per_s"] = trainer.tokens, (trainer.tokens - start_tokens) / seconds
    write_json(folder / "eval.json", result)
    tracker.summary(result)
    tracker.finish()
    trainer.checkpoint_path.unlink(missing_ok=True)
    print_table(
        evaluation_rows(result) + [["training tokens/s", f"{result['train_tokens_per_s']:,.0f}"]],
        headers=["evaluation", str(folder)],
    )


def initial_weights(path: str, params, lm, hook, d_in: int):
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


if __name__ == "__main__":
    run_script(main)
