"""Evaluate saved dictionaries on held-out text to SAEBench's core standard, and compare them.

    python evaluate.py --dictionary dictionaries/<model>/<hook>/<run> [--dictionary ...] [--out DIR]
    python evaluate.py --dictionary dictionaries/<model>  --out DIR      (every run folder below it)

Each dictionary's model and hook come from its config.json; params give the data and the eval sizes
(eval.evaluate_tokens, eval.evaluate_lm_loss_tokens, eval.absorption_words). Writes eval.json and density.png
beside each ae.pt; with --out (or several dictionaries) also DIR/comparison.json and Pareto plots.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from dictlearn.cli import argument_parser, quiet_transformers, threads_from_env
from dictlearn.errors import UserError, run_script
from dictlearn.evaluation.compare import (
    comparison_record,
    dictionaries_in_groups,
    dictionaries_on_models,
    dictionary_label,
    find_dictionaries,
)
from dictlearn.evaluation.evaluate import evaluate_dictionaries, full_size
from dictlearn.files import write_json
from dictlearn.lm.text import check_source
from dictlearn.params import load_params
from dictlearn.report.common import plot_density_histogram, print_table
from dictlearn.report.evaluation_report import comparison_table, evaluation_rows, plot_pareto


def progress(description: str, total: int):
    return tqdm(desc=description, total=total, leave=False)


def main() -> None:
    parser = argument_parser(__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--dictionary", action="append", required=True, help="run folder (ae.pt + config.json) or a folder above runs"
    )
    parser.add_argument("--out", help="folder for comparison.json and the Pareto plots")
    args = parser.parse_args()
    threads_from_env()
    quiet_transformers()
    params = load_params(args.params)
    check_source(params.data)
    folders = find_dictionaries(args.dictionary)
    if len(folders) > 1 and not args.out:
        raise UserError(f"--out: {len(folders)} dictionaries to compare; name a folder for comparison.json")
    results = {}
    for group in dictionaries_in_groups(dictionaries_on_models(params, folders)):
        first = group[0][1]
        size = full_size(first.params)
        for _folder, opened in group:
            if opened.note:
                print(opened.note)
        evaluations = evaluate_dictionaries(
            first.lm,
            first.hook,
            [opened.sae for _folder, opened in group],
            first.params,
            size,
            progress,
            target_hook=first.target_hook,
        )
        read = evaluations[0]  # one pass: every dictionary of the group read the same tokens
        if read["tokens"] < size.tokens or read.get("lm_loss_tokens", size.lm_loss_tokens) < size.lm_loss_tokens:
            print(
                f"note: the held-out text gave {read['tokens']:,} tokens ({read.get('lm_loss_tokens', 0):,} with the "
                f"LM loss), not the {size.tokens:,} ({size.lm_loss_tokens:,}) asked; more text or a smaller "
                "data.held_out_every gives more"
            )
        for (folder, opened), result in zip(group, evaluations, strict=True):
            result["label"] = dictionary_label(opened.sae)
            plot_density_histogram(result.pop("density").numpy(), folder)
            write_json(folder / "eval.json", result)
            shared = f" (one pass for {len(group)} dictionaries)" if len(group) > 1 else ""
            timing = ", ".join(f"{part} {seconds:.0f} s" for part, seconds in result["seconds"].items())
            print(f"{folder}: {timing}{shared}")
            if len(folders) == 1:
                print_table(evaluation_rows(result), headers=["evaluation", str(folder)])
            results[str(folder)] = result
    record = comparison_record(results)
    print_table(*comparison_table(record))
    if args.out:
        out = Path(args.out)
        write_json(out / "comparison.json", record)
        plots = plot_pareto(record, out)
        print(f"wrote {out / 'comparison.json'}" + "".join(f", {out / name}" for name in plots))


if __name__ == "__main__":
    run_script(main)
