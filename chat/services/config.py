"""Config as code: `apply_config FILE` makes the database match a YAML file, idempotently (objects are
found by team and name, groups by id). Errors name the file, the entry and the field."""

import os
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from django.db import models, transaction

from approvals.rules import RULES_SCHEMA, rules_problem
from billing.ledger import credits_grant
from billing.models import CreditAccount
from chat.services.vault import secret_set
from core.json_schemas import schema_problem
from core.models import CustomModel, Group, GroupAgent, GroupFallback, Mode, Team, Tool, VaultSecret
from core.models.config import APPROVALS_REQUIRED_MAX

_NAME = {"type": "string", "minLength": 1, "maxLength": 100}
_MONEY = {"type": "number", "minimum": 0}
PRICE_DECIMALS = 6  # as stored (core.models): a finer price would be silently rounded
_HTTP_URL = {"type": "string", "pattern": "^https?://"}

CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "teams": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "name": _NAME,
                    "credits": {"type": "integer", "minimum": 0},
                    "requests_per_minute": {"type": "integer", "minimum": 1},
                    "concurrent_streams": {"type": "integer", "minimum": 1},
                    "alert_below": {"type": "integer", "minimum": 1},
                    "webhook_url": _HTTP_URL,
                    "webhook_secret": _NAME,
                },
                "dependentRequired": {"webhook_url": ["webhook_secret"], "webhook_secret": ["webhook_url"]},
            },
        },
        "secrets": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["team", "name"],
                "oneOf": [{"required": ["value"]}, {"required": ["value_from_env"]}],
                "properties": {
                    "team": _NAME,
                    "name": _NAME,
                    "description": {"type": "string"},
                    "value": {"type": "string", "minLength": 1},
                    "value_from_env": {"type": "string", "minLength": 1},
                },
            },
        },
        "models": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "team", "model"],
                "properties": {
                    "name": _NAME,
                    "team": _NAME,
                    "provider": {"enum": [c.value for c in CustomModel.Provider]},
                    "base_url": _HTTP_URL,
                    "model": {"type": "string", "minLength": 1},
                    "api_key_secret": _NAME,
                    "system": {"type": "string"},
                    "timeout_seconds": {"type": "number", "exclusiveMinimum": 0},
                    "price": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"input_per_1k": _MONEY, "output_per_1k": _MONEY},
                    },
                },
            },
        },
        "tools": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "team", "url"],
                "properties": {
                    "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                    "team": _NAME,
                    "description": {"type": "string"},
                    "method": {"enum": [c.value for c in Tool.Method]},
                    "url": _HTTP_URL,
                    "parameters": {"type": "object"},
                    "auth": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "secret"],
                        "properties": {
                            "type": {"enum": ["bearer", "header"]},
                            "secret": _NAME,
                            "header": {"type": "string", "minLength": 1},
                        },
                    },
                    "requires_approval": {"type": "boolean"},
                    "idempotent": {"type": "boolean"},
                    "approver": {"enum": [c.value for c in Tool.Approver]},
                    "approvals_required": {"type": "integer", "minimum": 1, "maximum": APPROVALS_REQUIRED_MAX},
                    "approval_rules": RULES_SCHEMA,
                    "risk": {"enum": [c.value for c in Tool.Risk]},
                    "price": _MONEY,
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
        "groups": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id", "name", "team", "brain"],
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "name": _NAME,
                    "team": _NAME,
                    "brain": _NAME,
                    "mode": {"enum": [c.value for c in Mode]},
                    "agents": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["model"],
                            "properties": {"model": _NAME, "name": _NAME, "role": {"type": "string"}},
                        },
                    },
                    "tools": {"type": "array", "items": _NAME},
                    "fallbacks": {"type": "array", "items": _NAME},
                    "approval": {"enum": [c.value for c in Group.ApprovalStyle]},
                    "approval_ttl_seconds": {"type": "integer", "minimum": 1},
                    "max_output_tokens": {"type": "integer", "minimum": 1},
                    "webhook_url": _HTTP_URL,
                    "webhook_secret": _NAME,
                },
                # A webhook is always signed: the URL comes with the secret that signs it.
                "dependentRequired": {"webhook_url": ["webhook_secret"], "webhook_secret": ["webhook_url"]},
            },
        },
    },
}


