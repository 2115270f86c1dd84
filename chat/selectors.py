"""Read queries for the API and the chat pages: the groups a caller may use, what a model call needs, and a
person's conversations."""

import datetime
import functools
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Prefetch

from approvals.selectors import ApprovalDetail, approval_detail_get, approver_names_list, approver_team_ids
from chat.engine.providers import ModelEndpoint
from chat.models import Conversation, ConversationMessage
from chat.services.config_cache import cached, keep, version_check
from core.callers import Caller
from core.errors import NotFound, PermissionDenied
from core.models import (
    ApiToken,
    Approval,
    CustomModel,
    Execution,
    Group,
    GroupAgent,
    GroupFallback,
    Step,
    Team,
    Tool,
    VaultSecret,
)
from core.selectors import runs_in_token_scope
from core.sql import M, db_value, sql_instances
from core.vault import secret_value

_TokenGroups = ApiToken.groups.through
_TokenExcludedGroups = ApiToken.excluded_groups.through
_TokenTools = ApiToken.tools.through
_TokenExcludedTools = ApiToken.excluded_tools.through


def _in_scope(obj: Group | Tool) -> bool:
    return (obj.scope_selects or not obj.scope_selects_some) and not obj.scope_excludes


# The groups, tools and models a token may use are read by written-out statements through raw(), which
# compiles nothing: the ORM's compiler took 5 ms for a run's group alone, on every config cache miss
# (README, Benchmarks).


def group_for_caller_get(*, caller: Caller, group_id: uuid.UUID, version: int) -> Group:
    """The group a request names, with its team and brain; 404 when the team has no such group, 403 when
    the caller's token's scope leaves it out."""
    found = _groups_with_scope(caller, group_id=group_id)
    if not found:
        raise NotFound(f"The model 'group:{group_id}' does not exist.", param="model", code="model_not_found")
    group = found[0]
    if not _in_scope(group):
        raise PermissionDenied(f"This API token may not use 'group:{group_id}'.", param="model")
    group.team = team_get(team_id=group.team_id, version=version)
    group.brain = _models_with_secrets([group.brain_id])[group.brain_id]
    return group


@functools.cache
def _groups_with_scope_statement(*, one: bool) -> str:
    """A team's groups (`one` by id, else all by name), each with whether the token's scope covers it
    (see _in_scope; a member has no token, so no scope: every group) and whether it has agents, tools and
    fallbacks."""
    group, agent, fallback = (m._meta.db_table for m in (Group, GroupAgent, GroupFallback))
    chosen, excluded, tools = (m._meta.db_table for m in (_TokenGroups, _TokenExcludedGroups, Group.tools.through))
    return (
        f"SELECT g.*, EXISTS (SELECT 1 FROM {chosen} WHERE apitoken_id = %s) AS scope_selects_some,"
        f" EXISTS (SELECT 1 FROM {chosen} WHERE apitoken_id = %s AND group_id = g.id) AS scope_selects,"
        f" EXISTS (SELECT 1 FROM {excluded} WHERE apitoken_id = %s AND group_id = g.id) AS scope_excludes,"
        f" EXISTS (SELECT 1 FROM {agent} WHERE group_id = g.id) AS has_agents,"
        f" EXISTS (SELECT 1 FROM {tools} WHERE group_id = g.id) AS has_tools,"
        f" EXISTS (SELECT 1 FROM {fallback} WHERE group_id = g.id) AS has_fallbacks"
        f" FROM {group} g WHERE g.team_id = %s" + (" AND g.id = %s" if one else " ORDER BY g.name")
    )


def _groups_with_scope(caller: Caller, group_id: uuid.UUID | None = None) -> list[Group]:
    """_groups_with_scope_statement's groups: the caller's team's, or the one named."""
    token_id = caller.token_id
    params = [token_id, token_id, token_id, caller.team.pk]
    if group_id is not None:
        params.append(db_value(Group, "id", group_id))
    return sql_instances(Group, _groups_with_scope_statement(one=group_id is not None), params)


@functools.cache
def _tools_with_scope_statement() -> str:
    """A group's tools by name, each with whether the token's scope covers it (see _in_scope)."""
    tool, group_tools = Tool._meta.db_table, Group.tools.through._meta.db_table
    chosen, excluded = _TokenTools._meta.db_table, _TokenExcludedTools._meta.db_table
    return (
        f"SELECT t.*, EXISTS (SELECT 1 FROM {chosen} WHERE apitoken_id = %s) AS scope_selects_some,"
        f" EXISTS (SELECT 1 FROM {chosen} WHERE apitoken_id = %s AND tool_id = t.id) AS scope_selects,"
        f" EXISTS (SELECT 1 FROM {excluded} WHERE apitoken_id = %s AND tool_id = t.id) AS scope_excludes"
        f" FROM {tool} t JOIN {group_tools} gt ON gt.tool_id = t.id WHERE gt.group_id = %s ORDER BY t.name"
    )


def _by_group_statement(model: type[GroupAgent | GroupFallback]) -> str:
    return f"SELECT * FROM {model._meta.db_table} WHERE group_id = %s ORDER BY position, id"


