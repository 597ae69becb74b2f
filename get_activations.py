"""Harvest activations at the params' hooks (one, a list or a pattern) into sharded on-disk stores, one
folder per hook, all from one forward per batch; a killed harvest continues from its last complete shard.

python get_activations.py [--params params.json] [--tokens N] [--out FOLDER] [--overwrite]
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from dictlearn.activations.harvest import LiveActivations
from dictlearn.activations.store import META, ActivationStore, StoreWriter, harvest_identity, write_stores
from dictlearn.cli import argument_parser, positive_int, prepare_hooks, store_path, threads_from_env
from dictlearn.errors import UserError, run_script
from dictlearn.files import check_output_folder
from dictlearn.lm.models import hook_width
from dictlearn.lm.text import training_windows
from dictlearn.locks import output_lock
from dictlearn.report.common import format_bytes, print_table


def main() -> None:
    parser = argument_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--tokens", type=positive_int, help="rows to write per hook (default: store.tokens)")
    parser.add_argument("--out", help="store folder (default: store.path); one hook only")
    parser.add_argument(
        "--overwrite", action="store_true", help="harvest again from the start, even if the store is up to date"
    )
    args = parser.parse_args()
    threads_from_env()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every rank would write the same store; a sharded harvest across processes is not built yet.
        raise UserError(
            "get_activations.py harvests in one process; run it without torchrun (training_script.py takes torchrun)"
        )
    params, lm, hooks = prepare_hooks(args.params)
    if len(hooks) > 1 and (args.out or "{hook}" not in params.store.path):
        raise UserError(
            f"store.path: {len(hooks)} hooks need a folder each; put {{hook}} in store.path "
            f"(found {args.out or params.store.path!r})"
        )
    tokens = args.tokens or params.store.tokens
    outs = {hook.name: Path(args.out) if args.out else store_path(params, lm, hook) for hook in hooks}
    identities = {hook.name: harvest_identity(params, hook.name, hook_width(lm.config, hook)) for hook in hooks}
    for out in outs.values():
        check_output_folder(out, "activation store")
    with ExitStack() as locks:
        for out in outs.values():
            locks.enter_context(output_lock(out, "activation store"))
        harvest(params, lm, hooks, outs, identities, tokens, args.overwrite)


def harvest(params, lm, hooks, outs: dict[str, Path], identities: dict[str, dict], tokens: int, overwrite: bool):
    # --overwrite never opens the old store: it is how a broken one (bad meta.json, a lost shard) is replaced.
    wanted = []
    for hook in hooks:
        out = outs[hook.name]
        if not overwrite and (out / META).is_file() and ActivationStore(out).holds(identities[hook.name], tokens):
            print(
                f"activation store {out} is up to date ({len(ActivationStore(out)):,} tokens); --overwrite harvests again"
            )
        else:
            wanted.append(hook)
    if not wanted:
        return
    source = LiveActivations(
        lm,
        wanted,
        lambda: training_windows(params.data, lm.tokenizer),
        params.buffer.model_batch_size,
        params.buffer.exclude_special_tokens,
    )
    writers = {}
    for hook in wanted:
        identity = identities[hook.name]
        meta = {"model": params.model.name, "hook": hook.name, "d_in": identity["d_in"]}
        meta.update(context_size=params.data.context_size, identity=identity)
        writers[hook.name] = StoreWriter(
            outs[hook.name], meta, params.store.shard_tokens, getattr(torch, params.store.dtype), resume=not overwrite
        )
    done = min(writer.tokens for writer in writers.values())
    if done:
        print(f"continuing the killed harvest from its last complete shard ({done:,} of {tokens:,} tokens)")
    start = time.perf_counter()
    description = f"harvest {wanted[0].name}" + (f" (+{len(wanted) - 1} hooks)" if len(wanted) > 1 else "")
    with tqdm(total=tokens, unit="tok", desc=description) as bar:
        metas = write_stores(source.iter_chunk_sets, writers, tokens, bar.update)
    seconds = time.perf_counter() - start
    meta = next(iter(metas.values()))
    written = meta["tokens"] - done
    print_table(
        [
            ["store", "\n".join(str(outs[hook.name]) for hook in wanted)],
            ["model", params.model.name],
            ["hooks", "\n".join(hook.name for hook in wanted)],
            ["d_in", meta["d_in"]],
            ["tokens", f"{meta['tokens']:,}" + (f" ({done:,} from the killed run)" if done else "")],
            ["shards", len(meta["shards"])],
            ["seconds", f"{seconds:.1f}"],
            ["tokens/s", f"{written / seconds:,.0f}"],
            ["bytes", format_bytes(sum(writer.bytes for writer in writers.values()))],
        ],
        headers=["activation store", ""],
    )
    if meta["tokens"] < tokens:
        print(f"note: the text source ran out after {meta['tokens']:,} of the {tokens:,} tokens asked for")


if __name__ == "__main__":
    run_script(main)
