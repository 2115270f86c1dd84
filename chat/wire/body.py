"""A request's JSON body, read so that nothing in it reaches the database or an encoder that cannot store
it: NUL, a lone surrogate, NaN or Infinity, an integer beyond 64 bits are refused here, naming where."""

import json
import math
import re
from typing import Any

from core.errors import InvalidRequest

REQUEST_ID = re.compile(r"[\x20-\x7e]{1,128}")  # goes into a response header: printable ASCII only


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
    """The JSON body as a dict; 400 `invalid_json` when it is not a JSON object, 400 naming the place of
    anything in it that cannot be stored."""
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


def client_request_id(body: dict) -> str | None:
    """metadata.request_id when valid, read before the rest so even a 400 carries the client's id."""
    metadata = body.get("metadata")
    request_id = metadata.get("request_id") if isinstance(metadata, dict) else None
    return request_id if isinstance(request_id, str) and REQUEST_ID.fullmatch(request_id) else None
