"""The approval lifecycle: pause a round of tool calls, record decisions (UI or API), claim the resume
exactly once, and expire. Each function owns its transaction; the approval row is the lock. Every change
is announced after commit (approvals.events for browsers, approvals.webhooks for the group's receiver)."""

import copy
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from approvals import events
from approvals.events import approval_event_send
from approvals.webhooks import approval_webhook_record
from billing.models import Hold
from billing.services.ledger import hold_create, holds_release
from chat.errors import Conflict, Gone, InvalidRequest, PermissionDenied
from chat.services.executions import execution_settle, lease_deadline, tool_calls_of
from chat.wire import iso
from core.models import ApiToken, Approval, Execution, Group, Step, Tool, ToolExecution

Status = ToolExecution.Status
# An approval waiting for its resume: for decisions (pending), or for its client to retry the resume its
# crashed run left unfinished (interrupted).
WAITING = (Approval.Status.PENDING, Approval.Status.INTERRUPTED)


def _announce(approval: Approval, event_type: str, *, waiting: int | None = None) -> None:
    """The browser event, sent after commit, and the webhook event, recorded in this transaction for the
    worker to deliver: a rolled-back change reaches neither. `approval.group` must be loaded (it is, on
    every path here) or it costs a query."""
    group = approval.group
    data = {"approval_id": str(approval.id), "group": group.name, "waiting": waiting}
    transaction.on_commit(partial(approval_event_send, team_id=approval.team_id, event_type=event_type, data=data))
    if group.webhook_url:
        approval_webhook_record(approval=approval, event_type=event_type)


@dataclass
class Paused:
    approval: Approval


def approval_pause(
    *,
    execution: Execution,
    group: Group,
    hold: Hold | None,
    steps: list[Step],
    tool_executions: list[ToolExecution],
    state: dict,
    hold_amount: int,
    response: dict,
    steps_written: int = 0,
) -> Paused:
    """Settle the request so far (`steps`, the first `steps_written` of them written already), persist
    the round (calls and conversation) and hold what its tools will cost. `response` is the pause
    answer, completed here with the approval's id and expiry."""
    with transaction.atomic(durable=True):
        charged = execution_settle(execution=execution, hold=hold, steps=steps, steps_written=steps_written)
        approval = Approval.objects.create(
            execution=execution,
            team_id=execution.team_id,
            group=group,
            expires_at=timezone.now() + timedelta(seconds=group.approval_ttl_seconds),
            state=state,
        )
        for position, tool_execution in enumerate(tool_executions):
            tool_execution.approval, tool_execution.position = approval, position
        ToolExecution.objects.bulk_create(tool_executions)
        if hold_amount > 0:  # while it waits, the execution's one active hold
            hold_create(execution=execution, amount=hold_amount)
        response["kitemesh"].update(
            approval_id=str(approval.id), expires_at=iso(approval.expires_at), credits_charged=charged
        )
        execution.status = Execution.Status.PAUSED
        execution.response = execution.response or _without_arguments(response)
        execution.lease_expires_at = None
        execution.save(
            update_fields=[
                "status",
                "prompt_tokens",
                "completion_tokens",
                "credits_charged",
                "response",
                "lease_expires_at",
            ]
        )
        _announce(approval, events.CREATED, waiting=sum(te.requires_approval for te in tool_executions))
    return Paused(approval=approval)


def _without_arguments(response: dict) -> dict:
    """The pause answer as kept for replays: its tool calls' arguments stay encrypted with their tool
    executions, from which a replay takes them back (chat.services.executions)."""
    kept = copy.deepcopy(response)
    for call in tool_calls_of(kept):
        call["function"]["arguments"] = None
    return kept


def approval_expire(*, approval: Approval) -> bool:
    """Expire a pending approval past its time and release its hold; False when it was not due or
    already settled. Safe to call from anywhere, any number of times."""
    with transaction.atomic(durable=True):
        expired = Approval.objects.filter(pk=approval.pk, status__in=WAITING, expires_at__lte=timezone.now()).update(
            status=Approval.Status.EXPIRED, resolved_at=timezone.now()
        )
        if not expired:
            return False
        holds_release(execution_id=approval.execution_id)
        Execution.objects.filter(pk=approval.execution_id, status=Execution.Status.PAUSED).update(
            status=Execution.Status.EXPIRED, finished_at=timezone.now()
        )
        approval.status = Approval.Status.EXPIRED
        _announce(approval, events.EXPIRED)
    return True


