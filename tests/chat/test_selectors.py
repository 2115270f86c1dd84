"""The configuration a run reads (chat.selectors.group_for_run_get): written-out statements read through
raw(), so these check it against what the ORM reads, and that nothing is left to load lazily."""

from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from chat.selectors import group_for_run_get, group_list_for_caller, team_get
from chat.services.tokens import token_create
from chat.services.vault import secret_set
from core.callers import Caller
from core.errors import NotFound, PermissionDenied
from core.models import ApiToken, CustomModel, Group, GroupAgent, GroupFallback, Team, Tool, VaultSecret
from core.sql import db_value, sql_instances
from tests.conftest import Setup
from tests.support.helpers import live_token


def _caller(token: ApiToken) -> Caller:
    return Caller(token.team, 0, token=token)


def _fields(obj) -> dict:
    """Every concrete column's value, as the instance holds it."""
    return {f.attname: getattr(obj, f.attname) for f in obj._meta.concrete_fields}


def _model(setup: Setup, name: str, **fields) -> CustomModel:
    return CustomModel.objects.create(
        team=setup.team, name=name, base_url="http://127.0.0.1:9/v1", model=name, **fields
    )


def _tool(setup: Setup, name: str, **fields) -> Tool:
    return Tool.objects.create(team=setup.team, name=name, url="http://127.0.0.1:9/t", **fields)


@pytest.mark.parametrize("model", [Team, VaultSecret, CustomModel, Group, ApiToken, Tool], ids=lambda m: m.__name__)
def test_instances_read_by_written_out_statements_hold_what_the_orm_reads(setup: Setup, model):
    _tool(setup, "lookup", parameters={"type": "object"}, tags=["crm", "read"], price=Decimal("1.25"))
    setup.token.expires_at = setup.token.created_at
    setup.token.save()
    rows = list(model.objects.all())
    assert rows
    for expected in rows:
        key = db_value(model, model._meta.pk.name, expected.pk)
        statement = f"SELECT * FROM {model._meta.db_table} WHERE {model._meta.pk.column} = %s"

        (read,) = sql_instances(model, statement, [key])

        assert _fields(read) == _fields(expected)
        assert not read._state.adding


def test_a_run_reads_its_group_with_agents_tools_and_fallbacks_in_order_and_nothing_left_to_load(setup: Setup):
    group, token = setup.group, setup.token
    key = secret_set(team=setup.team, name="tool-key", value="tool-secret")
    writer, critic = _model(setup, "writer", api_key_secret=setup.brain.api_key_secret), _model(setup, "critic")
    GroupAgent.objects.create(group=group, name="critic", model=critic, position=2)
    GroupAgent.objects.create(group=group, name="writer", model=writer, position=1)
    GroupFallback.objects.create(group=group, model=critic, position=2)
    GroupFallback.objects.create(group=group, model=writer, position=1)
    tools = [_tool(setup, "mid", auth_secret=key), _tool(setup, "alpha"), _tool(setup, "zeta"), _tool(setup, "hidden")]
    group.tools.add(*tools)
    hidden = tools[-1]
    token.excluded_tools.add(hidden)

    parts = group_for_run_get(caller=_caller(live_token(setup.raw_token)), group_id=group.id)[1]
    expected = _fields(Group.objects.get(pk=group.pk))

    with CaptureQueriesContext(connection) as lazy:
        assert _fields(parts.group) == expected
        assert parts.group.team.name == setup.team.name
        assert parts.group.brain.api_key_secret.ciphertext == setup.brain.api_key_secret.ciphertext
        assert [(a.name, a.model.name) for a in parts.agents] == [("writer", "writer"), ("critic", "critic")]
        assert parts.agents[0].model.api_key_secret.name == "upstream-key"
        assert parts.agents[1].model.api_key_secret is None
        assert [m.name for m in parts.fallbacks] == ["writer", "critic"]
        assert [t.name for t in parts.tools] == ["alpha", "mid", "zeta"]
        assert parts.tools[1].auth_secret.name == "tool-key"
        assert parts.tools[0].auth_secret is None
    assert lazy.captured_queries == []


def test_a_token_that_selects_groups_reaches_only_those(setup: Setup):
    other = Group.objects.create(team=setup.team, name="other", brain=setup.brain)
    token, _ = token_create(team=setup.team, name="narrow")
    token.groups.add(other)

    assert group_for_run_get(caller=_caller(token), group_id=other.id)[1].group.name == "other"
    with pytest.raises(PermissionDenied):
        group_for_run_get(caller=_caller(token), group_id=setup.group.id)[1]
    token.excluded_groups.add(other)
    with pytest.raises(PermissionDenied):
        group_for_run_get(caller=_caller(token), group_id=other.id)[1]


def test_a_token_lists_the_groups_its_scope_covers_by_name(setup: Setup):
    zulu, alpha, hidden = (
        Group.objects.create(team=setup.team, name=n, brain=setup.brain) for n in ("zulu", "alpha", "x")
    )
    Group.objects.create(team=Team.objects.create(name="other"), name="elsewhere", brain=setup.brain)
    token = setup.token

    assert [g.name for g in group_list_for_caller(caller=_caller(token))] == ["alpha", "support", "x", "zulu"]
    token.excluded_groups.add(hidden)
    assert [g.name for g in group_list_for_caller(caller=_caller(token))] == ["alpha", "support", "zulu"]
    token.groups.add(zulu, alpha)
    assert [g.name for g in group_list_for_caller(caller=_caller(token))] == ["alpha", "zulu"]


def test_another_teams_group_is_not_found(setup: Setup):
    outsider = Team.objects.create(name="outsider")
    token, _ = token_create(team=outsider, name="outsider")

    with pytest.raises(NotFound):
        group_for_run_get(caller=_caller(token), group_id=setup.group.id)[1]


def test_a_missing_team_is_an_error_as_the_orm_would_raise(db):
    with pytest.raises(Team.DoesNotExist):
        team_get(team_id=10**9, version=0)
