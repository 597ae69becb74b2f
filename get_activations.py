"""Harvest activations at the params' hooks (one, a list or a pattern) into sharded on-disk stores, one
folder per hook, all from one forward per batch; a killed harvest continues from its last complete shard.

python get_activations.py [--params params.json] [--tokens N] [--out FOLDER] [--overwrite]
torchrun --nproc_per_node N get_activations.py ...   (rank r writes shards r, r + N, ... of the same store)
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from dictlearn.activations.harvest import LiveActivations
from dictlearn.activations.ranks import write_stores_on_ranks
from dictlearn.activations.store import META, ActivationStore, StoreWriter, harvest_identity, write_stores
from dictlearn.cli import (
    argument_parser,
    only_first_rank_prints,
    positive_int,
    prepare_hooks,
    store_path,
    threads_from_env,
)
from dictlearn.errors import UserError, run_script
from dictlearn.files import check_output_folder
from dictlearn.lm.models import hook_width
from dictlearn.lm.text import training_windows
from dictlearn.locks import output_lock
from dictlearn.params import load_params
from dictlearn.report.common import format_bytes, print_table
from dictlearn.training.distributed import Distributed


def main() -> None:
    parser = argument_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--tokens", type=positive_int, help="rows to write per hook (default: store.tokens)")
    parser.add_argument("--out", help="store folder (default: store.path); one hook only")
    parser.add_argument(
        "--overwrite", action="store_true", help="harvest again from the start, even if the store is up to date"
    )
    args = parser.parse_args()
    threads_from_env()
    distributed = Distributed.from_env(load_params(args.params).model.device)
    only_first_rank_prints(distributed)
    params, lm, hooks = prepare_hooks(args.params)
    if len(hooks) > 1 and (args.out or "{hook}" not in params.store.path):
        raise UserError(
            f"store.path: {len(hooks)} hooks need a folder each; put {{hook}} in store.path "
            f"(found {args.out or params.store.path!r})"
        )
    tokens = args.tokens or params.store.tokens
    outs = {hook.name: Path(args.out) if args.out else store_path(params, lm, hook) for hook in hooks}
    identities = {hook.name: harvest_identity(params, hook.name, hook_width(lm.config, hook)) for hook in hooks}
    with ExitStack() as locks:

        def claim() -> None:
            for out in outs.values():
                check_output_folder(out, "activation store")
            for out in outs.values():
                locks.enter_context(output_lock(out, "activation store"))

        distributed.on_first(claim)
        harvest(params, lm, hooks, outs, identities, tokens, args.overwrite, distributed)
    distributed.close()


def harvest(
    params,
    lm,
    hooks,
    outs: dict[str, Path],
    identities: dict[str, dict],
    tokens: int,
    overwrite: bool,
    distributed: Distributed,
):
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
    stores = {}
    for hook in wanted:
        identity = identities[hook.name]
        meta = {"model": params.model.name, "hook": hook.name, "d_in": identity["d_in"]}
        meta.update(context_size=params.data.context_size, identity=identity)
        stores[hook.name] = (outs[hook.name], meta)
    shard_tokens, dtype = params.store.shard_tokens, getattr(torch, params.store.dtype)
    start = time.perf_counter()
    description = f"harvest {wanted[0].name}" + (f" (+{len(wanted) - 1} hooks)" if len(wanted) > 1 else "")
    if distributed.world_size > 1:
        # The bar counts rank 0's own rows: about 1/N of them.
        with tqdm(
            unit="tok", desc=f"{description}, rank 0 of {distributed.world_size}", disable=not distributed.is_first
        ) as bar:
            metas, done = write_stores_on_ranks(
                source, stores, shard_tokens, dtype, tokens, distributed, resume=not overwrite, on_rows=bar.update
            )
    else:
        writers = {
            name: StoreWriter(out, meta, shard_tokens, dtype, resume=not overwrite)
            for name, (out, meta) in stores.items()
        }
        done = min(writer.tokens for writer in writers.values())
        if done:
            print(f"continuing the killed harvest from its last complete shard ({done:,} of {tokens:,} tokens)")
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
            [
                "bytes",
                format_bytes(
                    sum((outs[name] / s["file"]).stat().st_size for name in metas for s in metas[name]["shards"])
                ),
            ],
        ],
        headers=["activation store", ""],
    )
    if meta["tokens"] < tokens:
        print(f"note: the text source ran out after {meta['tokens']:,} of the {tokens:,} tokens asked for")


if __name__ == "__main__":
    run_script(main)
