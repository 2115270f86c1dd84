"""Approval rules (SPEC §6, Rules): a tool's ordered `approval_rules`, each a JSON Schema `when` over a
call's arguments and a `then`. The first rule the arguments satisfy decides the call before any person is
asked: `approve` (it runs without a pause), `deny` (it never runs; the model is told the rule's reason) or
`ask` (it waits for a decision even when the tool needs none). No match leaves it to `requires_approval`."""

import json
from dataclasses import dataclass
from typing import Any

from core.json_schemas import schema_problem, schema_validator
from core.models import Tool

APPROVE, DENY, ASK = "approve", "deny", "ask"
NAME_MAX_LENGTH = 64  # a rule's name is recorded as the call's decided_by
REASON_MAX_LENGTH = 500  # and its reason as the decision's

# The shape of `approval_rules`, for the config file's schema; `when` must also be a valid JSON Schema.
RULES_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "when", "then"],
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": NAME_MAX_LENGTH},
            "when": {"type": ["object", "boolean"]},
            "then": {"enum": [APPROVE, DENY, ASK]},
            "reason": {"type": "string", "maxLength": REASON_MAX_LENGTH},
        },
    },
}


@dataclass(frozen=True)
class RuleDecision:
    name: str
    then: str
    reason: str


def rules_problem(rules: Any) -> tuple[str, str] | None:
    """What is wrong with a tool's rules, as (the field's path, the message); None when they are valid."""
    if (problem := _shape_problem(rules)) is not None:
        return problem
    names = [rule["name"] for rule in rules]
    for index, rule in enumerate(rules):
        if (message := schema_problem(rule["when"])) is not None:
            return f"approval_rules[{index}].when", f"not a valid JSON Schema: {message}"
        if names.index(rule["name"]) != index:
            return f"approval_rules[{index}].name", f"{rule['name']!r} names two rules"
    return None


def _shape_problem(rules: Any) -> tuple[str, str] | None:
    validator = schema_validator(RULES_SCHEMA)
    assert validator is not None
    for error in validator.iter_errors(rules):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        return f"approval_rules{path}", error.message
    return None


def rule_decision(tool: Tool, arguments: str) -> RuleDecision | None:
    """The decision of the first of the tool's rules that the call's arguments (a JSON object) satisfy;
    None when none does, or the arguments are not an object (the tool's own check refuses them later)."""
    if not tool.approval_rules:
        return None
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    for rule in tool.approval_rules:
        validator = schema_validator(rule["when"])
        if validator is not None and validator.is_valid(value):
            return RuleDecision(rule["name"], rule["then"], rule.get("reason", ""))
    return None