def approval_interrupt(*, approval: Approval) -> None:
    """A resumed approval whose run's process died waits again, for its client to resume it once more
    (SPEC §7), with a fresh expiry. Runs inside the caller's transaction (chat.services.recovery)."""
    approval.status = Approval.Status.INTERRUPTED
    approval.expires_at = timezone.now() + timedelta(seconds=approval.group.approval_ttl_seconds)
    approval.resolved_at = None
    approval.save(update_fields=["status", "expires_at", "resolved_at"])
    _announce(approval, events.INTERRUPTED)


def approvals_expire_due() -> int:
    """Expire every approval past its time (the sweep); how many were expired."""
    due = Approval.objects.filter(status__in=WAITING, expires_at__lte=timezone.now()).select_related("group")
    return sum(approval_expire(approval=approval) for approval in due.iterator())


def _expire_if_due(approval: Approval) -> None:
    # Expiry is lazy: the one who finds an approval past its time releases its hold (and says so).
    if approval.status in WAITING and approval.expires_at <= timezone.now():
        approval_expire(approval=approval)


def _decidable_lock(approval: Approval) -> Approval:
    """The approval row, locked (lock order: approval, then its tool executions), if a person may still
    decide on it; else the reason, as a Conflict whose message is for the approver."""
    locked = Approval.objects.select_for_update().get(pk=approval.pk)
    if locked.status == Approval.Status.RESUMED:
        raise Conflict(
            "This approval was already resumed by the API client; nothing was changed.",
            code="approval_already_resumed",
        )
    if locked.status == Approval.Status.EXPIRED or locked.expires_at <= timezone.now():
        raise Conflict("This approval has expired; nothing was changed.", code="approval_expired")
    return locked


def _decision_fields(*, approve: bool, reason: str, actor: AbstractBaseUser) -> dict:
    """The audit of a page decision: what, who, when and why, written with the decision itself."""
    return {
        "status": Status.APPROVED if approve else Status.DENIED,
        "decided_via": ToolExecution.DecidedVia.UI,
        "decided_by": actor.get_username(),
        "decided_by_user": actor,
        "decision_reason": reason[:500],
        "decided_at": timezone.now(),
    }


def _waiting(approval: Approval) -> int:
    return approval.tool_executions.filter(requires_approval=True, status=Status.PENDING).count()


def approval_decide(
    *, approval: Approval, tool_execution: ToolExecution, approve: bool, reason: str, actor: AbstractBaseUser
) -> None:
    """A decision from the approver page: recorded once, with who, when and why. The approval row lock
    orders it against a resume claim, so a decision is either seen by the resume or refused."""
    _expire_if_due(approval)
    with transaction.atomic(durable=True):
        _decidable_lock(approval)
        decided = ToolExecution.objects.filter(
            pk=tool_execution.pk, approval=approval, requires_approval=True, status=Status.PENDING
        ).update(**_decision_fields(approve=approve, reason=reason, actor=actor))
        if not decided:
            raise Conflict(
                f"{tool_execution.tool_name} was already decided; nothing was changed.", code="decision_conflict"
            )
        _announce(approval, events.DECIDED, waiting=_waiting(approval))


def approval_decide_all(*, approval: Approval, approve: bool, reason: str, actor: AbstractBaseUser) -> int:
    """Approve or deny, in one transaction, every call of the approval still waiting for a decision (the
    only way `batch` groups decide on the page); returns how many were decided."""
    _expire_if_due(approval)
    with transaction.atomic(durable=True):
        _decidable_lock(approval)
        decided = ToolExecution.objects.filter(approval=approval, requires_approval=True, status=Status.PENDING).update(
            **_decision_fields(approve=approve, reason=reason, actor=actor)
        )
        if not decided:
            raise Conflict("Every tool call was already decided; nothing was changed.", code="decision_conflict")
        _announce(approval, events.DECIDED, waiting=0)
    return decided


@dataclass
class ResumeClaim:
    approval: Approval
    execution: Execution
    tool_executions: list[ToolExecution]  # the whole round, in the order the model asked
    hold: Hold | None


