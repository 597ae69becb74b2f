"""Harvest activations at the params' hook into a sharded on-disk store.

python get_activations.py [--params params.json] [--tokens N] [--out FOLDER]
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from dictlearn.activations.harvest import LiveActivations
from dictlearn.activations.store import META, ActivationStore, StoreWriter, harvest_identity, write_store
from dictlearn.cli import argument_parser, positive_int, prepare, store_path, threads_from_env
from dictlearn.errors import run_script
from dictlearn.files import check_output_folder
from dictlearn.lm.models import hook_width
from dictlearn.lm.text import training_windows
from dictlearn.locks import output_lock
from dictlearn.report.common import format_bytes, print_table


def main() -> None:
    parser = argument_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--tokens", type=positive_int, help="rows to write (default: store.tokens)")
    parser.add_argument("--out", help="store folder (default: store.path)")
    parser.add_argument("--overwrite", action="store_true", help="harvest again even if the store is up to date")
    args = parser.parse_args()
    threads_from_env()
    params, lm, hook = prepare(args.params)
    tokens = args.tokens or params.store.tokens
    out = Path(args.out) if args.out else store_path(params, lm, hook)
    d_in = hook_width(lm.config, hook)
    identity = harvest_identity(params, hook.name, d_in)
    check_output_folder(out, "activation store")
    with output_lock(out, "activation store"):
        harvest(params, lm, hook, out, identity, tokens, args.overwrite)


def harvest(params, lm, hook, out: Path, identity: dict, tokens: int, overwrite: bool) -> None:
    # --overwrite never opens the old store: it is how a broken one (bad meta.json, a lost shard) is replaced.
    if not overwrite and (out / META).is_file():
        existing = ActivationStore(out)
        if existing.holds(identity, tokens):
            print(f"activation store {out} is up to date ({len(existing):,} tokens); --overwrite harvests again")
            return
    source = LiveActivations(
        lm,
        hook,
        lambda: training_windows(params.data, lm.tokenizer),
        params.buffer.model_batch_size,
        params.buffer.exclude_special_tokens,
    )
    d_in = identity["d_in"]
    meta = {"model": params.model.name, "hook": hook.name, "d_in": d_in, "context_size": params.data.context_size}
    meta["identity"] = identity
    writer = StoreWriter(out, meta, params.store.shard_tokens, getattr(torch, params.store.dtype))
    start = time.perf_counter()
    with tqdm(total=tokens, unit="tok", desc=f"harvest {hook.name}") as bar:
        meta = write_store(source.iter_chunks(), writer, tokens, bar.update)
    seconds = time.perf_counter() - start
    print_table(
        [
            ["store", str(out)],
            ["model", params.model.name],
            ["hook", hook.name],
            ["d_in", meta["d_in"]],
            ["tokens", f"{meta['tokens']:,}"],
            ["shards", len(meta["shards"])],
            ["seconds", f"{seconds:.1f}"],
            ["tokens/s", f"{meta['tokens'] / seconds:,.0f}"],
            ["bytes", format_bytes(writer.bytes)],
        ],
        headers=["activation store", ""],
    )
    if meta["tokens"] < tokens:
        print(f"note: the text source ran out after {meta['tokens']:,} of the {tokens:,} tokens asked for")


if __name__ == "__main__":
    run_script(main)
