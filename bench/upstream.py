"""A fast OpenAI-compatible fake upstream for the benchmark: a raw asyncio HTTP/1.1 keep-alive server (no
framework, TCP_NODELAY) answering chat completions as JSON or SSE at a set pace, plus a tiny tool route.

Routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET|POST /tool` (the approval scenario's tool),
`GET /health`, `GET /stats` (completions served, tool runs). A model named like `fake-30tok-2tps` streams
30 tokens at 2 tokens/s whatever the CLI defaults say, so one upstream serves both stream scenarios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import re
import resource
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

WORDS = (" lorem", " ipsum", " dolor", " sit", " amet", " consectetur", " adipiscing", " elit", " sed", " do")
PROFILE_IN_MODEL = re.compile(r"-(\d+)tok-(\d+(?:\.\d+)?)tps$")
MAX_HEADER_BYTES = 64 * 1024

Writer = Callable[[bytes], None]
Streamer = Callable[[asyncio.Transport], Awaitable[None]]


@dataclass(frozen=True)
class Profile:
    """How a reply is paced: the wait before the JSON reply or the first chunk, then the token rate."""

    latency: float
    tokens: int
    tokens_per_second: float


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


class BadRequest(Exception):
    pass


# --- HTTP/1.1 parsing -----------------------------------------------------------------------------


class RequestParser:
    """Incremental parser: feed bytes, get every complete request (pipelined ones included) in order."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> tuple[list[Request], str | None]:
        """The complete requests, and why parsing stopped when the bytes after them are not HTTP."""
        self.buffer += data
        requests: list[Request] = []
        try:
            while (request := self._next()) is not None:
                requests.append(request)
        except BadRequest as exc:
            return requests, str(exc)
        return requests, None

    def _next(self) -> Request | None:
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            if len(self.buffer) > MAX_HEADER_BYTES:
                raise BadRequest("headers too large")
            return None
        method, path, version, headers = _head_parse(bytes(self.buffer[:head_end]))
        body_start = head_end + 4
        if "chunked" in headers.get("transfer-encoding", "").lower():
            found = _chunked_body(self.buffer, body_start)
            if found is None:
                return None
            body, body_end = found
        else:
            length = headers.get("content-length", "0")
            if not length.isdigit():
                raise BadRequest("bad Content-Length")
            body_end = body_start + int(length)
            if len(self.buffer) < body_end:
                return None
            body = bytes(self.buffer[body_start:body_end])
        del self.buffer[:body_end]
        return Request(method, path, headers, body, _keep_alive(version, headers))


def _head_parse(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, path, version = lines[0].split(" ", 2)
    except ValueError:
        raise BadRequest("bad request line") from None
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest("bad header line")
        headers[name.strip().lower()] = value.strip()
    return method, path.split("?", 1)[0], version, headers


def _chunked_body(buffer: bytearray, start: int) -> tuple[bytes, int] | None:
    """The decoded body and where it ends, or None while it is incomplete."""
    body, pos = bytearray(), start
    while True:
        line_end = buffer.find(b"\r\n", pos)
        if line_end < 0:
            return None
        try:
            size = int(bytes(buffer[pos:line_end]).split(b";")[0], 16)
        except ValueError:
            raise BadRequest("bad chunk size") from None
        if size == 0:
            trailer_end = buffer.find(b"\r\n\r\n", line_end)
            return (bytes(body), trailer_end + 4) if trailer_end >= 0 else None
        chunk_start = line_end + 2
        if len(buffer) < chunk_start + size + 2:
            return None
        body += buffer[chunk_start : chunk_start + size]
        pos = chunk_start + size + 2


def _keep_alive(version: str, headers: dict[str, str]) -> bool:
    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.0":
        return connection == "keep-alive"
    return connection != "close"


# --- Responses ------------------------------------------------------------------------------------

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


def response_bytes(status: int, body: bytes, keep_alive: bool, content_type: bytes = b"application/json") -> bytes:
    return b"".join(
        (
            f"HTTP/1.1 {status} {REASONS.get(status, 'OK')}\r\n".encode(),
            b"Content-Type: ",
            content_type,
            b"\r\nContent-Length: ",
            str(len(body)).encode(),
            b"\r\nConnection: keep-alive\r\n\r\n" if keep_alive else b"\r\nConnection: close\r\n\r\n",
            body,
        )
    )


def json_response(status: int, payload: Any, keep_alive: bool) -> bytes:
    return response_bytes(status, json.dumps(payload, separators=(",", ":")).encode(), keep_alive)


def sse_head(keep_alive: bool) -> bytes:
    connection = b"keep-alive" if keep_alive else b"close"
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: " + connection + b"\r\n\r\n"
    )


