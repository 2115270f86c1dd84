"""OpenAI wire shapes: the chat request parsed and validated, the response and chunk builders, and
the one error envelope every API error is rendered in."""

import hashlib
import json
import logging
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response

from core.envelope import error_body, error_headers, http_status, request_id_of
from core.errors import AuthenticationError, InternalError, InvalidRequest, KiteMeshError, MethodNotAllowed, NotFound
from core.models import Mode
from core.timestamps import iso

logger = logging.getLogger(__name__)

ROLES = {"system", "developer", "user", "assistant", "tool"}
PASSTHROUGH_FIELDS = ("top_p", "stop", "seed", "response_format", "user")
MISSING_TOKEN_MESSAGE = "Missing Bearer API token"
REQUEST_ID = re.compile(r"[\x20-\x7e]{1,128}")  # goes into a response header: printable ASCII only
# No model writes a million tokens in one answer; a larger cap only inflates the worst case a run holds.
MAX_OUTPUT_TOKENS = 1_000_000
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


@dataclass
class ChatRequest:
    """A validated chat completions (or resume) body."""

    group_id: uuid.UUID
    messages: list[dict]
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    mode: str | None = None
    request_id: str | None = None
    metadata: dict = field(default_factory=dict)
    include_usage: bool = False
    passthrough: dict = field(default_factory=dict)
    body_hash: str = ""

    @property
    def model(self) -> str:
        return f"group:{self.group_id}"

    def upstream_params(self) -> dict:
        params = dict(self.passthrough)
        if self.temperature is not None:
            params["temperature"] = self.temperature
        return params


