"""Top-activating texts of a dictionary's latents, gathered in one streaming pass over a corpus.

    python interpretation.py [--params params.json] [--dictionary DIR] [--latents SPEC] [--tokens N]

SPEC is 'first:384' (the default), 'frequent:N', 'strongest:N' or ids like '1,2,3'. Prints each chosen latent's
top contexts with the tokens it fires on marked [token value] (shaded when stdout is a terminal), and writes
latents.json, latents.html (self-contained, works offline) and the resolved params.json to
<dictionary>/interpretation/ (interpretation.output_dir).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from dictlearn.analysis.dictionary_on_model import open_dictionary
from dictlearn.analysis.top_contexts import (
    TopContexts,
    check_latent_selection,
    chosen_latents,
    corpus_windows,
    latent_records,
    scan,
)
from dictlearn.cli import argument_parser, positive_int, quiet_transformers, threads_from_env
from dictlearn.errors import run_script
from dictlearn.files import atomic_write, check_output_folder, write_json
from dictlearn.lm.text import check_source
from dictlearn.params import load_params
from dictlearn.report.feature_page import render_page
from dictlearn.report.token_display import latent_text, token_strings


def main() -> None:
    parser = argument_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--dictionary", help="dictionary folder (default: interpretation.dictionary)")
    parser.add_argument("--latents", help="latents to print (default: interpretation.latents)")
    parser.add_argument("--tokens", type=positive_int, help="corpus tokens to scan (default: interpretation.tokens)")
    args = parser.parse_args()
    threads_from_env()
    quiet_transformers()
    params = load_params(args.params)
    given = {"dictionary": args.dictionary, "latents": args.latents, "tokens": args.tokens}
    settings = params.with_overrides(interpretation={k: v for k, v in given.items() if v is not None}).interpretation
    folder = Path(settings.output_dir or Path(settings.dictionary) / "interpretation")
    check_output_folder(folder, "interpretation.output_dir")
    check_source(params.data)
    opened = open_dictionary(params, settings.dictionary)
    if opened.note:
        print(opened.note)
    check_latent_selection(settings.latents, opened.sae.num_latents)
    params = opened.params.with_overrides(interpretation=settings.model_dump())
    lm = opened.lm

    top = TopContexts(
        opened.sae.num_latents,
        settings.top_n,
        settings.context_before,
        settings.context_after,
        settings.histogram_bins,
        device=lm.device,
    )
    windows = corpus_windows(params.data, lm.tokenizer, settings.tokens)
    start = time.perf_counter()
    with tqdm(total=settings.tokens, unit="tok", desc="scanning") as bar:
        scan(
            lm, opened.hook, opened.sae, windows, settings.batch_size, top, lambda t: bar.update(t.tokens_seen - bar.n)
        )
    seconds = time.perf_counter() - start

    document = {
        "dictionary": settings.dictionary,
        "model": params.model.name,
        "hook": opened.hook.name,
        "num_latents": opened.sae.num_latents,
        "architecture": opened.sae.architecture,
        "k": opened.sae.config().get("k"),
        "tokens_scanned": top.tokens_seen,
        "top_n": settings.top_n,
        "context_before": settings.context_before,
        "context_after": settings.context_after,
        "latents": latent_records(top, lambda ids: token_strings(lm.tokenizer, ids)),
    }
    colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
    for latent in chosen_latents(settings.latents, top):
        print(latent_text(document["latents"][latent], colour), end="\n\n")

    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    atomic_write(folder / "latents.json", lambda temp: temp.write_text(text + "\n", encoding="utf-8"))
    atomic_write(folder / "latents.html", lambda temp: temp.write_text(render_page(document), encoding="utf-8"))
    write_json(folder / "params.json", params.model_dump(mode="json"))
    alive = sum(1 for record in document["latents"] if record["contexts"])
    print(
        f"scanned {top.tokens_seen:,} tokens in {seconds:.1f} s ({top.tokens_seen / seconds:,.0f} tokens/s); "
        f"{alive:,} of {opened.sae.num_latents:,} latents fired"
    )
    print(f"wrote latents.json, latents.html, params.json to {folder}")


if __name__ == "__main__":
    run_script(main)
