"""What people and logs are shown of a tool call's arguments: values of secret-looking keys, and of schema
properties marked `"x-redact": true`, become "[redacted]" — in the arguments, and wherever else a page
shows them."""

import json
from typing import Any

from core.models import Tool

REDACTED = "[redacted]"
_SECRET_KEY_PARTS = ("token", "password", "secret", "api_key", "apikey", "authorization")
# A hidden value shorter than this is not hidden elsewhere on a page: it would blank out common words.
SECRET_MIN_LENGTH = 4


def arguments_redact(tool: Tool, arguments: dict) -> dict:
    """A copy safe to show and store: values of secret-looking keys and of properties the schema marks
    `"x-redact": true` (at any depth) become "[redacted]". `$ref`s are not followed."""
    return _redact(arguments, tool.parameters or {})


def secret_key(key: str) -> bool:
    normalized = key.lower().replace("-", "_")
    return any(part in normalized for part in _SECRET_KEY_PARTS)


def _redact(value: Any, schema: Any) -> Any:
    schema = schema if isinstance(schema, dict) else {}
    if isinstance(value, dict):
        properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        redacted = {}
        for key, item in value.items():
            sub = properties.get(key, schema.get("additionalProperties"))
            marked = isinstance(sub, dict) and sub.get("x-redact") is True
            redacted[key] = REDACTED if marked or secret_key(str(key)) else _redact(item, sub)
        return redacted
    if isinstance(value, list):
        return [_redact(item, schema.get("items")) for item in value]
    return value  # JSON scalars are immutable


def arguments_secrets(tool: Tool, arguments: str) -> set[str]:
    """The values arguments_redact hides in these arguments (every scalar of a hidden object or list), as
    text: what a page must hide wherever else it shows them (the conversation quoted beside the call)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return set()
    if not isinstance(value, dict):
        return set()
    found: set[str] = set()
    _hidden(value, arguments_redact(tool, value), found)
    return {text for text in found if len(text) >= SECRET_MIN_LENGTH}


def text_redact(text: str, secrets: set[str]) -> str:
    """`text` with each of `secrets` in it replaced by "[redacted]", the longest first."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def _hidden(value: Any, redacted: Any, found: set[str]) -> None:
    if redacted == REDACTED and value != REDACTED:
        _scalars(value, found)
    elif isinstance(value, dict) and isinstance(redacted, dict):
        for key, item in value.items():
            _hidden(item, redacted.get(key), found)
    elif isinstance(value, list) and isinstance(redacted, list):
        for item, hidden in zip(value, redacted, strict=True):
            _hidden(item, hidden, found)


def _scalars(value: Any, found: set[str]) -> None:
    if isinstance(value, dict):
        for item in value.values():
            _scalars(item, found)
    elif isinstance(value, list):
        for item in value:
            _scalars(item, found)
    elif value is not None and not isinstance(value, bool):
        found.add(str(value))


def redacted_kept(edited: Any, original: Any) -> Any:
    """An approver's edit of arguments they saw redacted: wherever it still says "[redacted]" and the
    original has a value at that place, the original value stays (a secret the page hid is kept, not
    replaced by the marker)."""
    if edited == REDACTED:
        return original
    if isinstance(edited, dict) and isinstance(original, dict):
        return {key: redacted_kept(item, original[key]) if key in original else item for key, item in edited.items()}
    if isinstance(edited, list) and isinstance(original, list) and len(edited) == len(original):
        return [redacted_kept(e, o) for e, o in zip(edited, original, strict=True)]
    return edited
