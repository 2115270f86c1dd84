"""Config as code (SPEC §4): `apply_config FILE` makes the database match a YAML file, idempotently,
whole or not at all, with errors that name the file, the entry and the field."""

import copy
import io
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError

from billing.models import CreditAccount, LedgerEntry
from core.models import CustomModel, Group, GroupAgent, Team, Tool, VaultSecret
from core.vault import secret_value

GROUP_ID = "123e4567-e89b-12d3-a456-426614174000"
CRM_ENV = "KITEMESH_TEST_CRM_KEY"

FULL_CONFIG = {
    "teams": [{"name": "acme", "credits": 1000}],
    "secrets": [
        {"team": "acme", "name": "upstream-key", "value": "sk-upstream-by-value", "description": "upstream API key"},
        {"team": "acme", "name": "crm-key", "value_from_env": CRM_ENV},
    ],
    "models": [
        {
            "name": "brain",
            "team": "acme",
            "provider": "openai",
            "base_url": "http://127.0.0.1:8001/v1",
            "model": "gpt-4o-mini",
            "api_key_secret": "upstream-key",
            "system": "You are the acme brain.",
            "timeout_seconds": 30,
            "price": {"input_per_1k": 10, "output_per_1k": 20.5},
        },
        {
            "name": "researcher",
            "team": "acme",
            "provider": "scripted",
            "model": "scripted-1",
            "price": {"input_per_1k": 0.25, "output_per_1k": 1},
        },
    ],
    "tools": [
        {
            "name": "create_ticket",
            "team": "acme",
            "description": "Open a CRM ticket.",
            "method": "POST",
            "url": "https://crm.example/tickets",
            "parameters": {
                "type": "object",
                "properties": {"priority": {"type": "string"}},
                "required": ["priority"],
            },
            "auth": {"type": "bearer", "secret": "crm-key"},
            "requires_approval": True,
            "approver": "human",
            "risk": "high",
            "price": 1,
            "tags": ["crm", "write"],
        },
        {
            "name": "lookup_customer",
            "team": "acme",
            "method": "GET",
            "url": "https://crm.example/customers",
            "auth": {"type": "header", "header": "X-Api-Key", "secret": "crm-key"},
            "idempotent": True,
        },
    ],
    "groups": [
        {
            "id": GROUP_ID,
            "name": "support",
            "team": "acme",
            "brain": "brain",
            "mode": "synthesis",
            "agents": [
                {"model": "researcher", "role": "Find the facts."},
                {"model": "researcher", "name": "checker", "role": "Check the facts."},
            ],
            "tools": ["create_ticket", "lookup_customer"],
            "approval": "batch",
            "approval_ttl_seconds": 600,
            "max_output_tokens": 512,
        }
    ],
}
FULL_CONFIG_OBJECTS = 8  # 1 team, 2 secrets, 2 models, 2 tools, 1 group


