"""Model providers: an OpenAI-compatible upstream over aiohttp (pooled, streaming) and the offline
`scripted` model. Both answer `complete()` with a ModelReply and `stream()` with text deltas then one
ModelReply."""

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
from django.conf import settings

from billing.pricing import message_text, prompt_length, tokens_estimate
from chat.engine.clients import per_loop
from core.errors import UpstreamError, UpstreamTimeout

logger = logging.getLogger(__name__)


@dataclass
class ModelEndpoint:
    """What a call needs to know about a custom model, read once from the database."""

    name: str
    provider: str
    base_url: str
    model: str
    api_key: str | None = None
    timeout_seconds: float | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False


@dataclass
class ModelReply:
    content: str | None
    finish_reason: str
    usage: Usage
    tool_calls: list[dict] = field(default_factory=list)


class Provider(Protocol):
    async def complete(self, endpoint: ModelEndpoint, messages: list[dict], params: dict) -> ModelReply: ...

    def stream(
        self, endpoint: ModelEndpoint, messages: list[dict], params: dict
    ) -> AsyncIterator[str | ModelReply]: ...


# --- OpenAI-compatible upstreams ------------------------------------------------------------------


def _upstream_session() -> aiohttp.ClientSession:
    """The pool of upstream connections. aiohttp rather than httpx here: measured on the benchmark's
    machine an upstream call costs 0.5 ms of CPU through aiohttp and 3 ms through httpx (README,
    Benchmarks); tools and webhooks, off the hot path, keep httpx and its SSRF-pinned transport."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1000, limit_per_host=0, keepalive_timeout=30),
        read_bufsize=2**20,  # SSE lines up to 1 MiB
        # No proxy or .netrc from the environment: reading them costs a thread hop on every call, and
        # upstreams are named by their base_url alone.
        trust_env=False,
    )


_session = per_loop(_upstream_session, close=aiohttp.ClientSession.close)


RETRY_STATUSES = {429, 502, 503, 504}


class CircuitBreaker:
    """Per upstream (base URL and model) and per process: after KITEMESH_CIRCUIT_FAILURES failures in a
    row the circuit opens and calls fail at once for KITEMESH_CIRCUIT_COOLDOWN seconds; then one call
    is let through, and its outcome closes or reopens the circuit."""

    def __init__(self) -> None:
        self.failures = 0
        self.open_until = 0.0

    def check(self, endpoint: ModelEndpoint) -> None:
        now = time.monotonic()
        if self.failures >= settings.KITEMESH_CIRCUIT_FAILURES and now < self.open_until:
            raise UpstreamError(
                f"The upstream model {endpoint.name!r} is failing; calls are paused for "
                f"{math.ceil(self.open_until - now)} s.",
                code="upstream_unavailable",
            )
        if self.failures >= settings.KITEMESH_CIRCUIT_FAILURES:
            self.open_until = now + settings.KITEMESH_CIRCUIT_COOLDOWN  # half-open: this call is the trial

    def success(self) -> None:
        self.failures = 0

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= settings.KITEMESH_CIRCUIT_FAILURES:
            self.open_until = time.monotonic() + settings.KITEMESH_CIRCUIT_COOLDOWN


_breakers: dict[tuple[str, str], CircuitBreaker] = {}


def _breaker_for(endpoint: ModelEndpoint) -> CircuitBreaker:
    return _breakers.setdefault((endpoint.base_url, endpoint.model), CircuitBreaker())


class OpenAIProvider:
    @staticmethod
    def _status_error(endpoint: ModelEndpoint, response: aiohttp.ClientResponse) -> UpstreamError:
        # The upstream's body can quote our API key back: never log or echo it.
        logger.warning("upstream %s answered HTTP %s", endpoint.name, response.status)
        return UpstreamError(f"The upstream model {endpoint.name!r} answered HTTP {response.status}.")

    @staticmethod
    def _transport_error(endpoint: ModelEndpoint, exc: Exception) -> UpstreamError:
        if isinstance(exc, TimeoutError):  # aiohttp's timeouts are TimeoutErrors too
            return UpstreamTimeout(f"The upstream model {endpoint.name!r} did not answer in time.")
        return UpstreamError(f"The upstream model {endpoint.name!r} could not be reached ({type(exc).__name__}).")

    async def _send(
        self, endpoint: ModelEndpoint, messages: list[dict], params: dict, stream: bool
    ) -> aiohttp.ClientResponse:
        """Send, retrying with backoff what certainly did not reach the model or was refused before it
        ran (connection failures; 429, 502, 503, 504) — all before any byte goes to our client. A read
        timeout is not retried: the model may be generating. The circuit breaker fails fast for an
        upstream that keeps failing."""
        breaker = _breaker_for(endpoint)
        breaker.check(endpoint)
        payload = {"model": endpoint.model, "messages": messages, **params}
        if stream:
            payload |= {"stream": True, "stream_options": {"include_usage": True}}
        body = json.dumps(payload)
        headers = {"Content-Type": "application/json"}
        if endpoint.api_key:
            headers["Authorization"] = f"Bearer {endpoint.api_key}"
        timeout = aiohttp.ClientTimeout(
            connect=settings.KITEMESH_UPSTREAM_CONNECT_TIMEOUT,
            sock_read=endpoint.timeout_seconds or settings.KITEMESH_UPSTREAM_READ_TIMEOUT,
        )
        url = endpoint.base_url.rstrip("/") + "/chat/completions"
        delays = [settings.KITEMESH_UPSTREAM_RETRY_BACKOFF * 2**n for n in range(settings.KITEMESH_UPSTREAM_RETRIES)]
        for delay in [*delays, None]:
            try:
                response = await _session().post(url, data=body, headers=headers, timeout=timeout)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                if delay is None:
                    breaker.failure()
                    raise self._transport_error(endpoint, exc) from None
            except (TimeoutError, aiohttp.ClientError) as exc:
                breaker.failure()
                raise self._transport_error(endpoint, exc) from None
            else:
                if response.status not in RETRY_STATUSES or delay is None:
                    if response.status < 500:
                        breaker.success()
                    else:
                        breaker.failure()
                    return response
                response.release()
            await asyncio.sleep(delay)
        raise AssertionError("the last attempt returns or raises")

    async def complete(self, endpoint: ModelEndpoint, messages: list[dict], params: dict) -> ModelReply:
        response = await self._send(endpoint, messages, params, stream=False)
        try:
            if response.status >= 400:
                raise self._status_error(endpoint, response)
            raw = await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._transport_error(endpoint, exc) from None
        finally:
            response.release()
        try:
            body = json.loads(raw)
            choice = body["choices"][0]
            message = choice.get("message") or {}
            content = _text(message.get("content"))
            tool_calls = _tool_calls_clean(message.get("tool_calls") or [])
            reported = body.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise UpstreamError(f"The upstream model {endpoint.name!r} sent a malformed response.") from None
        return ModelReply(
            content=content,
            finish_reason=_finish_reason(choice.get("finish_reason")),
            tool_calls=tool_calls,
            usage=_usage(reported, messages, len(content or "")),
        )

    async def stream(
        self, endpoint: ModelEndpoint, messages: list[dict], params: dict
    ) -> AsyncIterator[str | ModelReply]:
        parts: list[str] = []
        tool_calls: dict[int, dict] = {}
        finish_reason, reported = "stop", {}
        response = await self._send(endpoint, messages, params, stream=True)
        try:
            if response.status >= 400:
                raise self._status_error(endpoint, response)
            async for line in response.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise UpstreamError(f"The upstream model {endpoint.name!r} sent a malformed stream.") from None
                reported = chunk.get("usage") or reported
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        piece = _text(delta["content"])
                        parts.append(piece)
                        yield piece
                    for call in delta.get("tool_calls") or ():
                        _tool_call_merge(tool_calls, call)
                    finish_reason = _finish_reason(choice.get("finish_reason"), finish_reason)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._transport_error(endpoint, exc) from None
        except (ValueError, TypeError, AttributeError):  # not text where text belongs, a line over read_bufsize
            raise UpstreamError(f"The upstream model {endpoint.name!r} sent a malformed stream.") from None
        finally:
            response.release()
        content = "".join(parts)
        yield ModelReply(
            content=content or None,
            finish_reason=finish_reason,
            tool_calls=[tool_calls[i] for i in sorted(tool_calls)],
            usage=_usage(reported, messages, len(content)),
        )


_SURROGATE = re.compile("[\ud800-\udfff]")
# Usage an upstream reports outside this range is not believed (the call's usage is estimated instead):
# no call reads or writes a hundred million tokens, and the step's columns could not store much more.
_USAGE_MAX = 100_000_000


def _text(value: object) -> str | None:
    """Model text as stored and relayed: NUL characters dropped and lone surrogates replaced (neither
    can be stored or encoded as UTF-8). ValueError for what is not text."""
    if value is None or value == "":
        return value
    if not isinstance(value, str):
        raise ValueError("text expected")
    if "\x00" in value:
        value = value.replace("\x00", "")
    if not value.isascii() and _SURROGATE.search(value):
        value = _SURROGATE.sub("\ufffd", value)
    return value


def _tool_calls_clean(tool_calls: list) -> list[dict]:
    """A non-stream answer's tool calls in the same clean shape as assembled streamed ones."""
    calls: dict[int, dict] = {}
    for index, call in enumerate(tool_calls):
        if isinstance(call, dict):
            _tool_call_merge(calls, {**call, "index": index})
    return [calls[i] for i in sorted(calls)]


