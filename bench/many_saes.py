"""Many SAEs from one pass, on the embedded default: tokens/s of harvesting L hooks in one forward (the
forward stops after the deepest hook) against L separate harvests of one hook each (what L separate training
runs pay), on the same windows and batches.

    python bench/many_saes.py [--params params.json] [--hooks 'blocks.{2,4,6,8}.hook_resid_post'] [--tokens 16384]

Goal: the harvest part of L SAEs costs one forward, not L (ratio near L).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dictlearn.activations.harvest import LiveActivations  # noqa: E402
from dictlearn.cli import prepare_hooks  # noqa: E402
from dictlearn.lm.models import resolve_hooks  # noqa: E402
from dictlearn.lm.text import first_windows, training_windows  # noqa: E402
from dictlearn.report.common import print_table  # noqa: E402


def harvest_seconds(lm, hooks, windows, model_batch_size: int) -> tuple[float, int]:
    """Seconds to harvest every chunk at ``hooks`` (one forward per batch), and the rows per hook."""
    source = LiveActivations(lm, hooks, windows, model_batch_size)
    start, rows = time.perf_counter(), 0
    for chunk_set in source.iter_chunk_sets():
        rows += len(next(iter(chunk_set.values())).acts)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.json")
    parser.add_argument("--hooks", default="blocks.{2,4,6,8}.hook_resid_post")
    parser.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args()
    params, lm, _ = prepare_hooks(args.params)
    hooks = resolve_hooks(lm.config, args.hooks)
    windows = lambda: first_windows(training_windows(params.data, lm.tokenizer), params.data, args.tokens)  # noqa: E731
    batch = params.buffer.model_batch_size
    harvest_seconds(lm, hooks[:1], lambda: first_windows(windows(), params.data, batch * 16), batch)  # warm-up
    together, rows = harvest_seconds(lm, hooks, windows, batch)
    apart = [harvest_seconds(lm, [hook], windows, batch)[0] for hook in hooks]
    rows_table = [
        [f"{len(hooks)} hooks, one pass", rows, f"{together:.1f}", f"{rows / together:,.0f}"],
        [f"{len(hooks)} separate passes", rows, f"{sum(apart):.1f}", f"{rows / sum(apart):,.0f}"],
        *[[f"  {hook.name} alone", rows, f"{s:.1f}", f"{rows / s:,.0f}"] for hook, s in zip(hooks, apart)],
    ]
    print(f"device: {lm.device}, torch threads: {torch.get_num_threads()}, model batch {batch}")
    print_table(rows_table, headers=["harvest", "tokens per hook", "seconds", "tokens/s (per hook)"])
    print(
        f"one pass / separate passes: {sum(apart) / together:.2f}x faster (goal: near {len(hooks)}x for equal depths)"
    )
    # Data-parallel training (1 vs 2 gloo processes) belongs to the distributed work: its figure goes here.


if __name__ == "__main__":
    main()
