"""JSON Schema (Draft 2020-12) validators, built once per schema: checking a schema costs more than
validating a value against it, and a tool's parameters and its approval rules are checked on every call."""

import functools
import json

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError


def schema_validator(schema: dict | bool) -> Draft202012Validator | None:
    """The validator of `schema`, None when the schema itself is invalid."""
    return _validator(json.dumps(schema, sort_keys=True))


def schema_problem(schema: object) -> str | None:
    """Why `schema` is not a valid JSON Schema, None when it is."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        return exc.message
    return None


@functools.lru_cache(maxsize=1024)
def _validator(schema: str) -> Draft202012Validator | None:
    parsed = json.loads(schema)
    return Draft202012Validator(parsed) if schema_problem(parsed) is None else None
