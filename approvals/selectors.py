"""Read queries for approvals: the API's lookups, and what the approver pages show (the queue, one
approval with its costs, the history of decisions)."""

import datetime
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, Permission
from django.db.models import Exists, OuterRef, Prefetch, Q, QuerySet
from django.utils import timezone

from approvals.bodies import tool_execution_body, tool_execution_decision
from billing.pricing import tools_price
from billing.selectors import credit_account_get
from core.errors import NotFound
from core.models import ApiToken, Approval, Group, Team, Tool, ToolExecution
from core.redaction import arguments_secrets, text_redact
from core.selectors import runs_in_token_scope, team_list_for_user


def approval_for_token_get(*, token: ApiToken, approval_id: uuid.UUID) -> Approval:
    """The approval with its group and execution; 404 unless it is a run the token's scope covers."""
    approval = (
        Approval.objects.select_related("execution", "group")
        .filter(runs_in_token_scope(token=token), pk=approval_id)
        .first()
    )
    if approval is None:
        raise NotFound(f"No approval {approval_id}.", param="approval_id", code="approval_not_found")
    return approval


def approval_with_calls_get(*, approval_id: uuid.UUID) -> Approval:
    """The approval with its tool executions and their tools, for showing it (its access was checked)."""
    return (
        Approval.objects.select_related("execution", "group")
        .prefetch_related("tool_executions__tool", "tool_executions__approvals_given")
        .get(pk=approval_id)
    )


# --- The approver pages ---------------------------------------------------------------------------
# Who may see and decide: an active user with `core.decide_approval` (directly or through a Django
# auth group), for the teams they belong to; a superuser for every team.

DECIDE_PERMISSION = "core.decide_approval"
QUEUE_LIMIT = 200  # a queue longer than this is a backlog to drain, not a page to scroll
_RISK_ORDER = {"low": 0, "medium": 1, "high": 2}


def approver_team_ids(*, user: AbstractBaseUser | AnonymousUser) -> list[int]:
    """The teams whose approvals `user` may see and decide (none without the permission)."""
    if not (user.is_authenticated and user.is_active and user.has_perm(DECIDE_PERMISSION)):
        return []
    teams = team_list_for_user(user=user, every_team=user.is_superuser)
    return list(teams.values_list("id", flat=True))


def approver_names_list(*, team_id: int) -> list[str]:
    """Who may decide the team's approvals on the page, by username: its active members with the permission
    (directly or through an auth group), and superusers."""
    app_label, codename = DECIDE_PERMISSION.split(".")
    granted = {"content_type__app_label": app_label, "codename": codename}
    allowed = Permission.objects.filter(**granted)
    may = Q(user_permissions__in=allowed) | Q(groups__permissions__in=allowed)
    users = get_user_model().objects.filter(is_active=True).filter((may & Q(teams=team_id)) | Q(is_superuser=True))
    return sorted(set(users.values_list("username", flat=True)))


def approver_teams_list(*, user: AbstractBaseUser | AnonymousUser) -> list[Team]:
    return list(Team.objects.filter(pk__in=approver_team_ids(user=user)).order_by("name"))


def highest_risk(risks: list[str]) -> str:
    return max(risks, key=lambda risk: _RISK_ORDER.get(risk, 2), default="low")


def seconds_left(approval: Approval, now: datetime.datetime) -> int:
    return max(0, int((approval.expires_at - now).total_seconds()))


