"""The chat-completions client and detection scoring against a loopback server that speaks the protocol: the
request it sends, the key from the environment, retries with back-off, the rate limit, timeouts, a server that is
down or refuses, and an explanation scored on contexts it was not written from."""

from __future__ import annotations

import random

import pytest

from dictlearn.analysis.auto_interp import ChatClient, clean_explanation, interpret, parse_detection
from dictlearn.errors import UserError
from dictlearn.params import AnalysisParams, AutoInterpParams
from tests.chat_server import ChatServer, completion, reader_of
from tests.test_feature_db import free_port

MESSAGES = [{"role": "user", "content": "hello"}]


class FakeTime:
    """A clock that moves only when the client sleeps, so waits are exact and tests never wait."""

    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds

    def clock(self) -> float:
        return self.now


def client_for(base_url: str, fake: FakeTime | None = None, **settings) -> ChatClient:
    fake = fake or FakeTime()
    ai = AutoInterpParams(base_url=base_url, api_key_env="DICTLEARN_TEST_API_KEY", **settings)
    return ChatClient(ai, sleep=fake.sleep, clock=fake.clock)


def test_the_request_follows_the_protocol_and_carries_the_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("DICTLEARN_TEST_API_KEY", "sk-test")
    with ChatServer(lambda request: completion("hi there"), max_requests=2) as server:
        client = client_for(server.base_url, model="tiny-chat", max_reply_tokens=7)
        assert client.complete(MESSAGES) == "hi there"
        monkeypatch.delenv("DICTLEARN_TEST_API_KEY")
        client.complete(MESSAGES)
    (path, headers, body), (_, unkeyed, _) = server.requests
    assert path == "/v1/chat/completions" and headers["Content-Type"] == "application/json"
    assert headers["Authorization"] == "Bearer sk-test" and "Authorization" not in unkeyed
    assert body == {"model": "tiny-chat", "messages": MESSAGES, "temperature": 0, "max_tokens": 7}


def test_a_failed_call_is_retried_after_back_off():
    replies = iter([(503, {"error": "overloaded"}), (429, {"error": "slow down"}), completion("third time")])
    fake = FakeTime()
    with ChatServer(lambda request: next(replies), max_requests=3) as server:
        client = client_for(server.base_url, fake, retries=3, backoff_s=0.5, requests_per_second=100)
        assert client.complete(MESSAGES) == "third time"
    assert len(server.requests) == 3
    assert fake.sleeps == [0.5, 1.0]  # 0.5 s, then doubled; the rate limit's 10 ms had passed by then


def test_a_failure_that_persists_says_what_happened_after_every_try():
    with ChatServer(lambda request: (502, {"error": "bad gateway"}), max_requests=3) as server:
        client = client_for(server.base_url, retries=2, backoff_s=0)
        with pytest.raises(
            UserError, match=r"no answer from http://127.0.0.1:\d+/v1/chat/completions after 3 tries \(HTTP 502\)"
        ):
            client.complete(MESSAGES)
    assert len(server.requests) == 3


def test_requests_are_spaced_to_the_rate_limit():
    fake = FakeTime()
    with ChatServer(lambda request: completion("ok"), max_requests=3) as server:
        client = client_for(server.base_url, fake, requests_per_second=4)
        for _ in range(3):
            client.complete(MESSAGES)
    assert fake.sleeps == [0.25, 0.25]


def test_a_reply_slower_than_the_timeout_is_retried():
    replies = iter([(*completion("too late"), 1.0), completion("in time")])
    with ChatServer(lambda request: next(replies), max_requests=2) as server:
        client = client_for(server.base_url, timeout_s=0.2, retries=1, backoff_s=0)
        assert client.complete(MESSAGES) == "in time"


def test_a_server_that_is_down_is_one_clear_error():
    url = f"http://127.0.0.1:{free_port()}/v1"
    client = client_for(url, retries=1, backoff_s=0)
    with pytest.raises(UserError) as caught:
        client.complete(MESSAGES)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"analysis.auto_interp.base_url: no answer from {url}/chat/completions after 2 tries (")
    assert "Connection refused" in message and message.endswith("is the server running?")


def test_a_refused_key_is_not_retried_and_names_the_variable():
    with ChatServer(lambda request: (401, {"error": {"message": "invalid api key"}}), max_requests=1) as server:
        client = client_for(server.base_url, retries=3)
        with pytest.raises(
            UserError,
            match=r"answered HTTP 401 \(.*invalid api key.*\); set the environment variable DICTLEARN_TEST_API_KEY",
        ):
            client.complete(MESSAGES)
    assert len(server.requests) == 1