def write_config(tmp_path: Path, data: dict, name: str = "kitemesh.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def apply(path: Path) -> str:
    out = io.StringIO()
    call_command("apply_config", str(path), stdout=out, stderr=io.StringIO())
    return out.getvalue()


def summary(output: str) -> str:
    return output.strip().splitlines()[-1]


def db_snapshot() -> dict:
    """Everything apply_config may write, in comparable form."""
    return {
        "teams": sorted(Team.objects.values_list("id", "name")),
        "accounts": sorted(CreditAccount.objects.values_list("team_id", "balance", "held")),
        "ledger": sorted(LedgerEntry.objects.values_list("id", "kind", "amount")),
        "secrets": sorted(
            (s.id, s.name, s.description, bytes(s.ciphertext), s.rotated_at) for s in VaultSecret.objects.all()
        ),
        "models": sorted(CustomModel.objects.values_list("id", "name", "base_url", "input_per_1k", "api_key_secret")),
        "tools": sorted(Tool.objects.values_list("id", "name", "price", "url", "auth_secret")),
        "groups": sorted(Group.objects.values_list("id", "name", "mode", "brain")),
        "group_tools": sorted(Group.tools.through.objects.values_list("group_id", "tool_id")),
        "agents": sorted(GroupAgent.objects.values_list("id", "group_id", "name", "model_id", "role")),
    }


@pytest.fixture
def crm_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(CRM_ENV, "crm-secret-from-env")
    return "crm-secret-from-env"


@pytest.fixture
def full_config(tmp_path: Path, crm_env: str) -> Path:
    return write_config(tmp_path, FULL_CONFIG)


def test_full_config_creates_every_object_with_every_field(db, full_config: Path):
    output = apply(full_config)

    assert summary(output) == f"{FULL_CONFIG_OBJECTS} created, 0 updated, 0 unchanged"
    assert "created: group acme/support (123e4567-e89b-12d3-a456-426614174000)" in output

    team = Team.objects.get(name="acme")
    account = CreditAccount.objects.get(team=team)
    assert (account.balance, account.held) == (1000, 0)
    grant = LedgerEntry.objects.get(team=team)
    assert (grant.kind, grant.amount, grant.balance_after) == ("grant", 1000, 1000)

    upstream_key = VaultSecret.objects.get(team=team, name="upstream-key")
    assert upstream_key.description == "upstream API key"
    assert secret_value(upstream_key) == "sk-upstream-by-value"
    crm_key = VaultSecret.objects.get(team=team, name="crm-key")
    assert secret_value(crm_key) == "crm-secret-from-env"

    brain = CustomModel.objects.get(team=team, name="brain")
    assert brain.provider == "openai"
    assert brain.base_url == "http://127.0.0.1:8001/v1"
    assert brain.model == "gpt-4o-mini"
    assert brain.api_key_secret == upstream_key
    assert brain.system == "You are the acme brain."
    assert brain.timeout_seconds == 30
    assert (brain.input_per_1k, brain.output_per_1k) == (Decimal("10"), Decimal("20.5"))
    researcher = CustomModel.objects.get(team=team, name="researcher")
    assert (researcher.provider, researcher.model, researcher.base_url) == ("scripted", "scripted-1", "")
    assert researcher.api_key_secret is None
    assert (researcher.input_per_1k, researcher.output_per_1k) == (Decimal("0.25"), Decimal("1"))

    ticket = Tool.objects.get(team=team, name="create_ticket")
    assert ticket.description == "Open a CRM ticket."
    assert (ticket.method, ticket.url) == ("POST", "https://crm.example/tickets")
    assert ticket.parameters == FULL_CONFIG["tools"][0]["parameters"]
    assert (ticket.auth_type, ticket.auth_secret, ticket.auth_header) == ("bearer", crm_key, "")
    assert ticket.requires_approval is True
    assert (ticket.approver, ticket.risk, ticket.price) == ("human", "high", Decimal("1"))
    assert ticket.tags == ["crm", "write"]
    lookup = Tool.objects.get(team=team, name="lookup_customer")
    assert (lookup.method, lookup.auth_type, lookup.auth_header, lookup.auth_secret) == (
        "GET",
        "header",
        "X-Api-Key",
        crm_key,
    )
    assert lookup.requires_approval is False
    assert (ticket.idempotent, lookup.idempotent) == (False, True)
    assert lookup.parameters == {"type": "object", "properties": {}}

    group = Group.objects.get(pk=uuid.UUID(GROUP_ID))
    assert (group.team, group.name, group.brain) == (team, "support", brain)
    assert (group.mode, group.approval_style) == ("synthesis", "batch")
    assert (group.approval_ttl_seconds, group.max_output_tokens) == (600, 512)
    assert {t.name for t in group.tools.all()} == {"create_ticket", "lookup_customer"}
    assert [(a.name, a.model, a.role, a.position) for a in group.agents.all()] == [
        ("researcher", researcher, "Find the facts.", 0),
        ("checker", researcher, "Check the facts.", 1),
    ]


def test_applying_the_same_file_twice_changes_nothing(db, full_config: Path):
    apply(full_config)
    before = db_snapshot()

    output = apply(full_config)

    assert summary(output) == f"0 created, 0 updated, {FULL_CONFIG_OBJECTS} unchanged"
    assert "created:" not in output and "updated:" not in output
    # Same rows, same ciphertexts (Fernet is randomised: a re-encryption would differ), same agents and
    # tools (agents are compared by row id, so rewriting them would show), no new ledger entry.
    assert db_snapshot() == before
    assert LedgerEntry.objects.count() == 1
    assert CreditAccount.objects.get(team__name="acme").balance == 1000


def test_changed_fields_are_updated_in_place(db, tmp_path: Path, crm_env: str):
    apply(write_config(tmp_path, FULL_CONFIG))
    ids = {
        "secret": VaultSecret.objects.get(name="upstream-key").pk,
        "brain": CustomModel.objects.get(name="brain").pk,
        "tool": Tool.objects.get(name="create_ticket").pk,
    }
    changed = copy.deepcopy(FULL_CONFIG)
    changed["secrets"][0]["value"] = "sk-rotated"
    changed["models"][0]["price"]["output_per_1k"] = 30
    changed["tools"][0]["price"] = 2.5
    changed["groups"][0]["tools"] = ["create_ticket"]

    output = apply(write_config(tmp_path, changed, "changed.yaml"))

    assert summary(output) == f"0 created, 4 updated, {FULL_CONFIG_OBJECTS - 4} unchanged"
    for label in ("secret acme/upstream-key", "model acme/brain", "tool acme/create_ticket", "group acme/support"):
        assert f"updated: {label}" in output
    secret = VaultSecret.objects.get(name="upstream-key")
    assert secret.pk == ids["secret"]
    assert secret_value(secret) == "sk-rotated"
    assert secret.rotated_at is not None
    brain = CustomModel.objects.get(name="brain")
    assert (brain.pk, brain.output_per_1k, brain.api_key_secret_id) == (ids["brain"], Decimal("30"), ids["secret"])
    tool = Tool.objects.get(name="create_ticket")
    assert (tool.pk, tool.price) == (ids["tool"], Decimal("2.5"))
    group = Group.objects.get(pk=uuid.UUID(GROUP_ID))
    assert [t.name for t in group.tools.all()] == ["create_ticket"]


def test_changing_group_agents_replaces_them(db, tmp_path: Path, crm_env: str):
    apply(write_config(tmp_path, FULL_CONFIG))
    changed = copy.deepcopy(FULL_CONFIG)
    changed["groups"][0]["agents"] = [{"model": "brain", "name": "second-opinion", "role": "Disagree."}]

    output = apply(write_config(tmp_path, changed, "changed.yaml"))

    assert "updated: group acme/support" in output
    group = Group.objects.get(pk=uuid.UUID(GROUP_ID))
    assert [(a.name, a.model.name, a.role) for a in group.agents.all()] == [("second-opinion", "brain", "Disagree.")]


def test_credits_are_granted_only_when_the_team_is_created(db, tmp_path: Path, crm_env: str):
    apply(write_config(tmp_path, FULL_CONFIG))
    richer = copy.deepcopy(FULL_CONFIG)
    richer["teams"][0]["credits"] = 5000

    output = apply(write_config(tmp_path, richer, "richer.yaml"))

    assert summary(output) == f"0 created, 0 updated, {FULL_CONFIG_OBJECTS} unchanged"
    assert CreditAccount.objects.get(team__name="acme").balance == 1000
    assert list(LedgerEntry.objects.values_list("kind", "amount")) == [("grant", 1000)]


def test_team_created_without_credits_gets_an_empty_account_and_no_grant(db, tmp_path: Path):
    apply(write_config(tmp_path, {"teams": [{"name": "lean"}]}))

    account = CreditAccount.objects.get(team__name="lean")
    assert (account.balance, account.held) == (0, 0)
    assert not LedgerEntry.objects.exists()


def test_prices_with_many_decimals_apply_idempotently(db, tmp_path: Path):
    """Per-1k prices are often tiny (0.00015 credits per 1k tokens); re-applying must not flap."""
    config = {
        "teams": [{"name": "acme"}],
        "models": [
            {
                "name": "cheap",
                "team": "acme",
                "provider": "scripted",
                "model": "scripted-1",
                "price": {"input_per_1k": 0.00015, "output_per_1k": 0.0006},
            }
        ],
    }
    path = write_config(tmp_path, config)
    apply(path)

    assert summary(apply(path)) == "0 created, 0 updated, 2 unchanged"


def _without(entry: dict, key: str) -> dict:
    return {k: v for k, v in entry.items() if k != key}


def _case(mutate) -> dict:
    data = copy.deepcopy(FULL_CONFIG)
    mutate(data)
    return data


def _other_team_owns_the_group_id(data: dict) -> None:
    data["teams"].append({"name": "globex"})
    data["models"].append({"name": "globex-brain", "team": "globex", "provider": "scripted", "model": "s"})
    data["groups"].insert(0, {"id": GROUP_ID, "name": "globex-support", "team": "globex", "brain": "globex-brain"})


BAD_FILES = [
    pytest.param(
        lambda d: d.update(teamz=[{"name": "acme"}]),
        ["top level", "teamz"],
        id="unknown-top-level-key",
    ),
    pytest.param(
        lambda d: d["models"][0].update(bse_url="http://127.0.0.1:8001/v1"),
        ["models[0] (brain)", "bse_url"],
        id="unknown-model-field",
    ),
    pytest.param(
        lambda d: d["tools"].__setitem__(0, _without(d["tools"][0], "url")),
        ["tools[0] (create_ticket)", "'url' is a required property"],
        id="missing-required-field",
    ),
    pytest.param(
        lambda d: d["teams"][0].update(credits="ten"),
        ["teams[0] (acme)", "field credits", "'ten'"],
        id="wrong-type",
    ),
    pytest.param(
        lambda d: d["groups"][0].update(mode="fancy"),
        ["groups[0] (support)", "field mode", "'fancy'"],
        id="bad-enum",
    ),
    pytest.param(
        lambda d: d["groups"][0].update(id="support-group-1"),
        ["groups[0] (support)", "field id", "uuid"],
        id="group-id-not-uuid",
    ),
    pytest.param(
        lambda d: d["models"][0].update(team="initech"),
        ["models[0] (brain)", "field team", "initech"],
        id="missing-team",
    ),
    pytest.param(
        lambda d: d["groups"][0].update(brain="oracle"),
        ["groups[0] (support)", "field brain", "oracle"],
        id="missing-brain-model",
    ),
    pytest.param(
        lambda d: d["groups"][0]["agents"].append({"model": "ghost-agent"}),
        ["groups[0] (support)", "field agents", "ghost-agent"],
        id="missing-agent-model",
    ),
    pytest.param(
        lambda d: d["groups"][0]["tools"].append("delete_everything"),
        ["groups[0] (support)", "field tools", "delete_everything"],
        id="missing-tool",
    ),
    pytest.param(
        lambda d: d["models"][0].update(api_key_secret="missing-key"),
        ["models[0] (brain)", "field api_key_secret", "missing-key"],
        id="missing-model-secret",
    ),
    pytest.param(
        lambda d: d["tools"][0]["auth"].update(secret="missing-key"),
        ["tools[0] (create_ticket)", "field auth", "missing-key"],
        id="missing-tool-secret",
    ),
    pytest.param(
        lambda d: d["secrets"][1].update(value_from_env="KITEMESH_TEST_UNSET_VARIABLE"),
        ["secrets[1] (crm-key)", "field value_from_env", "KITEMESH_TEST_UNSET_VARIABLE"],
        id="value-from-env-unset",
    ),
    pytest.param(
        lambda d: d["tools"][0].update(parameters={"type": "object", "properties": {"priority": {"type": "strng"}}}),
        ["tools[0] (create_ticket)", "field parameters", "JSON schema"],
        id="parameters-not-a-json-schema",
    ),
    pytest.param(
        lambda d: d["tools"][0].update(
            approval_rules=[
                {"name": "small", "when": {"properties": {"priority": {"const": "low"}}}, "then": "approve"},
                {"name": "odd", "when": {"properties": {"priority": {"type": "strng"}}}, "then": "deny"},
            ]
        ),
        ["tools[0] (create_ticket)", "field approval_rules[1].when", "not a valid JSON Schema"],
        id="rule-when-not-a-json-schema",
    ),
    pytest.param(
        lambda d: d["tools"][0].update(approvals_required=0),
        ["tools[0] (create_ticket)", "field approvals_required", "minimum"],
        id="approvals-required-zero",
    ),
    pytest.param(
        lambda d: d["tools"][0].update(approval_rules=[{"name": "r", "when": {}, "then": "maybe"}]),
        ["tools[0] (create_ticket)", "field approval_rules.0.then", "maybe"],
        id="rule-then-unknown",
    ),
    pytest.param(
        lambda d: d["tools"][0].update(
            approval_rules=[{"name": "r", "when": {}, "then": "ask"}, {"name": "r", "when": {}, "then": "deny"}]
        ),
        ["tools[0] (create_ticket)", "field approval_rules[1].name", "names two rules"],
        id="rule-names-twice",
    ),
    pytest.param(
        _other_team_owns_the_group_id,
        ["groups[1] (support)", "field id", "another team"],
        id="group-id-of-another-team",
    ),
    pytest.param(
        lambda d: d["models"][0].pop("base_url"),
        ["models[0] (brain)", "field base_url", "openai"],
        id="openai-without-base-url",
    ),
    pytest.param(
        lambda d: d["tools"][1]["auth"].pop("header"),
        ["tools[1] (lookup_customer)", "field auth", "header"],
        id="header-auth-without-header-name",
    ),
]


@pytest.mark.parametrize(("mutate", "expected"), BAD_FILES)
def test_bad_file_is_refused_naming_file_entry_and_field(
    db, tmp_path: Path, crm_env: str, monkeypatch: pytest.MonkeyPatch, mutate, expected
):
    monkeypatch.delenv("KITEMESH_TEST_UNSET_VARIABLE", raising=False)
    path = write_config(tmp_path, _case(mutate), "bad.yaml")
    before = db_snapshot()

    with pytest.raises(CommandError) as excinfo:
        apply(path)

    message = str(excinfo.value)
    assert message.startswith(f"{path}: ")
    for part in expected:
        assert part in message
    assert db_snapshot() == before, "a refused file must leave the database untouched"


def test_group_name_taken_by_another_group_id_is_a_config_error(db, tmp_path: Path, crm_env: str):
    apply(write_config(tmp_path, FULL_CONFIG))
    renumbered = copy.deepcopy(FULL_CONFIG)
    renumbered["groups"][0]["id"] = str(uuid.uuid4())
    path = write_config(tmp_path, renumbered, "renumbered.yaml")
    before = db_snapshot()

    with pytest.raises(CommandError) as excinfo:
        apply(path)

    assert str(excinfo.value).startswith(f"{path}: groups[0] (support)")
    assert "name" in str(excinfo.value)
    assert db_snapshot() == before


def test_error_late_in_the_file_rolls_back_every_earlier_change(db, tmp_path: Path, crm_env: str):
    apply(write_config(tmp_path, FULL_CONFIG))
    before = db_snapshot()
    broken = copy.deepcopy(FULL_CONFIG)
    broken["teams"].append({"name": "globex", "credits": 50})
    broken["secrets"][0]["value"] = "sk-rotated"
    broken["models"][0]["system"] = "Changed."
    broken["tools"][0]["price"] = 9
    broken["groups"][0]["brain"] = "no-such-brain"

    with pytest.raises(CommandError, match="no-such-brain"):
        apply(write_config(tmp_path, broken, "broken.yaml"))

    assert db_snapshot() == before
    assert not Team.objects.filter(name="globex").exists()
    assert secret_value(VaultSecret.objects.get(name="upstream-key")) == "sk-upstream-by-value"
    assert CustomModel.objects.get(name="brain").system == "You are the acme brain."


def test_unreadable_yaml_names_the_file(db, tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("teams: [{name: acme\n")

    with pytest.raises(CommandError) as excinfo:
        apply(path)

    assert str(excinfo.value).startswith(f"{path}: ")


def test_demo_config_applies_cleanly_and_idempotently(db):
    demo = Path(settings.BASE_DIR) / "config" / "demo.yaml"

    first = apply(demo)
    second = apply(demo)

    assert summary(first).startswith("6 created, 0 updated")
    assert summary(second) == "0 created, 0 updated, 6 unchanged"
    group = Group.objects.get(pk=uuid.UUID("00000000-0000-4000-8000-000000000001"))
    assert (group.team.name, group.brain.provider, group.mode) == ("demo", "scripted", "normal")
    assert [(t.name, t.requires_approval) for t in group.tools.all()] == [("health_check", True)]
    assert CreditAccount.objects.get(team=group.team).balance == 1000


def test_approval_rules_and_approvals_required_are_applied(db, tmp_path: Path, crm_env: str):
    rules = [{"name": "low-priority", "when": {"properties": {"priority": {"const": "low"}}}, "then": "approve"}]

    apply(write_config(tmp_path, _case(lambda d: d["tools"][0].update(approval_rules=rules, approvals_required=2))))

    tool = Tool.objects.get(name="create_ticket")
    assert (tool.approval_rules, tool.approvals_required) == (rules, 2)