class ConfigError(Exception):
    pass


@dataclass
class ConfigResult:
    """How many objects each apply created, updated, or found as the file says."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def record(self, outcome: str, label: str) -> None:
        getattr(self, outcome).append(label)


def config_load(path: Path) -> dict[str, Any]:
    """Read and validate a config file's shape; references are checked while applying."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    validator = jsonschema.Draft202012Validator(CONFIG_SCHEMA, format_checker=jsonschema.FormatChecker())
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        raise ConfigError(f"{path}: {_entry_label(data, list(error.absolute_path))}: {error.message}")
    return data


def _entry_label(data: Any, path: list) -> str:
    """`models[1] (brain), field price.input_per_1k` for an error at that path."""
    if len(path) < 2:
        return "field " + ".".join(map(str, path)) if path else "top level"
    section, index, *rest = path
    entry = data[section][index]
    name = entry.get("name") or entry.get("id") if isinstance(entry, dict) else None
    label = f"{section}[{index}]" + (f" ({name})" if name else "")
    return label + (f", field {'.'.join(map(str, rest))}" if rest else "")


def _upsert(model: type[models.Model], lookup: dict, values: dict) -> tuple[models.Model, str]:
    obj = model.objects.filter(**lookup).first()
    if obj is None:
        return model.objects.create(**lookup, **values), "created"
    changed = [k for k, v in values.items() if getattr(obj, k) != v]
    for key in changed:
        setattr(obj, key, values[key])
    if changed:
        obj.save(update_fields=changed)
    return obj, "updated" if changed else "unchanged"


