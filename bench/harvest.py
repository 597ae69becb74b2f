"""Harvest speed and memory on the embedded default: tokens/s of harvesting into the store versus the bare
truncated forward (same windows, same batches, nothing kept), their ratio, and peak memory at two token
counts (memory should be set by buffer and batch sizes, not by tokens written).

    python bench/harvest.py [--params params.json] [--tokens 163840 327680]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dictlearn.activations.harvest import LiveActivations, batched  # noqa: E402
from dictlearn.activations.store import StoreWriter, write_store  # noqa: E402
from dictlearn.cli import prepare  # noqa: E402
from dictlearn.lm.models import capture_activations, hook_width  # noqa: E402
from dictlearn.lm.text import first_windows, training_windows  # noqa: E402
from dictlearn.report.common import print_table  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(params_path: str, mode: str, tokens: int) -> dict:
    """One measurement in a fresh process, so peak memory belongs to it alone."""
    params, lm, hook = prepare(params_path)
    source = LiveActivations(
        lm,
        hook,
        lambda: first_windows(training_windows(params.data, lm.tokenizer), params.data, tokens),
        params.buffer.model_batch_size,
    )
    loaded_rss = peak_rss_mib()
    # One batch first, untimed, in both modes: the first forward pays for kernel choice and allocation.
    warm_up = torch.tensor(next(batched(source.windows(), params.buffer.model_batch_size)))
    with torch.inference_mode():
        capture_activations(lm.model, hook, warm_up.to(lm.device))
    if mode == "forward":
        batches = [torch.tensor(b) for b in batched(source.windows(), params.buffer.model_batch_size)]
        start = time.perf_counter()
        with torch.inference_mode():
            for input_ids in batches:
                capture_activations(lm.model, hook, input_ids.to(lm.device))
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        # Count text tokens only, as the harvest does (BOS positions are not kept).
        text_from = int(params.data.prepend_bos)
        seconds, written = time.perf_counter() - start, sum(b[:, text_from:].numel() for b in batches)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            meta = {"d_in": hook_width(lm.config, hook)}
            writer = StoreWriter(
                Path(tmp) / "store", meta, params.store.shard_tokens, getattr(torch, params.store.dtype)
            )
            start = time.perf_counter()
            meta = write_store(source.iter_chunks, writer, tokens)
            seconds, written = time.perf_counter() - start, meta["tokens"]
    return {
        "mode": mode,
        "tokens": written,
        "seconds": seconds,
        "tokens_per_s": written / seconds,
        "peak_rss_mib": peak_rss_mib(),
        "rss_after_load_mib": loaded_rss,
        "device": str(lm.device),
    }


def run_child(params_path: str, mode: str, tokens: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--params", params_path, "--child", mode, "--tokens", str(tokens)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.json")
    parser.add_argument("--tokens", type=int, nargs="+", default=[163840, 327680])
    parser.add_argument("--child", choices=["forward", "harvest"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.params, args.child, args.tokens[0])))
        return
    small, large = args.tokens[0], args.tokens[-1]
    forward = run_child(args.params, "forward", small)
    runs = [run_child(args.params, "harvest", n) for n in (small, large)]
    rows = [
        [
            r["mode"],
            r["tokens"],
            f"{r['tokens_per_s']:,.0f}",
            f"{r['peak_rss_mib']:,.0f}",
            f"{r['peak_rss_mib'] - r['rss_after_load_mib']:,.0f}",
        ]
        for r in [forward, *runs]
    ]
    print(f"device: {forward['device']}, torch threads: {torch.get_num_threads()}")
    print_table(rows, headers=["run", "tokens", "tokens/s", "peak RSS MiB", "peak over loaded model MiB"])
    print(f"harvest / bare forward: {runs[0]['tokens_per_s'] / forward['tokens_per_s']:.1%} (goal >= 90%)")
    print(f"peak memory {large} vs {small} tokens: {runs[1]['peak_rss_mib'] - runs[0]['peak_rss_mib']:+,.0f} MiB")


if __name__ == "__main__":
    main()
