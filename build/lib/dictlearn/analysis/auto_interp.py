"""Automated interpretation: an OpenAI-compatible chat-completions client (the standard library's urllib), an
explanation of a latent written from its top contexts, and the explanation's detection score.

The explanation follows Bills et al. 2023 ("Language models can explain neurons in language models"): the model
reads the top contexts, the tokens where the latent fires written ``[token activation]``, and names what they
share in a short phrase. Detection follows Paulo et al. 2024 ("Automatically Interpreting Millions of Features
in Large Language Models", section 3.3): given only the explanation, the model reads contexts it was not shown,
some sampled at the latent's magnitude levels and some where the latent never fires, shuffled, and says which
activate it; the score is the fraction it gets right (0.5 is chance when the two groups are the same size).

The client reads its key from the environment variable that params name and sends it as a bearer token; the key
is never written anywhere, and is replaced by ``***`` in every error and reply text we print or store (a server's
error body may echo it back). It spaces requests to the rate limit, gives each a timeout, and retries the failures
that may pass (unreachable, timeout, HTTP 429 and 5xx) after exponential back-off. A failure that persists, and
one that will not pass (another HTTP error, a reply that is not a chat completion), is a ``UserError``.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import NamedTuple

from dictlearn.analysis.feature_records import context_view
from dictlearn.errors import UserError
from dictlearn.params import AnalysisParams, AutoInterpParams
from dictlearn.report.token_display import marked_context

# Longest explanation kept: a short phrase is asked for; a model that rambles is cut here.
MAX_EXPLANATION_CHARS = 300


class ChatClient:
    """``complete(messages)`` posts to ``<base_url>/chat/completions`` and returns the reply's text.

    ``sleep`` and ``clock`` are the waits and the time the rate limit and back-off use (tests pass their own)."""

    def __init__(
        self,
        settings: AutoInterpParams,
        sleep: Callable[[float], object] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.url = settings.base_url + "/chat/completions"
        self.sleep, self.clock = sleep, clock
        self.next_start = -float("inf")

    def _wait_for_turn(self) -> None:
        """Start requests at most ``requests_per_second`` apart."""
        now = self.clock()
        if now < self.next_start:
            self.sleep(self.next_start - now)
            now = self.next_start
        self.next_start = now + 1 / self.settings.requests_per_second

    @property
    def _key(self) -> str | None:
        return os.environ.get(self.settings.api_key_env) or None

    def redact(self, text: str) -> str:
        """``text`` with the API key replaced by ``***``."""
        return text.replace(self._key, "***") if self._key else text

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json"}
        if key := self._key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as response:
            return response.read()

    def _refusal(self, err: urllib.error.HTTPError) -> UserError:
        detail = self.redact(err.read().decode("utf-8", "replace")).strip().replace("\n", " ")[:200]
        advice = (
            f"set the environment variable {self.settings.api_key_env} to a valid key"
            if err.code in (401, 403)
            else "check analysis.auto_interp.base_url and model"
        )
        return UserError(f"analysis.auto_interp: {self.url} answered HTTP {err.code} ({detail}); {advice}")

    def complete(self, messages: list[dict]) -> str:
        settings = self.settings
        body = json.dumps(
            {
                "model": settings.model,
                "messages": messages,
                "temperature": 0,
                "max_tokens": settings.max_reply_tokens,
            }
        ).encode()
        tries = settings.retries + 1
        for attempt in range(tries):
            if attempt:
                self.sleep(settings.backoff_s * 2 ** (attempt - 1))
            self._wait_for_turn()
            try:
                raw = self._post(body)
                break
            except urllib.error.HTTPError as err:
                if err.code != 429 and err.code < 500:
                    raise self._refusal(err) from None
                failure = f"HTTP {err.code}"
            except urllib.error.URLError as err:
                failure = self.redact(str(err.reason))
            except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
                failure = self.redact(str(err)) or type(err).__name__
        else:
            raise UserError(
                f"analysis.auto_interp.base_url: no answer from {self.url} after {tries} tries ({failure}); "
                "is the server running?"
            )
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise UserError(f"analysis.auto_interp: the reply from {self.url} is not a chat completion") from None
        if not isinstance(content, str):
            # A reply cut by max_tokens, a refusal or a tool call can come with "content": null.
            raise UserError(
                f"analysis.auto_interp: the reply from {self.url} has no text (content is {json.dumps(content)}); "
                "check analysis.auto_interp.model and max_reply_tokens"
            )
        return self.redact(content)


EXPLAIN_SYSTEM = (
    "We are studying a feature of a language model. It fires on some tokens of a text. You see texts where it "
    "fires; each token it fires on is written [token activation], larger numbers meaning stronger firing. Say in "
    "one short phrase (at most 15 words) what the feature detects. Reply with the phrase alone."
)
DETECT_SYSTEM = (
    "We are studying a feature of a language model, described by an explanation. You see numbered texts. The "
    "feature fires somewhere in some of them and nowhere in the others. Using only the explanation, decide for "
    "each text whether the feature fires in it. Reply with a JSON list of 1 (fires) and 0 (does not), one per "
    "text in order, and nothing else."
)


def explanation_messages(lines: list[str]) -> list[dict]:
    texts = "\n".join(f"Text {i}: {line}" for i, line in enumerate(lines, 1))
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": texts}]


def detection_messages(explanation: str, texts: list[str]) -> list[dict]:
    numbered = "\n".join(f"{i}. {text}" for i, text in enumerate(texts, 1))
    user = f"Explanation: {explanation}\n\nTexts:\n{numbered}"
    return [{"role": "system", "content": DETECT_SYSTEM}, {"role": "user", "content": user}]


def clean_explanation(reply: str) -> str:
    """The reply's first non-empty line, without a leading 'Explanation:' or surrounding quotes."""
    line = next((line.strip() for line in reply.splitlines() if line.strip()), "")
    line = re.sub(r"^(explanation|answer)\s*:\s*", "", line, flags=re.IGNORECASE)
    return line.strip("\"'` ")[:MAX_EXPLANATION_CHARS]