def _fail(message: str, param: str | None) -> InvalidRequest:
    return InvalidRequest(message, param=param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class _Unstorable:
    """A JSON value the database cannot store, left in the parsed body for _unstorable_find to name."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# A lone surrogate can only arrive as a \u escape (strict UTF-8 cannot carry one): without a \uD8.. to
# \uDF.. escape in the raw body, no string needs to be looked at.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _json_int(text: str) -> int | _Unstorable:
    # Checked on the digits first: Python refuses to convert more than 4300 of them (a ValueError).
    if len(text.lstrip("-")) <= 19 and _INT64_MIN <= (value := int(text)) <= _INT64_MAX:
        return value
    return _Unstorable("integers must fit in 64 bits")


def _json_float(text: str) -> float | _Unstorable:
    value = float(text)
    return value if math.isfinite(value) else _Unstorable("numbers must be finite")


def _json_constant(name: str) -> _Unstorable:
    return _Unstorable(f"{name} is not a number JSON allows")


def body_parse(raw: bytes) -> dict:
    """The JSON body as a dict. Anything in it the database or the encoder cannot store (NUL, a lone
    surrogate, NaN or Infinity, an integer beyond 64 bits) is refused here, naming where it is."""
    flagged = False

    def flag(value: _Unstorable | int | float) -> _Unstorable | int | float:
        nonlocal flagged
        flagged = flagged or isinstance(value, _Unstorable)
        return value

    try:
        body = json.loads(
            raw,
            parse_int=lambda text: flag(_json_int(text)),
            parse_float=lambda text: flag(_json_float(text)),
            parse_constant=lambda name: flag(_json_constant(name)),
        )
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.", code="invalid_json")
    if flagged or b"\\u0000" in raw or _SURROGATE_ESCAPE.search(raw):
        found = _unstorable_find(body, ())
        if found is not None:
            path, reason = found
            raise InvalidRequest(f"{reason}.", param=".".join(path) or None)
    return body


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "Text must not contain NUL characters (\\u0000)"
    if _SURROGATE.search(text):
        return "Text must not contain a lone surrogate (\\ud800 to \\udfff without its pair)"
    return None


def _unstorable_find(value: Any, path: tuple[str, ...]) -> tuple[tuple[str, ...], str] | None:
    """The path and reason of the first value in `value` that cannot be stored, or None."""
    if isinstance(value, _Unstorable):
        return path, value.reason
    if isinstance(value, str):
        problem = _text_problem(value)
        return (path, problem) if problem else None
    if isinstance(value, dict):
        for key, item in value.items():
            if problem := _text_problem(key):
                return path, f"A key: {problem[0].lower()}{problem[1:]}"
            if found := _unstorable_find(item, (*path, key)):
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            if found := _unstorable_find(item, (*path, str(index))):
                return found
    return None


def _content_check(content: Any, param: str, *, nullable: bool) -> None:
    if content is None:
        if not nullable:
            raise _fail("content must be a string or a list of text parts.", param)
        return
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _fail("content must be a string, a list of text parts, or null.", param)
    for i, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise _fail('Each content part must be {"type": "text", "text": "…"}.', f"{param}.{i}")


def _tool_calls_check(tool_calls: Any, param: str) -> None:
    if not isinstance(tool_calls, list) or not tool_calls:
        raise _fail("tool_calls must be a non-empty array.", param)
    for i, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not (
            isinstance(fn, dict)
            and isinstance(call.get("id"), str)
            and isinstance(fn.get("name"), str)
            and isinstance(fn.get("arguments"), str)
        ):
            raise _fail("Each tool call needs id, type 'function' and function.name/arguments strings.", f"{param}.{i}")
        if not FUNCTION_NAME.fullmatch(fn["name"]):
            raise _fail("A function name is 1 to 64 letters, digits, _ or -.", f"{param}.{i}.function.name")


def _messages_check(messages: Any, *, resume: bool = False) -> list[dict]:
    if messages is None and resume:
        return []
    if messages is None:
        raise _fail("messages is required.", "messages")
    if not isinstance(messages, list) or not (messages or resume):
        raise _fail("messages must be a non-empty array.", "messages")
    for i, message in enumerate(messages):
        param = f"messages.{i}"
        if not isinstance(message, dict):
            raise _fail("Each message must be an object.", param)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise _fail(f"role must be one of {', '.join(sorted(ROLES))}.", f"{param}.role")
        if "content" not in message and not (role == "assistant" and message.get("tool_calls")):
            raise _fail("content is required.", f"{param}.content")
        has_tool_calls = role == "assistant" and message.get("tool_calls") is not None
        if has_tool_calls:
            _tool_calls_check(message["tool_calls"], f"{param}.tool_calls")
        _content_check(message.get("content"), f"{param}.content", nullable=has_tool_calls)
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise _fail("A tool message needs a tool_call_id string.", f"{param}.tool_call_id")
    if not resume and not any(m["role"] == "user" for m in messages):
        raise _fail("messages must contain at least one user message.", "messages")
    return messages


def _group_id_parse(model: Any) -> uuid.UUID:
    if model is None:
        raise _fail("model is required.", "model")
    if not isinstance(model, str) or not model.startswith("group:"):
        raise _fail("model must be 'group:<uuid>'.", "model")
    try:
        return uuid.UUID(model.removeprefix("group:"))
    except ValueError as exc:
        raise _fail("model must be 'group:<uuid>'.", "model") from exc


def _metadata_parse(metadata: Any) -> tuple[dict, str | None, str | None]:
    if metadata is None:
        return {}, None, None
    if not isinstance(metadata, dict):
        raise _fail("metadata must be an object.", "metadata")
    request_id = metadata.get("request_id")
    if request_id is not None and not (isinstance(request_id, str) and REQUEST_ID.fullmatch(request_id)):
        raise _fail(
            "request_id must be 1 to 128 printable ASCII characters (it is echoed in X-Request-ID).",
            "metadata.request_id",
        )
    mode = metadata.get("mode")
    if mode is not None and mode not in Mode.values:
        raise _fail(f"mode must be one of {', '.join(Mode.values)}.", "metadata.mode")
    extra = {k: v for k, v in metadata.items() if k not in ("request_id", "mode")}
    return extra, request_id, mode


def _passthrough_check(body: dict) -> dict:
    rules = {
        "top_p": (lambda v: _is_number(v) and 0 <= v <= 1, "top_p must be a number from 0 to 1."),
        "stop": (
            lambda v: (
                isinstance(v, str) or (isinstance(v, list) and len(v) <= 4 and all(isinstance(s, str) for s in v))
            ),
            "stop must be a string or an array of at most 4 strings.",
        ),
        "seed": (_is_int, "seed must be an integer."),
        "response_format": (
            lambda v: isinstance(v, dict) and isinstance(v.get("type"), str),
            "response_format must be an object with a type.",
        ),
        "user": (lambda v: isinstance(v, str), "user must be a string."),
    }
    passthrough = {}
    for name in PASSTHROUGH_FIELDS:
        if body.get(name) is not None:
            valid, message = rules[name]
            if not valid(body[name]):
                raise _fail(message, name)
            passthrough[name] = body[name]
    return passthrough


def _max_tokens_parse(body: dict) -> int | None:
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and not (_is_int(value) and 0 < value <= MAX_OUTPUT_TOKENS):
            raise _fail(f"{name} must be a positive integer no greater than {MAX_OUTPUT_TOKENS}.", name)
    return body.get("max_completion_tokens") or body.get("max_tokens")


def client_request_id(body: dict) -> str | None:
    """metadata.request_id when valid, read before the rest so even a 400 carries the client's id."""
    metadata = body.get("metadata")
    request_id = metadata.get("request_id") if isinstance(metadata, dict) else None
    return request_id if isinstance(request_id, str) and REQUEST_ID.fullmatch(request_id) else None


def _fingerprint(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def chat_request_parse(body: dict, *, resume: bool = False) -> ChatRequest:
    """Validate a completions body; every violation is a 400 naming its field. A resume's messages
    are optional (they are appended after the tool results)."""
    group_id = _group_id_parse(body.get("model"))
    messages = _messages_check(body.get("messages"), resume=resume)
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _fail("stream must be a boolean.", "stream")
    temperature = body.get("temperature")
    if temperature is not None and not (_is_number(temperature) and 0 <= temperature <= 2):
        raise _fail("temperature must be a number from 0 to 2.", "temperature")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise _fail("stream_options must be an object.", "stream_options")
    include_usage = (stream_options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _fail("include_usage must be a boolean.", "stream_options.include_usage")
    metadata, request_id, mode = _metadata_parse(body.get("metadata"))
    return ChatRequest(
        group_id=group_id,
        messages=messages,
        stream=bool(stream),
        max_tokens=_max_tokens_parse(body),
        temperature=temperature,
        mode=mode,
        request_id=request_id,
        metadata=metadata,
        include_usage=include_usage,
        passthrough=_passthrough_check(body),
        # Only an idempotency key needs the body's fingerprint: skip the extra JSON pass otherwise.
        body_hash=_fingerprint(body) if request_id is not None else "",
    )


@dataclass
class ResumeRequest:
    chat: ChatRequest
    approval_id: uuid.UUID
    approved: set[uuid.UUID]
    denied: dict[uuid.UUID, str]  # tool execution id → reason


def _uuid_parse(value: Any, param: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (TypeError, ValueError, AttributeError):
        raise _fail("Must be a UUID string.", param) from None


def resume_request_parse(body: dict) -> ResumeRequest:
    """Validate a resume body: the completions fields plus the approval and the API's decisions."""
    chat = chat_request_parse(body, resume=True)
    if body.get("approval_id") is None:
        raise _fail("approval_id is required.", "approval_id")
    approval_id = _uuid_parse(body["approval_id"], "approval_id")
    approved_ids = body.get("approved_tool_execution_ids") or []
    if not isinstance(approved_ids, list):
        raise _fail("approved_tool_execution_ids must be an array of UUIDs.", "approved_tool_execution_ids")
    approved = {_uuid_parse(v, f"approved_tool_execution_ids.{i}") for i, v in enumerate(approved_ids)}
    denied_items = body.get("denied_tools") or []
    if not isinstance(denied_items, list):
        raise _fail("denied_tools must be an array of {tool_execution_id, reason}.", "denied_tools")
    denied = {}
    for i, item in enumerate(denied_items):
        if not isinstance(item, dict):
            raise _fail("Each denied tool must be an object.", f"denied_tools.{i}")
        reason = item.get("reason") or ""
        if not isinstance(reason, str):
            raise _fail("reason must be a string.", f"denied_tools.{i}.reason")
        denied[_uuid_parse(item.get("tool_execution_id"), f"denied_tools.{i}.tool_execution_id")] = reason
    return ResumeRequest(chat=chat, approval_id=approval_id, approved=approved, denied=denied)


# --- Responses ------------------------------------------------------------------------------------


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    *, completion_id: str, created: int, model: str, message: dict, finish_reason: str, usage: dict, kitemesh: dict
) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": usage,
        "kitemesh": kitemesh,
    }


def chunk_body(
    *,
    completion_id: str,
    created: int,
    model: str,
    delta: dict | None = None,
    finish_reason: str | None = None,
    usage: dict | None = None,
    kitemesh: dict | None = None,
) -> dict:
    """A `chat.completion.chunk`; with `usage` and no delta it is the include_usage chunk (empty choices)."""
    chunk: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
    if delta is None and usage is not None:
        chunk["choices"] = []
    else:
        chunk["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason}]
    if usage is not None:
        chunk["usage"] = usage
    if kitemesh is not None:
        chunk["kitemesh"] = kitemesh
    return chunk


def sse_event(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse_event("[DONE]")


# --- Errors ---------------------------------------------------------------------------------------


def _from_drf(exc: Exception) -> KiteMeshError | None:
    if isinstance(exc, KiteMeshError):
        return exc
    if isinstance(exc, drf_exceptions.NotAuthenticated):
        return AuthenticationError(MISSING_TOKEN_MESSAGE)
    if isinstance(exc, drf_exceptions.AuthenticationFailed):
        return AuthenticationError(str(exc.detail))
    if isinstance(exc, drf_exceptions.MethodNotAllowed):
        return MethodNotAllowed(str(exc.detail), code="method_not_allowed")
    if isinstance(exc, drf_exceptions.NotFound):
        return NotFound(str(exc.detail))
    return None


def api_exception_handler(exc: Exception, context: dict) -> Response:
    """DRF's exception handler: every error, expected or not, leaves in the SPEC's envelope."""
    request = context["request"]._request
    error = _from_drf(exc)
    if error is None:
        logger.exception("Unhandled error in %s", request.path, extra={"request_id": request_id_of(request)})
        error = InternalError()
    return Response(
        error_body(error, request_id_of(request)), status=http_status(error)[0], headers=error_headers(error) or None
    )


# --- KiteMesh resources ---------------------------------------------------------------------------


def execution_body(execution: Any) -> dict:
    steps = [
        {
            "kind": s.kind,
            **({"tool": s.model_name} if s.kind == "tool_call" else {"model": s.model_name, "agent": s.agent or None}),
            "status": s.status,
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "usage_estimated": s.usage_estimated,
            "latency_ms": s.latency_ms,
            "error": s.error or None,
        }
        for s in execution.steps.all()
    ]
    return {
        "object": "execution",
        "id": str(execution.id),
        "status": execution.status,
        "model": f"group:{execution.group_id}" if execution.group_id else None,
        "group": execution.group.name if execution.group else None,
        "mode": execution.mode,
        "request_id": execution.request_id,
        "created_at": iso(execution.created_at),
        "finished_at": iso(execution.finished_at),
        "usage": usage_body(execution.prompt_tokens, execution.completion_tokens),
        "credits_charged": execution.credits_charged,
        "error": {k: execution.error[k] for k in ("type", "code", "message")} if execution.error else None,
        "steps": steps,
        "approvals": [{"id": str(a.id), "status": a.status} for a in execution.approvals.all()],
    }