def _tool_call_merge(calls: dict[int, dict], piece: dict) -> None:
    """Assemble a streamed tool call: id and name arrive once, arguments in fragments."""
    index = piece.get("index", len(calls))
    if type(index) is not int:
        raise ValueError("a tool call's index must be an integer")
    call = calls.setdefault(index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
    call["id"] = _text(piece.get("id")) or call["id"]
    fn = piece.get("function") or {}
    call["function"]["name"] += _text(fn.get("name")) or ""
    call["function"]["arguments"] += _text(fn.get("arguments")) or ""


def _finish_reason(value: object, default: str = "stop") -> str:
    """The upstream's finish_reason when it is a short word, else `default` (it is relayed and stored)."""
    return value if isinstance(value, str) and value.isascii() and 0 < len(value) <= 32 else default


def _usage(reported: object, messages: list[dict], completion_length: int) -> Usage:
    counts = reported if isinstance(reported, dict) else {}
    prompt, completion = counts.get("prompt_tokens"), counts.get("completion_tokens")
    if all(type(n) is int and 0 <= n < _USAGE_MAX for n in (prompt, completion)):
        return Usage(prompt, completion)
    return Usage(tokens_estimate(prompt_length(messages)), tokens_estimate(completion_length), estimated=True)


# --- The offline scripted model -------------------------------------------------------------------


AGENT_SECTION = re.compile(r"^### (.+)\n(.*)$", re.MULTILINE)
TOOL_DIRECTIVE = re.compile(r"^!tool\s+([A-Za-z0-9_-]+)\s*(.*)$", re.MULTILINE)


class ScriptedProvider:
    """Deterministic and offline (rules in README, "The scripted model"):
    - after tool results (the last message is a tool message) it answers `Tool results: <contents>`;
    - after a synthesis note (the last message is a system message with `### <agent>` sections) it
      answers `Synthesis: <agent>: <answer> | …`;
    - else each line `!tool NAME {json}` of the last user message becomes a call of tool NAME with
      those arguments (ids call_1, call_2, …);
    - else it answers `Scripted reply: <last user message>`; a system instruction is not echoed;
    - a last user message containing `!fail` makes the call fail like an upstream answering HTTP 500;
    - `max_tokens` cuts the reply to that many tokens (4 characters each) with finish_reason `length`;
    - usage counts ceil(characters / 4) of the prompt and of the reply;
    - streams one word per chunk.
    """

    async def complete(self, endpoint: ModelEndpoint, messages: list[dict], params: dict) -> ModelReply:
        last_user = next((message_text(m) for m in reversed(messages) if m["role"] == "user"), "")
        if "!fail" in last_user:
            raise UpstreamError(f"The upstream model {endpoint.name!r} answered HTTP 500.")
        tool_calls = []
        if messages[-1]["role"] == "tool":
            results = [message_text(m) for m in messages[_tool_results_start(messages) :]]
            content, finish_reason = "Tool results: " + " | ".join(results), "stop"
        elif messages[-1]["role"] == "system" and len(messages) > 1:
            sections = AGENT_SECTION.findall(message_text(messages[-1]))
            content, finish_reason = "Synthesis: " + " | ".join(f"{n}: {a}" for n, a in sections), "stop"
        else:
            tool_calls = [
                {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args.strip() or "{}"}}
                for i, (name, args) in enumerate(TOOL_DIRECTIVE.findall(last_user), start=1)
            ]
            content, finish_reason = (None, "tool_calls") if tool_calls else (f"Scripted reply: {last_user}", "stop")
        max_tokens = params.get("max_tokens")
        if content and max_tokens and len(content) > max_tokens * 4:
            content, finish_reason = content[: max_tokens * 4], "length"
        produced = len(content or "") + sum(len(c["function"]["name"] + c["function"]["arguments"]) for c in tool_calls)
        usage = Usage(tokens_estimate(prompt_length(messages)), tokens_estimate(produced))
        return ModelReply(content=content, finish_reason=finish_reason, usage=usage, tool_calls=tool_calls)

    async def stream(
        self, endpoint: ModelEndpoint, messages: list[dict], params: dict
    ) -> AsyncIterator[str | ModelReply]:
        reply = await self.complete(endpoint, messages, params)
        words = (reply.content or "").split(" ") if reply.content else []
        for i, word in enumerate(words):
            yield word if i == len(words) - 1 else word + " "
        yield reply


def _tool_results_start(messages: list[dict]) -> int:
    """Index of the first of the trailing tool messages."""
    start = len(messages)
    while start > 0 and messages[start - 1]["role"] == "tool":
        start -= 1
    return start


PROVIDERS: dict[str, Provider] = {"openai": OpenAIProvider(), "scripted": ScriptedProvider()}


def provider_for(endpoint: ModelEndpoint) -> Provider:
    return PROVIDERS[endpoint.provider]
