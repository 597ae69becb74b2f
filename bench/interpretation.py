"""Speed of interpretation.py's scan on the embedded default: tokens/s of the whole scan (forward to the hook,
encode, merge into the top-N tables) beside the forward alone and the forward plus encode on the same windows,
so the cost of the bookkeeping shows; and the size of the tables, which does not grow with the tokens scanned.

    python bench/interpretation.py [--params params.json] [--dictionary DIR] [--tokens 16384]

Windows are tokenised before the clock starts for the first three rows; the last row is the scan as
interpretation.py runs it, tokenising on the fly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dictlearn.activations.harvest import batched, special_token_ids  # noqa: E402
from dictlearn.analysis.dictionary_on_model import open_dictionary  # noqa: E402
from dictlearn.analysis.top_contexts import TopContexts, corpus_windows, scan  # noqa: E402
from dictlearn.cli import quiet_transformers, threads_from_env  # noqa: E402
from dictlearn.errors import run_script  # noqa: E402
from dictlearn.lm.models import capture_activations  # noqa: E402
from dictlearn.params import load_params  # noqa: E402
from dictlearn.report.common import format_bytes, print_table  # noqa: E402


def timed(run, device: torch.device) -> float:
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.json")
    parser.add_argument("--dictionary", help="dictionary folder (default: interpretation.dictionary)")
    parser.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args()
    threads_from_env()
    quiet_transformers()
    params = load_params(args.params)
    opened = open_dictionary(params, args.dictionary or params.interpretation.dictionary)
    lm, hook, sae, settings = opened.lm, opened.hook, opened.sae, params.interpretation
    windows = list(corpus_windows(params.data, lm.tokenizer, args.tokens))
    batches = [torch.tensor(batch) for batch in batched(windows, settings.batch_size)]

    def new_tables() -> TopContexts:
        return TopContexts(
            sae.num_latents,
            settings.top_n,
            settings.context_before,
            settings.context_after,
            settings.histogram_bins,
            device=lm.device,
        )

    @torch.inference_mode()
    def forward(encode: bool) -> None:
        for input_ids in batches:
            x_BSD = capture_activations(lm.model, hook, input_ids.to(lm.device))
            if encode:
                sae.encode(x_BSD.flatten(0, 1))

    tables = new_tables()
    excluded = special_token_ids(lm.tokenizer)
    text_tokens = sum(int((~torch.isin(input_ids, excluded)).sum()) for input_ids in batches)
    rows = []
    for name, run in [
        ("forward to the hook", lambda: forward(encode=False)),
        ("forward + encode", lambda: forward(encode=True)),
        ("scan: forward + encode + top-N tables", lambda: scan(lm, hook, sae, windows, settings.batch_size, tables)),
        (
            "interpretation.py scan (tokenising too)",
            lambda: scan(
                lm, hook, sae, corpus_windows(params.data, lm.tokenizer, args.tokens), settings.batch_size, new_tables()
            ),
        ),
    ]:
        seconds = timed(run, lm.device)
        rows.append([name, f"{text_tokens:,}", f"{seconds:.2f}", f"{text_tokens / seconds:,.0f}"])
    table_bytes = sum(
        t.numel() * t.element_size()
        for t in (tables.values_FN, tables.tokens_FNW, tables.acts_FNW, tables.fired_F, tables.histogram.counts_FH)
    )
    print(
        f"device: {lm.device}, torch threads: {torch.get_num_threads()}, dictionary: {sae.num_latents} latents "
        f"(k={int(sae.k)}) at {hook.name}, batch {settings.batch_size} windows of {params.data.context_size}"
    )
    print_table(rows, headers=["run", "text tokens", "seconds", "tokens/s"])
    print(
        f"top-N tables: {format_bytes(table_bytes)} for top_n={settings.top_n}, "
        f"{settings.context_before + 1 + settings.context_after} tokens per context (fixed, whatever the tokens scanned)"
    )


if __name__ == "__main__":
    run_script(main)
