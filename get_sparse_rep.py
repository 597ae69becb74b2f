"""Sparse codes of sentences: each sentence of a CSV run to the hook, averaged over its tokens, and encoded.

    python get_sparse_rep.py [--params params.json] [--dictionary DIR] [--csv PATH] [--column NAME] [--per-token]

Prints per-sentence statistics of the original activations and of the sparse codes, their summary, and the
latents each group of sentences shares; writes codes.csv, summary.csv, groups.csv, values.png, heatmap.png and
the resolved params.json to <dictionary>/sentences/<csv name>/ (sentences.output_dir).
"""

from __future__ import annotations

from dictlearn.analysis.code_stats import active_matrix
from dictlearn.analysis.dictionary_on_model import open_dictionary
from dictlearn.analysis.sentences import (
    encode_sentences,
    read_sentences,
    skipped_note,
    tokenize_sentences,
    truncated_note,
)
from dictlearn.cli import argument_parser, quiet_transformers, threads_from_env
from dictlearn.errors import run_script
from dictlearn.files import atomic_write, check_output_folder, write_json
from dictlearn.params import load_params
from dictlearn.report.common import print_table
from dictlearn.report.sentence_report import (
    codes_frame,
    groups_frame,
    heatmap_latents,
    output_folder,
    plot_heatmap,
    plot_values,
    row_tables,
    summary_frame,
    summary_table,
)


def main() -> None:
    parser = argument_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--dictionary", help="dictionary folder (default: sentences.dictionary)")
    parser.add_argument("--csv", help="CSV of sentences (default: sentences.csv)")
    parser.add_argument("--column", help="column holding the sentences (default: sentences.column)")
    parser.add_argument("--per-token", action="store_true", default=None, help="one code per token, not averaged")
    args = parser.parse_args()
    threads_from_env()
    quiet_transformers()
    params = load_params(args.params)
    given = {"dictionary": args.dictionary, "csv": args.csv, "column": args.column, "per_token": args.per_token}
    settings = params.with_overrides(sentences={k: v for k, v in given.items() if v is not None}).sentences
    folder = output_folder(settings)
    check_output_folder(folder, "sentences.output_dir")
    table = read_sentences(settings.csv, settings.column, settings.group_column)
    opened = open_dictionary(params, settings.dictionary)
    if opened.note:
        print(opened.note)
    params = opened.params.with_overrides(sentences=settings.model_dump())
    token_lists, truncated = tokenize_sentences(
        opened.lm.tokenizer, table.sentences, params.data.context_size, params.data.prepend_bos
    )
    codes = encode_sentences(opened.lm, opened.hook, opened.sae, token_lists, settings.batch_size, settings.per_token)

    num_latents = opened.sae.num_latents
    codes_RF = active_matrix(codes.top_acts_RK, codes.top_indices_RK, num_latents)
    frame = codes_frame(table, codes, num_latents, settings.top_latents)
    summary = summary_frame(frame)
    groups = groups_frame(frame, codes_RF)
    print(
        f"{len(table.sentences)} sentences from {settings.csv}; dictionary {settings.dictionary} at {opened.hook.name}"
    )
    for note in (skipped_note(table, settings.column), truncated_note(truncated, params.data.context_size)):
        if note:
            print(f"note: {note}")
    for title, headers, rows in row_tables(frame, settings.per_token):
        print(f"\n{title}")
        print_table(rows, headers)
    print(f"\nsummary over {len(frame)} {'tokens' if settings.per_token else 'sentences'}")
    print_table(*summary_table(summary, len(frame)))
    if groups is not None:
        print("\nlatents shared within each group (active in the group's rows more than in the others')")
        print_table(groups.values.tolist(), ["group", "latent", "active in group", "active outside", "mean weight"])

    outputs = {"codes.csv": frame, "summary.csv": summary, **({"groups.csv": groups} if groups is not None else {})}
    for name, data in outputs.items():
        atomic_write(folder / name, lambda temp, data=data: data.to_csv(temp, index=False))
    plot_values(codes, num_latents, folder / "values.png")
    written = [*outputs, "values.png"]
    if latents := heatmap_latents(codes_RF, groups):
        plot_heatmap(frame, codes_RF, latents, folder / "heatmap.png")
        written.append("heatmap.png")
    write_json(folder / "params.json", params.model_dump(mode="json"))
    print(f"\nwrote {', '.join([*written, 'params.json'])} to {folder}")


if __name__ == "__main__":
    run_script(main)