def _by_ids(model: type[M], ids: Collection[int]) -> list[M]:
    if not ids:
        return []
    statement = f"SELECT * FROM {model._meta.db_table} WHERE id IN ({', '.join(['%s'] * len(ids))})"
    return sql_instances(model, statement, list(ids))


def _secrets_by_id(ids: Iterable[int | None]) -> dict[int, VaultSecret]:
    return {s.pk: s for s in _by_ids(VaultSecret, {i for i in ids if i is not None})}


def _models_with_secrets(ids: Collection[int]) -> dict[int, CustomModel]:
    """Custom models by id, each with its API key's secret loaded, as model_endpoint_get expects."""
    models = _by_ids(CustomModel, set(ids))
    secrets = _secrets_by_id(m.api_key_secret_id for m in models)
    for model in models:
        model.api_key_secret = secrets.get(model.api_key_secret_id)
    return {m.pk: m for m in models}


@dataclass
class GroupForRun:
    """What a run needs of its group, read in one go: the group and brain, its agents, and the tools the
    token lets it offer."""

    group: Group
    agents: list[GroupAgent]
    tools: list[Tool]
    fallbacks: list[CustomModel]


def team_get(*, team_id: int, version: int) -> Team:
    """The team, kept with the configuration read at `version` (its name and rate limits are configuration)."""
    entry = cached(("team", team_id))
    if entry is not None:
        return entry[1]
    found = _by_ids(Team, [team_id])
    if not found:
        raise Team.DoesNotExist(f"No team {team_id}.")
    keep(("team", team_id), found[0], version=version)
    return found[0]


def group_for_run_cached(*, caller: Caller, group_id: uuid.UUID) -> tuple[int, GroupForRun] | None:
    """(The configuration version they were read at, the parts) when this worker keeps them (no query:
    callable on the event loop). The parts are shared by the requests running them: read, never change."""
    return cached(("group", caller.scope_key, group_id))


def group_for_run_get(*, caller: Caller, group_id: uuid.UUID) -> tuple[int, GroupForRun]:
    """group_for_run_load through what this worker keeps, after checking the configuration's version;
    (that version, the parts). In a database thread."""
    version = version_check()
    entry = cached(("group", caller.scope_key, group_id))
    if entry is not None:
        return entry
    parts = group_for_run_load(caller=caller, group_id=group_id, version=version)
    keep(("group", caller.scope_key, group_id), parts, version=version)
    return version, parts


def group_for_run_load(*, caller: Caller, group_id: uuid.UUID, version: int) -> GroupForRun:
    """group_for_caller_get, plus agents, tools and brain fallbacks (no query for what a group has none of)."""
    group = group_for_caller_get(caller=caller, group_id=group_id, version=version)
    group_key = [db_value(Group, "id", group.pk)]
    agents = sql_instances(GroupAgent, _by_group_statement(GroupAgent), group_key) if group.has_agents else []
    links = sql_instances(GroupFallback, _by_group_statement(GroupFallback), group_key) if group.has_fallbacks else []
    models = _models_with_secrets({a.model_id for a in agents} | {f.model_id for f in links})
    for agent in agents:
        agent.model = models[agent.model_id]
    tools = tools_for_caller_list(caller=caller, group=group) if group.has_tools else []
    return GroupForRun(group=group, agents=agents, tools=tools, fallbacks=[models[f.model_id] for f in links])


def group_list_for_caller(*, caller: Caller) -> list[Group]:
    """The groups of the caller's team it may use, by name."""
    return [g for g in _groups_with_scope(caller) if _in_scope(g)]


def model_endpoint_get(model: CustomModel) -> ModelEndpoint:
    """Expects `api_key_secret` already loaded (as group_for_run_load loads it) so this makes no query."""
    return ModelEndpoint(
        name=model.name,
        provider=model.provider,
        base_url=model.base_url,
        model=model.model,
        api_key=secret_value(model.api_key_secret) if model.api_key_secret else None,
        timeout_seconds=model.timeout_seconds,
    )


def tools_for_caller_list(*, caller: Caller, group: Group) -> list[Tool]:
    """The group's tools the caller lets the model use (a token's scope may leave some out: they are not
    offered at all), with their auth secrets loaded."""
    token_id = caller.token_id
    params = [token_id, token_id, token_id, db_value(Group, "id", group.pk)]
    tools = [t for t in sql_instances(Tool, _tools_with_scope_statement(), params) if _in_scope(t)]
    secrets = _secrets_by_id(t.auth_secret_id for t in tools)
    for tool in tools:
        tool.auth_secret = secrets.get(tool.auth_secret_id)
    return tools


def execution_for_token_get(*, token: ApiToken, execution_id: uuid.UUID) -> Execution:
    """The execution with its steps and approvals; 404 unless it is a run the token's scope covers."""
    execution = (
        Execution.objects.select_related("group")
        .prefetch_related("steps__tool_execution", "approvals")
        .filter(runs_in_token_scope(token=token), pk=execution_id)
        .first()
    )
    if execution is None:
        raise NotFound(f"No execution {execution_id}.", code="execution_not_found")
    return execution


