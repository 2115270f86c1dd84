"""Read queries for the API: groups a token may use, and what a model call needs."""

import time
import uuid
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Exists, OuterRef, QuerySet

from chat.engine.providers import ModelEndpoint
from chat.errors import NotFound, PermissionDenied
from chat.models import ApiToken, CustomModel, Execution, Group, GroupAgent, GroupFallback, Team, Tool
from chat.services.vault import vault_decrypt

_TokenGroups = ApiToken.groups.through
_TokenExcludedGroups = ApiToken.excluded_groups.through
_TokenTools = ApiToken.tools.through
_TokenExcludedTools = ApiToken.excluded_tools.through


def _groups_with_scope(token: ApiToken) -> QuerySet[Group]:
    """The team's groups, each annotated with whether the token's scope covers it (one query)."""
    selected = _TokenGroups.objects.filter(apitoken_id=token.pk)
    return Group.objects.filter(team_id=token.team_id).annotate(
        scope_selects_some=Exists(selected),
        scope_selects=Exists(selected.filter(group_id=OuterRef("pk"))),
        scope_excludes=Exists(_TokenExcludedGroups.objects.filter(apitoken_id=token.pk, group_id=OuterRef("pk"))),
    )


def _in_scope(obj: Group | Tool) -> bool:
    return (obj.scope_selects or not obj.scope_selects_some) and not obj.scope_excludes


def group_for_token_get(*, token: ApiToken, group_id: uuid.UUID) -> Group:
    """The group a request names, with its brain; 404 when the team has no such group, 403 when the
    token's scope leaves it out."""
    group = (
        _groups_with_scope(token)
        .select_related("brain", "brain__api_key_secret", "team")
        .annotate(
            has_agents=Exists(GroupAgent.objects.filter(group=OuterRef("pk"))),
            has_tools=Exists(Group.tools.through.objects.filter(group_id=OuterRef("pk"))),
            has_fallbacks=Exists(GroupFallback.objects.filter(group=OuterRef("pk"))),
        )
        .filter(pk=group_id)
        .first()
    )
    if group is None:
        raise NotFound(f"The model 'group:{group_id}' does not exist.", param="model", code="model_not_found")
    if not _in_scope(group):
        raise PermissionDenied(f"This API token may not use 'group:{group_id}'.", param="model")
    return group


@dataclass
class GroupForRun:
    """What a run needs of its group, read in one go: the group and brain, its agents, and the tools the
    token lets it offer."""

    group: Group
    agents: list[GroupAgent]
    tools: list[Tool]
    fallbacks: list[CustomModel]


# The per-process config cache: what a token may run of a group, (expires at, parts) by (token id, group
# id), and teams (their rate limits apply to every request), (expires at, team) by id. Reading a group
# costs several queries that compile slowly, for configuration that rarely changes. Changes made in this
# process clear the cache at once (chat.apps connects config_cache_clear); other processes see them within
# KITEMESH_CONFIG_CACHE_SECONDS. Tokens are checked on every request, so revocation is immediate
# (chat.services.tokens).
_run_config: dict[tuple[int, uuid.UUID], tuple[float, GroupForRun]] = {}
_RUN_CONFIG_MAX_ENTRIES = 10_000
_teams: dict[int, tuple[float, Team]] = {}


def config_cache_clear(**_signal_kwargs) -> None:
    _run_config.clear()
    _teams.clear()


def team_cached(*, team_id: int) -> Team | None:
    """The team when the config cache holds it fresh (no database: callable from async code)."""
    cached = _teams.get(team_id)
    return cached[1] if cached is not None and cached[0] > time.monotonic() else None


def team_get(*, team_id: int) -> Team:
    """The team, through the per-process config cache (its name and rate limits are configuration)."""
    if (team := team_cached(team_id=team_id)) is not None:
        return team
    team = Team.objects.get(pk=team_id)
    _teams[team_id] = (time.monotonic() + settings.KITEMESH_CONFIG_CACHE_SECONDS, team)
    return team


def group_for_run_cached(*, token: ApiToken, group_id: uuid.UUID) -> GroupForRun | None:
    """The cached parts when they are fresh (no database: callable from async code). The parts are
    shared by the requests running them: read them, never change them."""
    cached = _run_config.get((token.pk, group_id))
    return cached[1] if cached is not None and cached[0] > time.monotonic() else None


def group_for_run_get(*, token: ApiToken, group_id: uuid.UUID) -> GroupForRun:
    """group_for_run_load, through the per-process cache."""
    if (parts := group_for_run_cached(token=token, group_id=group_id)) is not None:
        return parts
    parts = group_for_run_load(token=token, group_id=group_id)
    if len(_run_config) >= _RUN_CONFIG_MAX_ENTRIES:
        _run_config.clear()
    _run_config[(token.pk, group_id)] = (time.monotonic() + settings.KITEMESH_CONFIG_CACHE_SECONDS, parts)
    return parts


def group_for_run_load(*, token: ApiToken, group_id: uuid.UUID) -> GroupForRun:
    """group_for_token_get, plus agents, tools and brain fallbacks (no query for what a group has none of)."""
    group = group_for_token_get(token=token, group_id=group_id)
    agents = list(group.agents.select_related("model", "model__api_key_secret")) if group.has_agents else []
    tools = tools_for_token_list(token=token, group=group) if group.has_tools else []
    fallbacks = (
        [f.model for f in group.fallbacks.select_related("model", "model__api_key_secret")]
        if group.has_fallbacks
        else []
    )
    return GroupForRun(group=group, agents=agents, tools=tools, fallbacks=fallbacks)


def group_list_for_token(*, token: ApiToken) -> list[Group]:
    return [g for g in _groups_with_scope(token).order_by("name") if _in_scope(g)]


def model_endpoint_get(model: CustomModel) -> ModelEndpoint:
    """Expects `api_key_secret` already loaded (select_related) so this makes no query."""
    return ModelEndpoint(
        name=model.name,
        provider=model.provider,
        base_url=model.base_url,
        model=model.model,
        api_key=vault_decrypt(model.api_key_secret) if model.api_key_secret else None,
        timeout_seconds=model.timeout_seconds,
    )


def tools_for_token_list(*, token: ApiToken, group: Group) -> list[Tool]:
    """The group's tools this token lets the model use (the others are not offered at all), with
    their auth secrets loaded."""
    selected = _TokenTools.objects.filter(apitoken_id=token.pk)
    tools = group.tools.select_related("auth_secret").annotate(
        scope_selects_some=Exists(selected),
        scope_selects=Exists(selected.filter(tool_id=OuterRef("pk"))),
        scope_excludes=Exists(_TokenExcludedTools.objects.filter(apitoken_id=token.pk, tool_id=OuterRef("pk"))),
    )
    return [t for t in tools.order_by("name") if _in_scope(t)]


def execution_for_team_get(*, team_id: int, execution_id: uuid.UUID) -> Execution:
    execution = (
        Execution.objects.select_related("group")
        .prefetch_related("steps", "approvals")
        .filter(pk=execution_id, team_id=team_id)
        .first()
    )
    if execution is None:
        raise NotFound(f"No execution {execution_id}.", code="execution_not_found")
    return execution


def team_list_for_user(*, user: AbstractBaseUser, every_team: bool) -> QuerySet[Team]:
    """The teams a person works for on the pages; `every_team` (superusers, or staff where a page
    allows it) sees them all."""
    teams = Team.objects.order_by("name")
    return teams if every_team else teams.filter(members=user)
