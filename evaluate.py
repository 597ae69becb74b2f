"""Evaluate a saved dictionary on held-out text: FVU, L0, dead fraction, LM loss recovered.

    python evaluate.py --dictionary dictionaries/<model>/<hook>/<run> [--params params.json]

The model and hook come from the dictionary's config.json; params give the data and the eval settings.
"""

from __future__ import annotations

from pathlib import Path

from dictlearn.analysis.dictionary_on_model import open_dictionary
from dictlearn.cli import argument_parser, quiet_transformers, threads_from_env
from dictlearn.errors import run_script
from dictlearn.evaluation.evaluate import evaluate_dictionary
from dictlearn.files import write_json
from dictlearn.lm.text import check_source
from dictlearn.params import load_params
from dictlearn.report.common import evaluation_rows, plot_density_histogram, print_table


def main() -> None:
    parser = argument_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--dictionary", required=True, help="folder holding ae.pt and config.json")
    args = parser.parse_args()
    threads_from_env()
    quiet_transformers()
    params = load_params(args.params)
    check_source(params.data)
    folder = Path(args.dictionary)
    opened = open_dictionary(params, folder)
    if opened.note:
        print(opened.note)
    result = evaluate_dictionary(opened.lm, opened.hook, opened.sae, opened.params)
    plot_density_histogram(result.pop("density").numpy(), folder)
    write_json(folder / "eval.json", result)
    print_table(evaluation_rows(result), headers=["evaluation", str(folder)])


if __name__ == "__main__":
    run_script(main)
