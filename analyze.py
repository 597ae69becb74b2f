"""Feature analysis of a dictionary: one streaming pass, stored per latent in a feature database, queried fast.

    python analyze.py [--params params.json] [run] [--dictionary DIR] [--tokens N]
    python analyze.py show --latent N          one latent: statistics, explanation, DLA tokens, contexts by level
    python analyze.py search TEXT [--limit N]  latents whose explanation, top tokens or promoted tokens hold TEXT
    python analyze.py explain [--latents SPEC] explanations and detection scores from an OpenAI-compatible endpoint

`run` (the default) scans analysis.tokens of the corpus and keeps, for every latent, its frequency, max and mean
activation, histogram, top contexts, contexts sampled at magnitude levels of its max and windows where it never
fires, each context with its whole window; adds its direct logit attribution; and upserts the records into the
feature database (SQLite at <dictionary>/analysis/features.sqlite, or MongoDB when analysis.mongo_uri is set).
`run` and `explain` (re)write features.html and params.json in <dictionary>/analysis/ (analysis.output_dir).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from tqdm import tqdm

from dictlearn.analysis.auto_interp import ChatClient, interpret
from dictlearn.analysis.dictionary_on_model import open_dictionary
from dictlearn.analysis.feature_db import (
    FeatureStore,
    database_path,
    dictionary_fingerprint,
    dictionary_name,
    open_feature_store,
    stored_analysis,
)
from dictlearn.analysis.feature_records import AnalysisPass, RecordScores, analysis_records
from dictlearn.analysis.logit_attribution import logit_attribution
from dictlearn.analysis.top_contexts import check_latent_selection, chosen_latents, corpus_windows, scan
from dictlearn.cli import argument_parser, positive_int, quiet_transformers, threads_from_env
from dictlearn.errors import UserError, run_script
from dictlearn.files import atomic_write, check_output_folder, write_json
from dictlearn.lm.text import check_source
from dictlearn.locks import output_lock
from dictlearn.params import AnalysisParams, Params, load_params
from dictlearn.report.feature_display import latent_report, page_document, search_line
from dictlearn.report.feature_page import render_page
from dictlearn.report.token_display import token_strings


def output_folder(settings: AnalysisParams) -> Path:
    return Path(settings.output_dir or Path(settings.dictionary) / "analysis")


def writing(settings: AnalysisParams):
    """Hold the lock of what `run` and `explain` write: the SQLite file, or the output folder with MongoDB (whose
    server orders the writes itself); first refuse an output folder that is a file."""
    check_output_folder(output_folder(settings), "analysis.output_dir")
    if settings.mongo_uri:
        return output_lock(output_folder(settings), "analysis folder")
    return output_lock(database_path(settings), "feature database")


def write_page(store: FeatureStore, key: str, meta: dict, settings: AnalysisParams) -> Path:
    document = page_document(
        meta, store.latents(key), store.windows(key), settings.context_before, settings.context_after
    )
    path = output_folder(settings) / "features.html"
    atomic_write(path, lambda temp: temp.write_text(render_page(document), encoding="utf-8"))
    return path


def run(params: Params, settings: AnalysisParams, key: str) -> None:
    check_source(params.data)
    opened = open_dictionary(params, settings.dictionary)
    if opened.note:
        print(opened.note)
    params = opened.params.with_overrides(analysis=settings.model_dump())
    lm, sae = opened.lm, opened.sae
    store = open_feature_store(settings, create=True)

    analysis = AnalysisPass(sae.num_latents, settings, params.data.context_size, device=lm.device)
    windows = corpus_windows(params.data, lm.tokenizer, settings.tokens)
    start = time.perf_counter()
    with tqdm(total=settings.tokens, unit="tok", desc="scanning") as bar:
        scan(lm, opened.hook, sae, windows, settings.batch_size, analysis, lambda a: bar.update(a.tokens_seen - bar.n))
    seconds = time.perf_counter() - start
    dla = logit_attribution(lm.model, opened.hook, sae.W_dec, settings.dla_tokens, len(lm.tokenizer))
    records, window_text = analysis_records(
        analysis, dla, settings.levels, lambda ids: token_strings(lm.tokenizer, ids)
    )

    meta = {
        "dictionary": dictionary_name(settings.dictionary),
        "fingerprint": key,
        "folder": str(Path(settings.dictionary).resolve()),
        "model": params.model.name,
        "hook": opened.hook.name,
        "num_latents": sae.num_latents,
        "architecture": sae.architecture,
        "k": sae.config().get("k"),
        "tokens_scanned": analysis.tokens_seen,
        "context_size": params.data.context_size,
        "top_n": settings.top_n,
        "levels": settings.levels,
        "per_level": settings.per_level,
    }
    store.write_analysis(key, meta, records, window_text)
    page = write_page(store, key, meta, settings)
    write_json(output_folder(settings) / "params.json", params.model_dump(mode="json"))
    fired = sum(1 for record in records if record["fired_tokens"])
    print(
        f"scanned {analysis.tokens_seen:,} tokens in {seconds:.1f} s ({analysis.tokens_seen / seconds:,.0f} tokens/s); "
        f"{fired:,} of {sae.num_latents:,} latents fired"
    )
    print(f"wrote {len(records):,} latent records to {store.location}; page {page}")


def show(settings: AnalysisParams, latent: int) -> None:
    store = open_feature_store(settings, create=False)
    key = dictionary_fingerprint(settings.dictionary)
    meta = stored_analysis(store, key, settings.dictionary)
    if not 0 <= latent < meta["num_latents"]:
        raise UserError(
            f"--latent: latent {latent} does not exist; this dictionary has latents 0..{meta['num_latents'] - 1}"
        )
    [record] = store.latents(key, [latent])
    used = {c["window"] for c in record["top_contexts"]}
    used |= {c["window"] for level in record["levels"] for c in level["contexts"]}
    print(latent_report(record, store.windows(key, used), meta, settings.context_before, settings.context_after))


def search(settings: AnalysisParams, text: str, limit: int) -> None:
    store = open_feature_store(settings, create=False)
    key = dictionary_fingerprint(settings.dictionary)
    stored_analysis(store, key, settings.dictionary)
    hits = store.search(key, text, limit)
    for record in hits:
        print(search_line(record))
    print(f"{len(hits)} latent(s) match {text!r}" + (f" (showing the first {limit})" if len(hits) == limit else ""))


def explain(params: Params, settings: AnalysisParams, key: str) -> None:
    ai = settings.auto_interp
    store = open_feature_store(settings, create=False)
    meta = stored_analysis(store, key, settings.dictionary)
    check_latent_selection(ai.latents, meta["num_latents"], "analysis.auto_interp.latents")
    records = store.latents(key)
    windows = store.windows(key)
    client = ChatClient(ai)
    for latent in chosen_latents(ai.latents, RecordScores.of(records)):
        record = records[latent]
        if not record["top_contexts"]:
            print(f"latent {latent}: never fired; not explained")
            continue
        result = interpret(client, record, windows, settings, random.Random(f"{settings.seed}/{latent}"))
        fields = {**result._asdict(), "explained_by": ai.model}
        store.set_explanation(key, latent, fields)
        score = "no contexts to score" if result.detection_accuracy is None else f"{result.detection_accuracy:.2f}"
        print(f"latent {latent}: {result.explanation!r} (detection accuracy {score})")
    page = write_page(store, key, meta, settings)
    resolved = params.with_overrides(analysis=settings.model_dump())
    write_json(output_folder(settings) / "params.json", resolved.model_dump(mode="json"))
    print(f"explanations in {store.location}; page {page}")


def main() -> None:
    parser = argument_parser(__doc__.strip().splitlines()[0])
    parser.set_defaults(dictionary=None, tokens=None)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dictionary", help="dictionary folder (default: analysis.dictionary)")
    commands = parser.add_subparsers(dest="command")
    run_parser = commands.add_parser("run", parents=[common], help="analyse and fill the feature database")
    run_parser.add_argument("--tokens", type=positive_int, help="corpus tokens to scan (default: analysis.tokens)")
    show_parser = commands.add_parser("show", parents=[common], help="print one latent's record")
    show_parser.add_argument("--latent", type=int, required=True, help="latent id")
    search_parser = commands.add_parser("search", parents=[common], help="search explanations and top tokens")
    search_parser.add_argument("text", help="text to look for (any case)")
    search_parser.add_argument("--limit", type=positive_int, default=20, help="most latents listed (default 20)")
    explain_parser = commands.add_parser("explain", parents=[common], help="explain and score latents")
    explain_parser.add_argument("--latents", help="latents to explain (default: analysis.auto_interp.latents)")
    args = parser.parse_args()
    threads_from_env()
    quiet_transformers()

    params = load_params(args.params)
    given = {"dictionary": args.dictionary, "tokens": args.tokens}
    analysis = {k: v for k, v in given.items() if v is not None}
    if getattr(args, "latents", None) is not None:
        analysis["auto_interp"] = {**params.analysis.auto_interp.model_dump(), "latents": args.latents}
    # The dictionary's model and hook fill in what the params file leaves out: open_dictionary reads the file's
    # own fields, so the overrides go to the settings alone.
    settings = params.with_overrides(analysis=analysis).analysis
    if args.command == "show":
        show(settings, args.latent)
    elif args.command == "search":
        search(settings, args.text, args.limit)
    else:
        # The fingerprint first: it refuses a folder with no dictionary before the lock makes any folder.
        key = dictionary_fingerprint(settings.dictionary)
        with writing(settings):
            (explain if args.command == "explain" else run)(params, settings, key)


if __name__ == "__main__":
    run_script(main)
