"""A tool call's arguments checked against its tool's JSON Schema (Draft 2020-12): the model's before they
are sent, and an approver's edit before it is accepted. Error messages are for the model or the approver,
and never quote a secret-looking value."""

import hashlib
import json

from jsonschema.exceptions import ValidationError, relevance

from core.errors import InvalidRequest
from core.json_schemas import schema_validator
from core.models import Tool
from core.redaction import secret_key

_MAX_REPORTED_ERRORS = 3
_JSON_KINDS = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def arguments_hash(arguments: str) -> str:
    """What binds an approval to the arguments it approved: checked again before they are sent."""
    return hashlib.sha256(arguments.encode()).hexdigest()


class ToolArgumentsInvalid(Exception):
    """The arguments are not a JSON object matching the tool's schema; the message says why."""


def edit_param(index: int) -> str:
    """The `param` of a resume's edit number `index`."""
    return f"edited_tool_executions.{index}.arguments"


def edit_invalid(problem: str, *, param: str | None) -> InvalidRequest:
    """The SPEC's 400 for an approver's edit (`problem` follows "The edited arguments")."""
    return InvalidRequest(f"The edited arguments {problem}.", param=param, code="invalid_tool_arguments")


def tool_arguments_parse(tool: Tool, arguments: str) -> dict:
    """The arguments as a dict, valid against the tool's JSON schema. An empty string means no arguments,
    as models send for parameterless functions."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError as exc:
        raise ToolArgumentsInvalid(f"arguments are not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ToolArgumentsInvalid(f"arguments must be a JSON object, not {_JSON_KINDS.get(type(value), 'null')}")
    validator = schema_validator(tool.parameters or {})
    if validator is None:
        raise ToolArgumentsInvalid(f"the tool {tool.name!r} has an invalid parameters schema")
    errors = sorted(validator.iter_errors(value), key=relevance, reverse=True)
    if errors:
        raise ToolArgumentsInvalid("; ".join(_error_text(e) for e in errors[:_MAX_REPORTED_ERRORS]))
    return value


def _error_text(error: ValidationError) -> str:
    path = ".".join(str(part) for part in error.absolute_path)
    secret = any(isinstance(p, str) and secret_key(p) for p in error.absolute_path) or (
        isinstance(error.schema, dict) and error.schema.get("x-redact") is True
    )
    # jsonschema quotes the offending value; a secret must not travel into step records and logs.
    message = f"invalid value (fails {error.validator!r})" if secret else _shorten(error.message, 200)
    return f"{path}: {message}" if path else message


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
