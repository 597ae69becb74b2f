"""Evaluate a saved dictionary on held-out text: FVU, L0, dead fraction, LM loss recovered.

    python evaluate.py --dictionary dictionaries/<model>/<hook>/<run> [--params params.json]

The model and hook come from the dictionary's config.json; params give the data and the eval settings.
"""

from __future__ import annotations

from pathlib import Path

from dictlearn.cli import argument_parser, quiet_transformers, threads_from_env
from dictlearn.formats.run_folder import check_dictionary_matches, load_dictionary
from dictlearn.errors import run_script
from dictlearn.evaluation.evaluate import evaluate_dictionary
from dictlearn.files import write_json
from dictlearn.lm.models import hook_width, load_config, load_language_model, resolve_hook
from dictlearn.params import load_params
from dictlearn.report.common import evaluation_rows, plot_density_histogram, print_table
from dictlearn.lm.text import check_source


def main() -> None:
    parser = argument_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--dictionary", required=True, help="folder holding ae.pt and config.json")
    args = parser.parse_args()
    threads_from_env()
    quiet_transformers()
    params = load_params(args.params)
    check_source(params.data)
    folder = Path(args.dictionary)
    sae, config = load_dictionary(folder)
    trained = config.get("trainer", {})
    params = params.with_overrides(
        model={"name": trained.get("lm_name", params.model.name)}, hook=trained.get("submodule_name", params.hook)
    )
    hook = resolve_hook(load_config(params.model), params.hook)
    lm = load_language_model(params.model)
    check_dictionary_matches(
        config, sae, model_name=params.model.name, hook_name=hook.name, d_in=hook_width(lm.config, hook)
    )
    sae.to(lm.device)
    result = evaluate_dictionary(lm, hook, sae, params)
    plot_density_histogram(result.pop("density").numpy(), folder)
    write_json(folder / "eval.json", result)
    print_table(evaluation_rows(result), headers=["evaluation", str(folder)])


if __name__ == "__main__":
    run_script(main)
