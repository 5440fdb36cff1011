"""An upstream that answers every chat, completions and embeddings request with a well-formed answer
(streamed when asked), whatever the request says: for tests and benches whose outcome must not depend
on the simulator. Stdlib only, so bench/ can use it too."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CONTENT = '{"answer": "yes", "items": [1, 2]}'


class WellFormed(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    content = CONTENT  # what every answer says (a bench sets it per probe)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        body = body if isinstance(body, dict) else {}  # it answers whatever it is asked
        if self.path.endswith("/embeddings"):
            self._json(
                {
                    "object": "list",
                    "model": "m",
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}],
                    "usage": {"prompt_tokens": 1, "total_tokens": 1},
                }
            )
            return
        chat = self.path.endswith("/chat/completions")
        usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
        if body.get("stream") is True:
            options = body.get("stream_options")
            self._stream(chat, isinstance(options, dict) and options.get("include_usage") is True, usage)
            return
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
        if chat:
            choice["message"] = {"role": "assistant", "content": self.content}
        else:
            choice["text"] = self.content
        kind = "chat.completion" if chat else "text_completion"
        self._json(
            {"id": "x", "object": kind, "created": 1, "model": "m", "choices": [choice], "usage": usage}
        )

    def _json(self, answer: dict[str, Any]) -> None:
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, chat: bool, include_usage: bool, usage: dict[str, int]) -> None:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            chunk = {"id": "x", "object": kind, "created": 1, "model": "m", "choices": choices, **extra}
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        piece = (lambda text: {"delta": {"content": text}}) if chat else (lambda text: {"text": text})
        events = [
            event([{"index": 0, **piece(self.content[:10]), "finish_reason": None}]),
            event([{"index": 0, **piece(self.content[10:]), "finish_reason": "stop"}]),
        ]
        if include_usage:
            events.append(event([], usage=usage))
        data = b"".join(events) + b"data: [DONE]\n\n"
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._json({"object": "list", "data": [{"id": "m", "object": "model"}]})

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def well_formed() -> Iterator[str]:
    """Serves WellFormed on loopback; yields its /v1 base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), WellFormed)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
