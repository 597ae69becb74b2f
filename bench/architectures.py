"""Every architecture trained at one equal token budget on the embedded default's store, side by side.

Runs ``training_script.py`` once per variant (each in its own run folder under ``--out``, from the same store
rows in the same order), then prints one table: held-out FVU, L0, dead latents, LM loss recovered and training
tokens/s, from each run's ``eval.json``. Usage (after ``make train`` has harvested the store):

    .venv/bin/python bench/architectures.py [--tokens 800000] [--out bench_runs/architectures] [--only relu,topk]
        [--eval-tokens 115000]

A latent counts as dead when it never fires on the evaluation's held-out tokens (16,384 by default): a rare
latent can read as dead on so few; ``--eval-tokens`` takes more.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dictlearn.report.common import print_table  # noqa: E402

# name -> the sae section (and train overrides) of the variant; everything else is params.json's.
VARIANTS: dict[str, dict] = {
    "topk": {"sae": {"architecture": "topk"}},
    "topk 16x": {"sae": {"architecture": "topk", "expansion_factor": 16}},
    "batchtopk": {"sae": {"architecture": "batchtopk"}},
    "matryoshka": {"sae": {"architecture": "matryoshka"}},
    "jumprelu": {"sae": {"architecture": "jumprelu"}},
    "gated": {"sae": {"architecture": "gated"}},
    "relu": {"sae": {"architecture": "relu"}},
    "relu+resampling": {"sae": {"architecture": "relu", "resample_every": 25}},
    # The default L1 leaves no latent dead at 8x, so resampling has nothing to do there; 16x with L1 2 leaves a
    # good share dead (and rarely firing), with and without Bricken et al.'s resampling.
    "relu 16x l1=2": {"sae": {"architecture": "relu", "expansion_factor": 16, "l1_coefficient": 2}},
    "relu 16x l1=2+resampling": {
        "sae": {"architecture": "relu", "expansion_factor": 16, "l1_coefficient": 2, "resample_every": 25}
    },
    "relu april2024": {"sae": {"architecture": "relu", "recipe": "april2024"}},
    "topk transcoder": {
        "hook": "blocks.6.ln2.hook_normalized",
        "sae": {"architecture": "topk", "target_hook": "blocks.6.hook_mlp_out"},
        "train": {"source": "live"},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.json"))
    parser.add_argument("--tokens", type=int, default=800_000, help="training tokens of every variant")
    parser.add_argument("--out", default=str(REPO / "bench_runs" / "architectures"))
    parser.add_argument("--only", help="comma-separated variant names (default: all)")
    parser.add_argument(
        "--eval-tokens", type=int, help="held-out tokens of each run's evaluation (eval.tokens; default params')"
    )
    args = parser.parse_args()
    base = json.loads(Path(args.params).read_text())
    chosen = args.only.split(",") if args.only else list(VARIANTS)
    out = Path(args.out)
    rows = []
    for name in chosen:
        variant = VARIANTS[name]
        run_name = name.replace(" ", "_").replace("+", "_").replace("=", "")
        params = {
            **base,
            **{key: value for key, value in variant.items() if key not in ("sae", "train")},
            "sae": {**base.get("sae", {}), **variant["sae"]},
            "train": {
                **base.get("train", {}),
                "tokens": args.tokens,
                "output_dir": str(out),
                "run_name": run_name,
                **variant.get("train", {}),
            },
            "eval": {**base.get("eval", {}), **({"tokens": args.eval_tokens} if args.eval_tokens else {})},
        }
        if params["sae"]["architecture"] not in ("topk", "batchtopk", "matryoshka"):
            for key in ("k", "aux_k", "aux_coef"):
                params["sae"].pop(key, None)
        params_path = out / f"{run_name}.params.json"
        params_path.parent.mkdir(parents=True, exist_ok=True)
        params_path.write_text(json.dumps(params, indent=2))
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, str(REPO / "training_script.py"), "--params", str(params_path), "--overwrite"], cwd=REPO
        )
        if result.returncode != 0:
            rows.append([name, "failed", "", "", "", "", f"{time.perf_counter() - start:.0f}"])
            continue
        (eval_path,) = out.rglob(f"{run_name}/eval.json")
        evaluation = json.loads(eval_path.read_text())
        rows.append(
            [
                name,
                f"{evaluation['fvu']:.4f}",
                f"{evaluation['l0']:.1f}",
                f"{100 * evaluation['dead_fraction']:.1f}%",
                f"{evaluation.get('loss_recovered', float('nan')):.4f}",
                f"{evaluation['train_tokens_per_s']:,.0f}",
                f"{time.perf_counter() - start:.0f}",
            ]
        )
    print_table(rows, headers=["variant", "FVU", "L0", "dead", "LM loss recovered", "train tokens/s", "seconds (all)"])


if __name__ == "__main__":
    main()