class _Applier:
    """Applies one validated file; every lookup error names the entry and field it came from."""

    def __init__(self, path: Path, data: dict) -> None:
        self.path, self.data, self.result = path, data, ConfigResult()

    def fail(self, section: str, index: int, field_name: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {_entry_label(self.data, [section, index, field_name])}: {message}")

    def ref(self, model: type[models.Model], section: str, index: int, field_name: str, **lookup) -> Any:
        obj = model.objects.filter(**lookup).first()
        if obj is None:
            what = model._meta.verbose_name
            raise self.fail(section, index, field_name, f"no {what} named {lookup.get('name')!r} in this team")
        return obj

    def price(self, section: str, index: int, field_name: str, value: float) -> Decimal:
        price = Decimal(str(value))
        if price.as_tuple().exponent < -PRICE_DECIMALS:
            raise self.fail(section, index, field_name, f"{value} has more than {PRICE_DECIMALS} decimal places")
        return price

    def team(self, section: str, index: int, name: str) -> Team:
        return self.ref(Team, section, index, "team", name=name)

    def apply(self) -> ConfigResult:
        for section in ("teams", "secrets", "models", "tools", "groups"):
            for index, entry in enumerate(self.data.get(section) or []):
                getattr(self, f"apply_{section}")(index, entry)
        for index, entry in enumerate(self.data.get("teams") or []):
            self.apply_team_webhook(index, entry)
        return self.result

    def apply_team_webhook(self, index: int, entry: dict) -> None:
        """A team's webhook secret, once the file's secrets exist."""
        team = Team.objects.get(name=entry["name"])
        secret = None
        if entry.get("webhook_secret"):
            secret = self.ref(VaultSecret, "teams", index, "webhook_secret", team=team, name=entry["webhook_secret"])
        if team.webhook_secret_id != (secret.pk if secret else None):
            team.webhook_secret = secret
            team.save(update_fields=["webhook_secret"])

    def apply_teams(self, index: int, entry: dict) -> None:
        values = {k: entry.get(k) for k in ("requests_per_minute", "concurrent_streams", "alert_below")}
        team, outcome = _upsert(Team, {"name": entry["name"]}, values | {"webhook_url": entry.get("webhook_url", "")})
        CreditAccount.objects.get_or_create(team=team)
        if outcome == "created" and entry.get("credits"):
            credits_grant(team=team, amount=entry["credits"], reason=f"initial grant from {self.path.name}")
        self.result.record(outcome, f"team {team.name}")

    def apply_secrets(self, index: int, entry: dict) -> None:
        team = self.team("secrets", index, entry["team"])
        value = entry.get("value")
        if value is None:
            value = os.environ.get(entry["value_from_env"])
            if not value:
                raise self.fail("secrets", index, "value_from_env", f"${entry['value_from_env']} is not set")
        existing = VaultSecret.objects.filter(team=team, name=entry["name"]).first()
        before = (bytes(existing.ciphertext), existing.description) if existing else None
        secret = secret_set(team=team, name=entry["name"], value=value, description=entry.get("description", ""))
        outcome = (
            "created"
            if before is None
            else ("unchanged" if before == (bytes(secret.ciphertext), secret.description) else "updated")
        )
        self.result.record(outcome, f"secret {team.name}/{secret.name}")

    def apply_models(self, index: int, entry: dict) -> None:
        team = self.team("models", index, entry["team"])
        provider = entry.get("provider", CustomModel.Provider.OPENAI)
        if provider == CustomModel.Provider.OPENAI and not entry.get("base_url"):
            raise self.fail("models", index, "base_url", "required for provider openai")
        secret = None
        if entry.get("api_key_secret"):
            secret = self.ref(VaultSecret, "models", index, "api_key_secret", team=team, name=entry["api_key_secret"])
        price = entry.get("price") or {}
        _, outcome = _upsert(
            CustomModel,
            {"team": team, "name": entry["name"]},
            {
                "provider": provider,
                "base_url": entry.get("base_url", ""),
                "model": entry["model"],
                "api_key_secret": secret,
                "system": entry.get("system", ""),
                "timeout_seconds": entry.get("timeout_seconds"),
                "input_per_1k": self.price("models", index, "price.input_per_1k", price.get("input_per_1k", 0)),
                "output_per_1k": self.price("models", index, "price.output_per_1k", price.get("output_per_1k", 0)),
            },
        )
        self.result.record(outcome, f"model {team.name}/{entry['name']}")

    def apply_tools(self, index: int, entry: dict) -> None:
        team = self.team("tools", index, entry["team"])
        parameters = entry.get("parameters") or {"type": "object", "properties": {}}
        if (message := schema_problem(parameters)) is not None:
            raise self.fail("tools", index, "parameters", f"not a valid JSON schema: {message}")
        rules = entry.get("approval_rules", [])
        if (problem := rules_problem(rules)) is not None:
            raise self.fail("tools", index, *problem)
        auth = entry.get("auth") or {}
        secret = None
        if auth:
            secret = self.ref(VaultSecret, "tools", index, "auth", team=team, name=auth["secret"])
            if auth["type"] == "header" and not auth.get("header"):
                raise self.fail("tools", index, "auth", "type 'header' needs a 'header' name")
        _, outcome = _upsert(
            Tool,
            {"team": team, "name": entry["name"]},
            {
                "description": entry.get("description", ""),
                "method": entry.get("method", Tool.Method.POST),
                "url": entry["url"],
                "parameters": parameters,
                "auth_type": auth.get("type", Tool.AuthType.NONE),
                "auth_header": auth.get("header", ""),
                "auth_secret": secret,
                "requires_approval": entry.get("requires_approval", False),
                "idempotent": entry.get("idempotent", False),
                "approver": entry.get("approver", Tool.Approver.ANY),
                "approvals_required": entry.get("approvals_required", 1),
                "approval_rules": rules,
                "risk": entry.get("risk", ""),
                "price": self.price("tools", index, "price", entry.get("price", 0)),
                "tags": entry.get("tags", []),
            },
        )
        self.result.record(outcome, f"tool {team.name}/{entry['name']}")

    def apply_groups(self, index: int, entry: dict) -> None:
        team = self.team("groups", index, entry["team"])
        group_id = uuid.UUID(entry["id"])
        if Group.objects.filter(pk=group_id).exclude(team=team).exists():
            raise self.fail("groups", index, "id", "this id belongs to a group of another team")
        namesake = Group.objects.filter(team=team, name=entry["name"]).exclude(pk=group_id).first()
        if namesake is not None:
            raise self.fail("groups", index, "name", f"already used by group {namesake.id} of this team")
        brain = self.ref(CustomModel, "groups", index, "brain", team=team, name=entry["brain"])
        tools = [self.ref(Tool, "groups", index, "tools", team=team, name=name) for name in entry.get("tools", [])]
        agents = [
            (
                a.get("name") or a["model"],
                self.ref(CustomModel, "groups", index, "agents", team=team, name=a["model"]),
                a.get("role", ""),
            )
            for a in entry.get("agents", [])
        ]
        if len({name for name, _, _ in agents}) != len(agents):
            raise self.fail("groups", index, "agents", "agent names must be unique (set 'name' to tell them apart)")
        fallbacks = [
            self.ref(CustomModel, "groups", index, "fallbacks", team=team, name=name)
            for name in entry.get("fallbacks", [])
        ]
        webhook_secret = None
        if entry.get("webhook_secret"):
            webhook_secret = self.ref(
                VaultSecret, "groups", index, "webhook_secret", team=team, name=entry["webhook_secret"]
            )
        group, outcome = _upsert(
            Group,
            {"pk": group_id},
            {
                "team": team,
                "name": entry["name"],
                "brain": brain,
                "mode": entry.get("mode", Mode.NORMAL),
                "approval_style": entry.get("approval", Group.ApprovalStyle.PER_TOOL),
                "approval_ttl_seconds": entry.get("approval_ttl_seconds", 900),
                "max_output_tokens": entry.get("max_output_tokens"),
                "webhook_url": entry.get("webhook_url", ""),
                "webhook_secret": webhook_secret,
            },
        )
        if _members_set(group, tools, agents, fallbacks) and outcome == "unchanged":
            outcome = "updated"
        self.result.record(outcome, f"group {team.name}/{group.name} ({group.id})")


def _members_set(
    group: Group, tools: list[Tool], agents: list[tuple[str, CustomModel, str]], fallbacks: list[CustomModel]
) -> bool:
    """Make the group's tools, agents (in order) and fallbacks (in order) these; whether any changed."""
    changed = False
    if {t.pk for t in group.tools.all()} != {t.pk for t in tools}:
        group.tools.set(tools)
        changed = True
    if [(a.name, a.model_id, a.role) for a in group.agents.all()] != [(n, m.pk, r) for n, m, r in agents]:
        group.agents.all().delete()
        GroupAgent.objects.bulk_create(
            GroupAgent(group=group, name=name, model=model, role=role, position=pos)
            for pos, (name, model, role) in enumerate(agents)
        )
        changed = True
    if [f.model_id for f in group.fallbacks.all()] != [m.pk for m in fallbacks]:
        group.fallbacks.all().delete()
        GroupFallback.objects.bulk_create(
            GroupFallback(group=group, model=model, position=pos) for pos, model in enumerate(fallbacks)
        )
        changed = True
    return changed


@transaction.atomic
def config_apply(path: Path) -> ConfigResult:
    """Apply a whole file or nothing."""
    return _Applier(path, config_load(path)).apply()