def _decisions_merge(
    *, approval: Approval, round_calls: list[ToolExecution], approved: set[uuid.UUID], denied: dict[uuid.UUID, str]
) -> dict[uuid.UUID, bool]:
    """The API's decisions checked against the SPEC's rules and the UI's; returns the API decisions to
    write (id → approve). Raises the SPEC's errors."""
    needing = {te.id: te for te in round_calls if te.requires_approval}
    unknown = (approved | denied.keys()) - needing.keys()
    if unknown:
        raise InvalidRequest(
            f"Not a tool execution of this approval: {', '.join(sorted(map(str, unknown)))}.",
            param="approved_tool_execution_ids" if unknown & approved else "denied_tools",
            code="unknown_tool_execution",
        )
    both = approved & denied.keys()
    if both:
        raise InvalidRequest(f"Both approved and denied: {', '.join(sorted(map(str, both)))}.", param="denied_tools")
    api = {i: True for i in approved} | {i: False for i in denied}
    final = {}
    for te_id, te in needing.items():
        recorded = None if te.decision is None else te.decision == "approved"
        if te_id in api and te.tool is not None and te.tool.approver == Tool.Approver.HUMAN:
            raise PermissionDenied(f"Tool {te.tool_name!r} can only be decided by a person on the approver page.")
        if recorded is not None and te_id in api and api[te_id] != recorded:
            raise Conflict(f"Tool execution {te_id} was already decided otherwise.", code="decision_conflict")
        final[te_id] = api.get(te_id, recorded)
    missing = [str(i) for i, decision in final.items() if decision is None]
    if missing:
        raise Conflict(f"No decision for: {', '.join(missing)}.", code="decision_required")
    if approval.group.approval_style == Group.ApprovalStyle.BATCH and len(set(final.values())) > 1:
        raise InvalidRequest("This group approves in batch: approve all or deny all.", param="denied_tools")
    return {i: a for i, a in api.items() if needing[i].status == Status.PENDING}


def _tools_in_scope_check(round_calls: list[ToolExecution], tools_in_scope: set[int]) -> None:
    """A token resumes only a round whose every tool it may use: the round's calls run under its name."""
    outside = sorted(
        {te.tool_name for te in round_calls if te.tool_id is not None and te.tool_id not in tools_in_scope}
    )
    if outside:
        raise PermissionDenied(
            f"This API token may not use {', '.join(map(repr, outside))}; nothing was decided or run.",
            param="approval_id",
        )


def approval_resume_claim(
    *,
    token: ApiToken,
    approval: Approval,
    tools_in_scope: set[int],
    approved: set[uuid.UUID],
    denied: dict[uuid.UUID, str],
    hold_amount_for: Callable[[list[ToolExecution]], int],
) -> ResumeClaim:
    """Apply the API's decisions and claim the approval for this resume, exactly once: the approval
    row is locked and its status moved by a conditional update, so a second or concurrent resume gets
    409. The approval's hold is swapped for this request's (402 leaves the approval pending). A round
    with a tool outside `tools_in_scope` (the ids of the tools the token may use) is 403."""
    _expire_if_due(approval)
    if approval.status == Approval.Status.EXPIRED:
        raise Gone("This approval has expired.", param="approval_id")
    with transaction.atomic(durable=True):
        locked = Approval.objects.select_for_update().get(pk=approval.pk)
        if locked.status not in WAITING:
            raise Conflict("This approval was already resumed.", code="approval_already_resumed")
        round_calls = list(locked.tool_executions.select_related("tool", "tool__auth_secret").order_by("position"))
        _tools_in_scope_check(round_calls, tools_in_scope)
        decisions = _decisions_merge(approval=approval, round_calls=round_calls, approved=approved, denied=denied)
        now = timezone.now()
        for te in round_calls:
            if te.id in decisions:
                te.status = Status.APPROVED if decisions[te.id] else Status.DENIED
                te.decided_via, te.decided_by, te.decided_at = ToolExecution.DecidedVia.API, f"token:{token.name}", now
                te.decision_reason = denied.get(te.id, "")[:500]
                ToolExecution.objects.filter(pk=te.pk, status=Status.PENDING).update(
                    status=te.status,
                    decided_via=te.decided_via,
                    decided_by=te.decided_by,
                    decision_reason=te.decision_reason,
                    decided_at=now,
                )
        Approval.objects.filter(pk=locked.pk, status=locked.status).update(
            status=Approval.Status.RESUMED, resolved_at=now
        )
        if decisions:
            _announce(approval, events.DECIDED, waiting=0)
        _announce(approval, events.RESUMED)
        holds_release(execution_id=locked.execution_id)  # the approval's, swapped for this request's below
        execution = locked.execution
        amount = hold_amount_for(round_calls)
        hold = hold_create(execution=execution, amount=amount) if amount > 0 else None
        execution.status = Execution.Status.RUNNING
        execution.lease_expires_at = lease_deadline()
        execution.save(update_fields=["status", "lease_expires_at"])
    locked.group = approval.group
    return ResumeClaim(approval=locked, execution=execution, tool_executions=round_calls, hold=hold)
