"""Showing feature records: one latent's report for the terminal (statistics, explanation, DLA tokens, top
contexts and contexts by magnitude level), a line per search hit, and the document the HTML page is drawn from."""

from __future__ import annotations

import math

from dictlearn.analysis.feature_records import context_view
from dictlearn.report.token_display import marked_context

_BARS = "▁▂▃▄▅▆▇█"

# Record fields the page shows as they are (contexts are cut around their maximum first).
_PAGE_FIELDS = (
    "latent",
    "fired_tokens",
    "frequency",
    "max_activation",
    "mean_activation",
    "histogram",
    "dla",
    "explanation",
    "explained_by",
    "detection_accuracy",
    "detection_contexts",
)


def sparkline(counts: list[int]) -> str:
    """The histogram's bars up to its last non-empty one, as block characters (an empty bar is a space)."""
    used = max((i + 1 for i, count in enumerate(counts) if count), default=0)
    peak = max(counts[:used], default=0)
    return "".join(_BARS[math.ceil(c / peak * len(_BARS)) - 1] if c else " " for c in counts[:used])


def _tokens(entries: list[dict]) -> str:
    return "  ".join(f"{entry['token']!r} {entry['logit']:.3g}" for entry in entries)


def _explanation(record: dict) -> str:
    accuracy = record["detection_accuracy"]
    score = (
        f" (detection accuracy {accuracy:.2f} on {record['detection_contexts']} contexts, {record['explained_by']})"
        if accuracy is not None
        else f" ({record['explained_by']})"
    )
    return f"{record['explanation']!r}{score}"


def latent_report(record: dict, windows: dict[int, list[str]], meta: dict, before: int, after: int) -> str:
    """Everything the database holds on one latent, contexts cut to ``before`` / ``after`` tokens around their
    maximum and their firing tokens marked ``[token value]``."""
    scale = record["max_activation"]

    def lines(contexts: list[dict]) -> list[str]:
        views = [context_view(c, windows[c["window"]], before, after) for c in contexts]
        return [
            f"  {v['activation']:7.3g}  " + marked_context(v["tokens"], v["acts"], scale, colour=False) for v in views
        ]

    out = [f"latent {record['latent']} of {meta['dictionary']} ({meta['tokens_scanned']:,} tokens scanned)"]
    if record["fired_tokens"]:
        histogram = record["histogram"]
        used = len(sparkline(histogram["counts"]))
        out += [
            f"  fires on {100 * record['frequency']:.3g}% of tokens ({record['fired_tokens']:,}); "
            f"max {record['max_activation']:.3g}, mean {record['mean_activation']:.3g}",
            f"  histogram 0 to {used * histogram['bin_width']:.3g}: {sparkline(histogram['counts'])}",
        ]
    else:
        out.append("  never fired in the tokens scanned")
    if record["explanation"] is not None:
        out.append(f"  explanation: {_explanation(record)}")
    out += [
        f"  promotes:   {_tokens(record['dla']['promoted'])}",
        f"  suppresses: {_tokens(record['dla']['suppressed'])}",
    ]
    if record["top_contexts"]:
        out += ["top contexts", *lines(record["top_contexts"])]
    for level in reversed(record["levels"]):
        if level["contexts"]:
            low, high = level["low"] * scale, level["high"] * scale
            out += [
                f"at {level['low']:g}-{level['high']:g} of the max ({low:.3g} to {high:.3g})",
                *lines(level["contexts"]),
            ]
    return "\n".join(out)


def search_line(record: dict) -> str:
    """One line per hit: the latent, how often it fires, and its explanation or top tokens."""
    said = _explanation(record) if record["explanation"] is not None else " ".join(record["top_tokens"][:8])
    return f"{record['latent']:>7}  {100 * record['frequency']:7.3g}%  max {record['max_activation']:<7.3g} {said}"


def page_document(meta: dict, records: list[dict], windows: dict[int, list[str]], before: int, after: int) -> dict:
    """The document ``feature_page.render_page`` draws: ``meta`` and, per latent, its statistics, contexts cut
    around their maximum (top contexts as ``contexts``, and ``levels``), DLA tokens and explanation."""

    def views(contexts: list[dict]) -> list[dict]:
        return [context_view(c, windows[c["window"]], before, after) for c in contexts]

    latents = [
        {
            **{key: record[key] for key in _PAGE_FIELDS},
            "contexts": views(record["top_contexts"]),
            "levels": [{**level, "contexts": views(level["contexts"])} for level in record["levels"]],
        }
        for record in records
    ]
    return {**meta, "context_before": before, "context_after": after, "latents": latents}