def sse_event(payload: Any) -> bytes:
    """One `data:` event framed as one HTTP chunk."""
    data = b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode())
    data += b"\n\n"
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


SSE_END = b"0\r\n\r\n"


# --- The fake model -------------------------------------------------------------------------------


def prompt_tokens(messages: list[dict]) -> int:
    """ceil(characters / 4) of the prompt, at least 1: realistic and never zero."""
    chars = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            chars += sum(len(part.get("text", "")) for part in content if isinstance(part, dict))
        elif isinstance(content, str):
            chars += len(content)
    return max(1, math.ceil(chars / 4))


def wants_tool_call(body: dict) -> bool:
    """Call the first tool when tools are offered and the user spoke last (so a resume gets text)."""
    messages = body.get("messages") or []
    return bool(body.get("tools")) and bool(messages) and messages[-1].get("role") == "user"


def tool_call(body: dict, call_id: str) -> dict:
    name = body["tools"][0].get("function", {}).get("name", "tool")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class FakeModel:
    """Builds the replies; the pace comes from the CLI defaults or the model's name."""

    def __init__(self, default: Profile) -> None:
        self.default = default
        self.ids = itertools.count(1)

    def profile(self, model: str) -> Profile:
        match = PROFILE_IN_MODEL.search(model)
        if match is None:
            return self.default
        return Profile(self.default.latency, int(match[1]), float(match[2]))

    def completion(self, body: dict, profile: Profile) -> dict:
        n = next(self.ids)
        prompt = prompt_tokens(body.get("messages") or [])
        if wants_tool_call(body):
            message = {"role": "assistant", "content": None, "tool_calls": [tool_call(body, f"call_{n}")]}
            finish, completion = "tool_calls", 8
        else:
            text = "".join(WORDS[i % len(WORDS)] for i in range(profile.tokens)).lstrip()
            message, finish, completion = {"role": "assistant", "content": text}, "stop", profile.tokens
        return {
            "id": f"chatcmpl-bench{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt, completion),
            "system_fingerprint": "fp_bench",
        }

    async def stream(self, transport: asyncio.Transport, body: dict, profile: Profile, keep_alive: bool) -> None:
        """Chunks on an absolute schedule (no drift): first at `latency`, then one every 1/rate seconds."""
        loop = asyncio.get_running_loop()
        n = next(self.ids)
        base = {"id": f"chatcmpl-bench{n}", "object": "chat.completion.chunk", "created": int(time.time())}
        base["model"] = body.get("model", "fake")
        start = loop.time() + profile.latency
        await asyncio.sleep(profile.latency)
        if transport.is_closing():
            return
        prompt = prompt_tokens(body.get("messages") or [])
        if wants_tool_call(body):
            delta = {"role": "assistant", "content": None, "tool_calls": [{"index": 0, **tool_call(body, f"call_{n}")}]}
            transport.write(sse_head(keep_alive) + sse_event(_chunk(base, delta, None)))
            finish, completion = "tool_calls", 8
        else:
            transport.write(sse_head(keep_alive))
            for i in range(profile.tokens):
                await asyncio.sleep(max(0.0, start + i / profile.tokens_per_second - loop.time()))
                if transport.is_closing():
                    return  # the client left: stop generating, as a real upstream would
                delta = {"role": "assistant", "content": WORDS[0].lstrip()} if i == 0 else {"content": WORDS[i % 10]}
                transport.write(sse_event(_chunk(base, delta, None)))
            finish, completion = "stop", profile.tokens
        tail = sse_event(_chunk(base, {}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            tail += sse_event({**base, "choices": [], "usage": usage(prompt, completion)})
        transport.write(tail + sse_event(b"[DONE]") + SSE_END)


def _chunk(base: dict, delta: dict, finish: str | None) -> dict:
    return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


# --- Routing and the protocol ---------------------------------------------------------------------


class Upstream:
    """Routes one request to bytes (answered at once) or a coroutine (paced or delayed answers)."""

    def __init__(self, model: FakeModel) -> None:
        self.model = model
        self.models_body = {"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "bench"}]}
        # Read by the benchmark through GET /stats, e.g. to check that each approved tool call ran once.
        self.stats = {"completions": 0, "tool_runs": 0}

    def handle(self, request: Request) -> bytes | Streamer:
        keep = request.keep_alive
        if request.path == "/v1/chat/completions" and request.method == "POST":
            self.stats["completions"] += 1
            return self.completions(request)
        if request.path == "/v1/models" and request.method == "GET":
            return json_response(200, self.models_body, keep)
        if request.path == "/tool":
            self.stats["tool_runs"] += 1
            return json_response(200, {"ok": True, "result": "done"}, keep)
        if request.path == "/stats":
            return json_response(200, self.stats, keep)
        if request.path == "/health":
            return json_response(200, {"status": "ok"}, keep)
        return json_response(404, {"error": {"message": "not found", "type": "invalid_request_error"}}, keep)

    def completions(self, request: Request) -> bytes | Streamer:
        keep = request.keep_alive
        try:
            body = json.loads(request.body)
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            return json_response(400, {"error": {"message": "invalid JSON", "type": "invalid_request_error"}}, keep)
        profile = self.model.profile(str(body.get("model", "")))
        if body.get("stream"):
            return lambda transport: self.model.stream(transport, body, profile, keep)
        if profile.latency <= 0:
            return json_response(200, self.model.completion(body, profile), keep)

        async def delayed(transport: asyncio.Transport) -> None:
            await asyncio.sleep(profile.latency)
            if not transport.is_closing():
                transport.write(json_response(200, self.model.completion(body, profile), keep))

        return delayed


class UpstreamProtocol(asyncio.Protocol):
    """One connection: requests are answered strictly in order; a paced answer holds back the ones
    pipelined behind it until it is done."""

    def __init__(self, app: Upstream) -> None:
        self.app = app
        self.parser = RequestParser()
        self.pending: deque[Request] = deque()
        self.task: asyncio.Task | None = None
        self.transport: asyncio.Transport | None = None
        self.error: str | None = None  # set when the bytes after the pending requests are not HTTP

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports subclass no asyncio class
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Small SSE chunks must leave at once, not wait for Nagle's algorithm.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        requests, self.error = self.parser.feed(data)
        self.pending.extend(requests)
        self.drain()

    def drain(self) -> None:
        transport = self.transport
        if transport is None:
            return
        while self.pending and self.task is None and not transport.is_closing():
            request = self.pending.popleft()
            answer = self.app.handle(request)
            if isinstance(answer, bytes):
                transport.write(answer)
                if not request.keep_alive:
                    transport.close()
            else:
                self.task = asyncio.get_running_loop().create_task(self.run(answer, request))
        if self.error is not None and not self.pending and self.task is None and not transport.is_closing():
            transport.write(json_response(400, {"error": {"message": self.error}}, keep_alive=False))
            transport.close()

    async def run(self, answer: Streamer, request: Request) -> None:
        assert self.transport is not None
        try:
            await answer(self.transport)
        finally:
            self.task = None
        if not request.keep_alive:
            self.transport.close()
        else:
            self.drain()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()
        self.pending.clear()


# --- Entry point ----------------------------------------------------------------------------------


def raise_open_files_limit() -> None:
    """Thousands of streams need thousands of sockets: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(host: str, port: int, default: Profile) -> None:
    app = Upstream(FakeModel(default))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: UpstreamProtocol(app), host, port, backlog=4096, reuse_address=True)
    print(f"fake upstream listening on http://{host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="wait before the JSON reply or first chunk")
    parser.add_argument("--tokens", type=int, default=200, help="tokens (chunks) per reply")
    parser.add_argument("--tokens-per-second", type=float, default=50.0, help="stream pace")
    args = parser.parse_args()
    raise_open_files_limit()
    profile = Profile(args.latency_ms / 1000, args.tokens, args.tokens_per_second)
    coroutine = serve(args.host, args.port, profile)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)
    else:
        uvloop.run(coroutine)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C when run by hand
        main()
