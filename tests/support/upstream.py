"""A small OpenAI-compatible upstream on loopback for tests: scripted replies (JSON or SSE, delays,
errors), and a record of every request it received. Replies are answered in arrival order from one
shared queue, or from a queue of the requested model's own (`queue_for`), so calls made in parallel to
different models each get theirs whatever order they arrive in."""

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """What the upstream answers to the next request. `chunks` are the text pieces of a stream."""

    content: str = "Hello from upstream."
    chunks: list[str] | None = None
    usage: dict | None = field(default_factory=lambda: {"prompt_tokens": 11, "completion_tokens": 7})
    status: int = 200
    error_body: dict | None = None
    delay: float = 0.0
    chunk_delay: float = 0.0
    finish_reason: str = "stop"
    tool_calls: list[dict] | None = None
    # Streams only: 0 sends each tool call whole in one delta; N > 0 sends it as real upstreams do, a first
    # delta with index, id, type, name and empty arguments, then its arguments in N fragments.
    tool_call_pieces: int = 0


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    started: float
    finished: float = 0.0
    aborted: bool = False


class FakeUpstream:
    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.replies_by_model: dict[str, list[Reply]] = {}
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        # A short poll interval keeps shutdown (once per test) fast.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def queue(self, *replies: Reply) -> None:
        with self.lock:
            self.replies.extend(replies)

    def queue_for(self, model: str, *replies: Reply) -> None:
        """Replies for requests naming `model` only, answered before the shared queue's."""
        with self.lock:
            self.replies_by_model.setdefault(model, []).extend(replies)

    def next_reply(self, model: str | None = None) -> Reply:
        with self.lock:
            own = self.replies_by_model.get(model) if model is not None else None
            if own:
                return own.pop(0)
            return self.replies.pop(0) if self.replies else Reply()

    def received_for(self, model: str) -> list[Received]:
        """The requests naming `model`, in arrival order."""
        with self.lock:
            return [r for r in self.received if r.body.get("model") == model]

    def start(self) -> "FakeUpstream":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                record = Received(self.path, dict(self.headers), json.loads(raw or b"{}"), time.monotonic())
                with upstream.lock:
                    upstream.received.append(record)
                model = record.body.get("model")
                reply = upstream.next_reply(model if isinstance(model, str) else None)
                time.sleep(reply.delay)
                try:
                    if reply.status != 200:
                        self._json(reply.status, reply.error_body or {"error": {"message": "upstream failed"}})
                    elif record.body.get("stream"):
                        self._stream(reply)
                    else:
                        self._json(200, _completion(record.body, reply))
                except (BrokenPipeError, ConnectionResetError):
                    record.aborted = True
                record.finished = time.monotonic()

            def _json(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, reply: Reply) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                base = {"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "up"}
                for piece in reply.chunks if reply.chunks is not None else [reply.content]:
                    delta = {"content": piece}
                    self._event({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                    time.sleep(reply.chunk_delay)
                for index, call in enumerate(reply.tool_calls or ()):
                    for piece in _tool_call_deltas(index, call, reply.tool_call_pieces):
                        delta = {"tool_calls": [piece]}
                        self._event({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                        if reply.tool_call_pieces:
                            time.sleep(reply.chunk_delay)
                self._event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": reply.finish_reason}]})
                if reply.usage is not None:
                    self._event({**base, "choices": [], "usage": reply.usage})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def _event(self, body: dict) -> None:
                self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
                self.wfile.flush()

        return Handler


def _tool_call_deltas(index: int, call: dict, pieces: int) -> list[dict]:
    """The deltas that carry one streamed tool call: whole, or a head then `pieces` argument fragments."""
    if pieces <= 0:
        return [{"index": index, **call}]
    function = call.get("function") or {}
    arguments = function.get("arguments") or ""
    head = {
        "index": index,
        "id": call.get("id"),
        "type": call.get("type", "function"),
        "function": {"name": function.get("name"), "arguments": ""},
    }
    size = max(1, -(-len(arguments) // pieces))  # ceil: at most `pieces` fragments
    fragments = [arguments[start : start + size] for start in range(0, len(arguments), size)]
    return [head, *({"index": index, "function": {"arguments": fragment}} for fragment in fragments)]


def _completion(request: dict, reply: Reply) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.tool_calls:
        message["tool_calls"] = reply.tool_calls
    body: dict[str, Any] = {
        "id": "up-1",
        "object": "chat.completion",
        "created": 1,
        "model": request.get("model"),
        "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}],
    }
    if reply.usage is not None:
        body["usage"] = {**reply.usage, "total_tokens": sum(reply.usage.values())}
    return body