def parse_detection(reply: str, count: int) -> list[int] | None:
    """The reply's list of 0s and 1s, or None when it holds no such list of ``count`` answers."""
    match = re.search(r"\[[\s\d,]*\]", reply)
    if match is None:
        return None
    try:
        answers = json.loads(match.group(0))
    except ValueError:
        return None
    return answers if len(answers) == count and set(answers) <= {0, 1} else None


class Interpretation(NamedTuple):
    explanation: str
    detection_accuracy: float | None  # None when there was nothing to score on
    detection_contexts: int


def interpret(
    client: ChatClient, record: dict, windows: dict[int, list[str]], settings: AnalysisParams, rng: random.Random
) -> Interpretation:
    """Explain one latent from its top contexts, then score the explanation by detection; a detection reply
    that is not a list of one answer per text counts every text as missed."""
    ai, before, after = settings.auto_interp, settings.context_before, settings.context_after
    shown = record["top_contexts"][: ai.explain_contexts]
    views = [context_view(c, windows[c["window"]], before, after) for c in shown]
    lines = [marked_context(v["tokens"], v["acts"], record["max_activation"], colour=False) for v in views]
    explanation = clean_explanation(client.complete(explanation_messages(lines)))

    seen = {c["window"] for c in shown}
    unseen = [c for level in record["levels"] for c in level["contexts"] if c["window"] not in seen]
    activating = rng.sample(unseen, min(len(unseen), ai.detection_activating))
    quiet = rng.sample(record["quiet_windows"], min(len(record["quiet_windows"]), ai.detection_quiet))
    width = before + 1 + after
    items = [("".join(context_view(c, windows[c["window"]], before, after)["tokens"]), 1) for c in activating]
    for w in quiet:
        start = rng.randrange(max(len(windows[w]) - width, 0) + 1)
        items.append(("".join(windows[w][start : start + width]), 0))
    if not items:
        return Interpretation(explanation, None, 0)
    rng.shuffle(items)
    answers = parse_detection(client.complete(detection_messages(explanation, [t for t, _ in items])), len(items))
    correct = sum(a == label for a, (_, label) in zip(answers or [], items))
    return Interpretation(explanation, correct / len(items), len(items))