# --- Conversations (/chat/) ---------------------------------------------------------------------------------

CONVERSATIONS_PAGE = 20


def conversations_for_user_list(
    *, user: AbstractBaseUser, before: datetime.datetime | None = None, limit: int = CONVERSATIONS_PAGE
) -> tuple[list[Conversation], bool]:
    """The user's conversations, most recently active first, `limit` of them (older than `before`, for
    "load more"), and whether there are more."""
    conversations = Conversation.objects.filter(user=user).select_related("group")
    if before is not None:
        conversations = conversations.filter(updated_at__lt=before)
    page = list(conversations.order_by("-updated_at", "-created_at")[: limit + 1])
    return page[:limit], len(page) > limit


def conversation_for_user_get(
    *, user: AbstractBaseUser, conversation_id: uuid.UUID, reasoning: bool = False
) -> Conversation:
    """The user's own conversation with its messages (each answer with its execution), in a team the user
    still belongs to; 404 otherwise (another person's conversation does not exist for them). With
    `reasoning` (the page), each answer also carries its execution's steps and its `reasoning` lines (see
    reasoning_lines); a turn's request needs neither."""
    messages = ConversationMessage.objects.select_related("execution")
    if reasoning:
        messages = messages.prefetch_related("execution__steps")
    conversation = (
        Conversation.objects.filter(pk=conversation_id, user=user, team__members=user)
        .select_related("group", "team")
        .prefetch_related(Prefetch("messages", queryset=messages))
        .first()
    )
    if conversation is None:
        raise NotFound(f"No conversation {conversation_id}.", code="conversation_not_found")
    for message in conversation.messages.all() if reasoning else ():
        message.reasoning = reasoning_lines(message.execution) if message.execution else []
    return conversation


def member_groups_list(*, user: AbstractBaseUser) -> list[Group]:
    """The groups a person may chat with: every group of the teams they are an active member of, by team
    and name."""
    if not user.is_active:
        return []
    return list(Group.objects.filter(team__members=user).select_related("team").order_by("team__name", "name"))


def member_group_get(*, user: AbstractBaseUser, group_id: uuid.UUID) -> Group:
    """A group of one of the user's teams; 404 for any other (as the API answers a group of another team)."""
    group = Group.objects.filter(pk=group_id, team__members=user).select_related("team").first()
    if group is None:
        raise NotFound("There is no such group in your teams.", param="group", code="model_not_found")
    return group


_RUN_STATES = {
    Execution.Status.RUNNING: "running",
    Execution.Status.SUCCEEDED: "completed",
    Execution.Status.PAUSED: "waiting for approval",
}
_STEP_STATES = {Step.Status.SUCCEEDED: "done", Step.Status.CANCELLED: "stopped"}


def reasoning_lines(execution: Execution) -> list[str]:
    """A turn's live reasoning as its page shows it once the run has ended, worded as the page's script
    words it while the run works: the mode and the run's state, each agent's and tool call's outcome, the
    credits charged. `execution.steps` is prefetched."""
    lines = [f"{execution.mode.capitalize()} run: {_RUN_STATES.get(execution.status, 'interrupted')}"]
    for step in execution.steps.all():
        if step.kind == Step.Kind.TOOL_CALL:
            status = step.status if step.status != Step.Status.CANCELLED else "stopped"
            lines.append(f"Tool {step.model_name}: {status}")
        elif step.agent:
            lines.append(f"Agent {step.agent}: {_STEP_STATES.get(step.status, step.status)}")
    lines.append(f"{execution.credits_charged} credit{'s' if execution.credits_charged != 1 else ''} charged")
    return lines


@dataclass
class ApprovalCard:
    """The approval a conversation's last turn waits on, as its page shows it: the calls (redacted, as on
    /approvals/), whether this user may decide them there, and who can."""

    detail: ApprovalDetail
    can_decide: bool
    approvers: list[str]

    @property
    def ready(self) -> bool:
        """Every call decided (or its resumed run interrupted): the turn can continue."""
        approval = self.detail.approval
        if self.detail.expired:
            return False
        return approval.status == Approval.Status.INTERRUPTED or (
            approval.status == Approval.Status.PENDING and self.detail.waiting == 0
        )


def approval_card_get(*, user: AbstractBaseUser, conversation: Conversation) -> ApprovalCard | None:
    """The card of the approval the conversation's last answer waits on (pending, interrupted or expired);
    None when it waits on none. `conversation.messages` is prefetched."""
    last = next((m for m in reversed(conversation.messages.all()) if m.role == m.Role.ASSISTANT), None)
    if last is None or last.execution_id is None:
        return None
    approval = Approval.objects.filter(execution_id=last.execution_id).order_by("-created_at").first()
    if approval is None or approval.status == Approval.Status.RESUMED:
        return None
    return ApprovalCard(
        detail=approval_detail_get(team_ids=[conversation.team_id], approval_id=approval.id),
        can_decide=conversation.team_id in approver_team_ids(user=user),
        approvers=approver_names_list(team_id=conversation.team_id),
    )