def duration_label(seconds: int) -> str:
    """`1 h 05 min`, `14 min 05 s`, `42 s`, as the queue's script also writes it while it ticks."""
    hours, rest = divmod(max(0, seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def approvals_label(te: ToolExecution) -> str:
    """`1 of 2 approvals`, for a call that needs several people."""
    return f"{len(te.approvals_given.all())} of {te.approvals_required} approvals"


def age_label(moment: datetime.datetime, now: datetime.datetime) -> str:
    seconds = int((now - moment).total_seconds())
    return "just now" if seconds < 60 else f"{duration_label(seconds)} ago"


@dataclass
class QueueItem:
    """One pending approval as the queue shows it."""

    approval: Approval
    tools: list[str]  # the calls waiting for a decision, in the order the model asked
    risk: str  # the highest of them
    waiting: int  # calls still without a decision
    needing: int  # calls that need one
    seconds_left: int
    requested: str  # how long ago the run paused
    approvals: list[str]  # for calls that need several people: "refund: 1 of 2 approvals"
    given: int  # approvals given to calls that need several people (a change the live queue shows)

    @property
    def time_left(self) -> str:
        return duration_label(self.seconds_left)


def _calls_pending() -> Exists:
    return Exists(
        ToolExecution.objects.filter(
            approval=OuterRef("pk"), requires_approval=True, status=ToolExecution.Status.PENDING
        )
    )


def _queue_queryset(*, team_ids: list[int], now: datetime.datetime) -> QuerySet[Approval]:
    """Pending, not yet expired, and still waiting for at least one decision: once every call is decided
    the approval waits for the API client, not for an approver."""
    return (
        Approval.objects.filter(team_id__in=team_ids, status=Approval.Status.PENDING, expires_at__gt=now)
        .filter(_calls_pending())
        .select_related("group", "team")
        .prefetch_related(
            Prefetch(
                "tool_executions",
                queryset=ToolExecution.objects.prefetch_related("approvals_given").order_by("position"),
            )
        )
        .order_by("-created_at")
    )


def _queue_item(approval: Approval, now: datetime.datetime) -> QueueItem:
    needing = [te for te in approval.tool_executions.all() if te.requires_approval]
    several = [te for te in needing if te.approvals_required > 1 and te.status == ToolExecution.Status.PENDING]
    return QueueItem(
        approval=approval,
        approvals=[f"{te.tool_name}: {approvals_label(te)}" for te in several],
        given=sum(len(te.approvals_given.all()) for te in several),
        tools=[te.tool_name for te in needing],
        risk=highest_risk([te.risk for te in needing]),
        waiting=sum(te.status == ToolExecution.Status.PENDING for te in needing),
        needing=len(needing),
        seconds_left=seconds_left(approval, now),
        requested=age_label(approval.created_at, now),
    )


def approval_queue_list(*, team_ids: list[int]) -> list[QueueItem]:
    """The approvals waiting for a person, newest first."""
    now = timezone.now()
    return [_queue_item(a, now) for a in _queue_queryset(team_ids=team_ids, now=now)[:QUEUE_LIMIT]]


@dataclass
class CallView:
    """A tool execution of the round, as the API shows it (approvals.bodies), plus what it costs."""

    tool_execution: ToolExecution
    body: dict  # tool_execution_body: tool, method, host, path, redacted arguments, risk, decision…
    arguments_text: str
    price: Decimal
    approver_human: bool
    approvals: str  # "1 of 2 approvals" for a call that needs several people, else ""
    original_text: str = ""  # the model's arguments (redacted) when an approver edited them
    edit_text: str = ""  # what the edit box holds: the arguments shown, or an edit the page refused
    edit_error: str = ""  # why the page refused that edit


@dataclass
class ApprovalDetail:
    approval: Approval
    calls: list[CallView]  # those that need a decision
    automatic: list[CallView]  # those of the round that run without one
    last_user_message: str
    run_credits: int  # charged to the execution so far
    tools_credits: int  # what the round's tools cost if every pending call is approved
    balance: int
    held: int
    available: int
    seconds_left: int
    requested: str
    expired: bool
    waiting: int  # calls still without a decision

    @property
    def time_left(self) -> str:
        return duration_label(self.seconds_left)

    @property
    def decidable(self) -> bool:
        return self.approval.status == Approval.Status.PENDING and not self.expired and self.waiting > 0

    @property
    def batch(self) -> bool:
        return self.approval.group.approval_style == Group.ApprovalStyle.BATCH


def _call_view(te: ToolExecution) -> CallView:
    body = tool_execution_body(te)
    arguments_text = json.dumps(body["arguments"], indent=2, ensure_ascii=False, sort_keys=True)
    return CallView(
        tool_execution=te,
        body=body,
        arguments_text=arguments_text,
        price=te.tool.price if te.tool else Decimal(0),
        approver_human=bool(te.tool and te.tool.approver == Tool.Approver.HUMAN),
        approvals=approvals_label(te) if te.approvals_required > 1 else "",
        original_text=json.dumps(body["original_arguments"], ensure_ascii=False, sort_keys=True) if te.edited else "",
        edit_text=arguments_text,
    )


def last_user_message(messages: list[dict]) -> str:
    """The text of the conversation's last user message (text parts joined)."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, list):
            return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        return content or ""
    return ""


def approval_detail_get(*, team_ids: list[int], approval_id: uuid.UUID) -> ApprovalDetail:
    """Everything an approver needs to decide: the calls (redacted as the API shows them), the
    conversation's last user message, and the money — the run's cost so far, the tools' and the team's."""
    approval = (
        Approval.objects.select_related("group", "team", "execution", "execution__token")
        .prefetch_related(
            Prefetch(
                "tool_executions",
                queryset=ToolExecution.objects.select_related("tool")
                .prefetch_related("approvals_given")
                .order_by("position"),
            )
        )
        .filter(pk=approval_id, team_id__in=team_ids)
        .first()
    )
    if approval is None:
        raise NotFound(f"No approval {approval_id}.", code="approval_not_found")
    views = [_call_view(te) for te in approval.tool_executions.all()]
    # What the calls' arguments hide is hidden in the conversation quoted beside them too.
    secrets = {s for te in approval.tool_executions.all() if te.tool for s in arguments_secrets(te.tool, te.arguments)}
    calls = [v for v in views if v.tool_execution.requires_approval]
    running = [v for v in views if v.tool_execution.status != ToolExecution.Status.DENIED]
    account = credit_account_get(team=approval.team)
    now = timezone.now()
    return ApprovalDetail(
        approval=approval,
        calls=calls,
        automatic=[v for v in views if not v.tool_execution.requires_approval],
        last_user_message=text_redact(last_user_message((approval.state or {}).get("messages", [])), secrets),
        run_credits=approval.execution.credits_charged,
        tools_credits=tools_price([v.tool_execution.tool for v in running]),  # as the resume holds it
        balance=account.balance,
        held=account.held,
        available=account.available,
        seconds_left=seconds_left(approval, now),
        requested=age_label(approval.created_at, now),
        expired=approval.status == Approval.Status.EXPIRED or approval.expires_at <= now,
        waiting=sum(v.tool_execution.status == ToolExecution.Status.PENDING for v in calls),
    )


def tool_execution_decided_list(*, team_ids: list[int]) -> QuerySet[ToolExecution]:
    """Decisions on calls (the page's, API clients' and approval rules'), newest first: who, when, why."""
    decided = Q(requires_approval=True) | Q(decided_via=ToolExecution.DecidedVia.RULE)
    return (
        ToolExecution.objects.filter(decided, execution__team_id__in=team_ids, decided_at__isnull=False)
        .select_related("execution__group", "execution__team")
        .order_by("-decided_at", "-id")
    )


@dataclass
class DecisionRow:
    """A decision in the history: the call, and an approver's edit as the redacted model's arguments and
    the redacted ones that ran (None when it was not edited)."""

    tool_execution: ToolExecution
    edit: tuple[str, str] | None


def decision_rows(tool_executions: Iterable[ToolExecution]) -> list[DecisionRow]:
    rows = []
    for te in tool_executions:
        edit = None
        if te.edited:
            shown = tool_execution_decision(te)
            edit = (_json_text(shown["original_arguments"]), _json_text(shown["arguments"]))
        rows.append(DecisionRow(te, edit))
    return rows


def _json_text(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)
