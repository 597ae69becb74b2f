"""Showing tokens as text: each token id's own string, and a context with the tokens where a latent fires
marked by brackets and their activation, shaded with ANSI colours when the terminal shows them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# Newlines and tabs inside a token would break a one-line context; shown as visible marks instead.
_VISIBLE = str.maketrans({"\n": "↵", "\r": "", "\t": "⇥"})

# xterm-256 background colours from pale yellow to deep orange, for activations from small to the latent's max.
_SHADES = (230, 229, 222, 221, 215, 214, 208, 202)


def token_strings(tokenizer, ids: Iterable[int]) -> dict[int, str]:
    """Each distinct id decoded on its own (a word piece keeps its leading space), newlines made visible."""
    return {i: tokenizer.decode([i]).translate(_VISIBLE) for i in sorted(set(ids))}


def _shade(fraction: float) -> str:
    colour = _SHADES[min(int(fraction * len(_SHADES)), len(_SHADES) - 1)]
    return f"\x1b[48;5;{colour}m\x1b[30m"


def marked_context(tokens: Sequence[str], acts: Sequence[float], scale: float, colour: bool) -> str:
    """One line: tokens joined, each token with a positive activation written ``[token value]``.

    With ``colour``, marked tokens are also shaded by ``act / scale`` (``scale``: the latent's max activation).
    A token's leading spaces stay outside its brackets so the text keeps its shape.
    """
    parts = []
    for token, act in zip(tokens, acts):
        if act <= 0:
            parts.append(token)
            continue
        word = token.lstrip(" ")
        mark = f"[{word} {act:.3g}]"
        if colour:
            mark = f"{_shade(act / scale if scale > 0 else 1.0)}{mark}\x1b[0m"
        parts.append(" " * (len(token) - len(word)) + mark)
    return "".join(parts)


def latent_text(record: dict, colour: bool) -> str:
    """A latent's block for the terminal: a header line, then one marked line per top context."""
    if not record["contexts"]:
        return f"latent {record['latent']}: never fired"
    header = (
        f"latent {record['latent']}: fires on {100 * record['frequency']:.3g}% of tokens "
        f"({record['fired_tokens']:,}), max {record['max_activation']:.3g}"
    )
    lines = [
        f"  {context['activation']:7.3g}  "
        + marked_context(context["tokens"], context["acts"], record["max_activation"], colour)
        for context in record["contexts"]
    ]
    return "\n".join([header, *lines])