def test_a_reply_that_is_not_a_chat_completion_is_refused():
    not_a_completion = r"the reply from http://127.0.0.1:\d+/v1/chat/completions is not a chat completion"
    with (
        ChatServer(lambda request: (200, {"id": "x"}), max_requests=1) as server,
        pytest.raises(UserError, match=not_a_completion),
    ):
        client_for(server.base_url).complete(MESSAGES)


def test_replies_are_read_leniently():
    assert clean_explanation('\n  Explanation: "the surname Woodhouse"\nmore') == "the surname Woodhouse"
    assert parse_detection("Sure: [1, 0, 1]", 3) == [1, 0, 1]
    assert parse_detection("[1, 0]", 3) is None and parse_detection("[1, 2, 0]", 3) is None
    assert parse_detection("no list", 3) is None and parse_detection("[1,,0]", 2) is None


def sample_latent() -> tuple[dict, dict[int, list[str]]]:
    """A latent that fires on ' Woodhouse': top contexts in windows 0-2, level contexts in 3-5 (window 2 again
    too, which detection must not reuse), quiet windows 6-9."""
    firing = [["<s>", " Miss", " Woodhouse", f" said{i}", "."] for i in range(6)]
    quiet = [["<s>", " the", f" weather{i}", " was", " fine"] for i in range(4)]
    windows = dict(enumerate(firing + quiet))

    def context(window, activation):
        return {"window": window, "activation": activation, "max_position": 2, "acts": [[2, activation]]}

    record = {
        "latent": 7,
        "max_activation": 9.0,
        "top_contexts": [context(0, 9.0), context(1, 8.0), context(2, 7.5)],
        "levels": [
            {"low": 0.1, "high": 0.5, "contexts": [context(5, 2.0)]},
            {"low": 0.5, "high": 1.0, "contexts": [context(2, 7.5), context(3, 6.0), context(4, 5.0)]},
        ],
        "quiet_windows": [6, 7, 8, 9],
    }
    return record, windows


def test_interpret_explains_from_top_contexts_and_scores_on_unseen_ones():
    record, windows = sample_latent()
    settings = AnalysisParams(context_before=2, context_after=1)
    with ChatServer(reader_of(" Woodhouse", "the surname Woodhouse"), max_requests=2) as server:
        client = client_for(server.base_url)
        settings = settings.model_copy(update={"auto_interp": client.settings})
        result = interpret(client, record, windows, settings, random.Random(0))
    assert result.explanation == "the surname Woodhouse"
    assert result.detection_accuracy == 1.0 and result.detection_contexts == 3 + 4
    explain, detect = (body["messages"][1]["content"] for _, _, body in server.requests)
    assert explain.splitlines() == [
        "Text 1: <s> Miss [Woodhouse 9] said0",
        "Text 2: <s> Miss [Woodhouse 8] said1",
        "Text 3: <s> Miss [Woodhouse 7.5] said2",
    ]
    assert detect.startswith("Explanation: the surname Woodhouse\n\nTexts:\n1. ")
    assert "said2" not in detect and all(f"said{i}" in detect for i in (3, 4, 5))
    assert "[" not in detect  # no activations are shown for detection


def test_a_reader_that_says_yes_to_everything_scores_the_share_of_activating_contexts():
    record, windows = sample_latent()
    with ChatServer(reader_of("", "anything"), max_requests=2) as server:
        client = client_for(server.base_url)
        settings = AnalysisParams().model_copy(update={"auto_interp": client.settings})
        result = interpret(client, record, windows, settings, random.Random(0))
    assert result.detection_accuracy == pytest.approx(3 / 7)


def test_a_reply_without_text_is_one_line():
    empty = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "length"}]}
    with ChatServer(lambda request: (200, empty), max_requests=1) as server, pytest.raises(UserError) as caught:
        client_for(server.base_url).complete(MESSAGES)
    assert str(caught.value) == (
        f"analysis.auto_interp: the reply from {server.base_url}/chat/completions has no text (content is null); "
        "check analysis.auto_interp.model and max_reply_tokens"
    )


def test_the_key_is_redacted_from_errors_and_replies(monkeypatch):
    monkeypatch.setenv("DICTLEARN_TEST_API_KEY", "sk-secret-123")
    echo = {"error": {"message": "Incorrect API key provided: sk-secret-123. Find yours at example.com."}}
    with ChatServer(lambda request: (401, echo), max_requests=1) as server, pytest.raises(UserError) as caught:
        client_for(server.base_url).complete(MESSAGES)
    assert "sk-secret-123" not in str(caught.value) and "Incorrect API key provided: ***." in str(caught.value)
    with ChatServer(lambda request: completion("your key is sk-secret-123"), max_requests=1) as server:
        assert client_for(server.base_url).complete(MESSAGES) == "your key is ***"
