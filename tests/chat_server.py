"""A small OpenAI-compatible chat-completions server for tests: on 127.0.0.1 only, on a port of its own, answering
at most ``max_requests`` requests and stopping by itself after them, after ``lifetime_s``, or when the test ends."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dictlearn.analysis.auto_interp import DETECT_SYSTEM, EXPLAIN_SYSTEM

# What a reply function returns: an HTTP status and a JSON body, optionally after a delay in seconds.
Reply = tuple[int, object] | tuple[int, object, float]


def completion(text: str) -> tuple[int, dict]:
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


def reader_of(word: str, explanation: str) -> Callable[[dict], Reply]:
    """A stand-in model: explains every latent as ``explanation``, and in detection says a text activates
    exactly when it contains ``word``."""

    def reply(request: dict) -> Reply:
        system, user = (message["content"] for message in request["messages"])
        if system == EXPLAIN_SYSTEM:
            return completion(f"Explanation: {explanation}\n")
        assert system == DETECT_SYSTEM
        texts = re.findall(r"^\d+\. (.*)$", user.split("Texts:\n", 1)[1], flags=re.MULTILINE)
        return completion(json.dumps([int(word in text) for text in texts]))

    return reply


class ChatServer:
    """``with ChatServer(reply) as server:`` serves ``server.base_url``; ``server.requests`` holds each request's
    path, headers and JSON body."""

    def __init__(self, reply: Callable[[dict], Reply], max_requests: int = 50, lifetime_s: float = 60.0) -> None:
        self.reply, self.max_requests, self.lifetime_s = reply, max_requests, lifetime_s
        self.requests: list[tuple[str, dict, dict]] = []
        self.stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, dict(self.headers), body))
                status, payload, *delay = outer.reply(body)
                if delay:
                    time.sleep(delay[0])
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            accepted = 0

            def process_request(self, request, client_address) -> None:
                self.accepted += 1
                super().process_request(request, client_address)

            def handle_error(self, request, client_address) -> None:
                pass  # a client that gave up on a slow reply closed its socket: expected in the timeout test

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.timeout = 0.1
        self.thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def _serve(self) -> None:
        deadline = time.monotonic() + self.lifetime_s
        while self.server.accepted < self.max_requests and not self.stop.is_set() and time.monotonic() < deadline:
            self.server.handle_request()
        self.server.server_close()

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
