"""The approval lifecycle: pause a round of tool calls, record the page's decisions, expire, interrupt (the
resume's rules and claim: approvals.resume). Each function owns its transaction; the approval row is the
lock. Every change is announced after commit (approvals.events for browsers, approvals.webhooks for the
group's receiver)."""

import copy
import json
from dataclasses import dataclass
from datetime import timedelta
from functools import partial

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from approvals import events
from approvals.edits import edit_apply, edit_check
from approvals.events import approval_event_send
from approvals.webhooks import approval_webhook_record
from billing.ledger import Settlement, credits_round, holds_release, ledger, steps_cost
from billing.models import Hold
from core.errors import Conflict, InvalidRequest
from core.models import Approval, CallApproval, Execution, Group, Step, ToolExecution
from core.redaction import redacted_kept
from core.runs import tool_calls_of
from core.sql import sql_insert, sql_update
from core.timestamps import iso

Status = ToolExecution.Status
# An approval waiting for its resume: for decisions (pending), or for its client to retry the resume its
# crashed run left unfinished (interrupted).
WAITING = (Approval.Status.PENDING, Approval.Status.INTERRUPTED)


def approval_announce(approval: Approval, event_type: str, *, waiting: int | None = None) -> None:
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
        approval = Approval(
            execution=execution,
            team_id=execution.team_id,
            group=group,
            expires_at=timezone.now() + timedelta(seconds=group.approval_ttl_seconds),
            state=state,
        )
        for position, tool_execution in enumerate(tool_executions):
            tool_execution.approval, tool_execution.position = approval, position
        sql_insert([approval])
        sql_insert(tool_executions)
        expected = credits_round(steps_cost(steps))
        kitemesh = {"approval_id": str(approval.id), "expires_at": iso(approval.expires_at)}
        response["kitemesh"].update(kitemesh, credits_charged=expected)
        execution.status, execution.lease_expires_at = Execution.Status.PAUSED, None
        first = execution.response is None  # the first answer is kept for replays
        if first:
            execution.response = _without_arguments(response)
        settlement = Settlement(execution, hold, steps, steps_written, ["status", "response", "lease_expires_at"])
        charged = ledger().run_settle(settlement)
        if charged != expected:  # capped: an upstream ignored max_tokens
            for answer in [response, execution.response] if first else [response]:
                answer["kitemesh"]["credits_charged"] = charged
            Execution.objects.filter(pk=execution.pk).update(response=execution.response)
        if hold_amount > 0:  # while it waits, the execution's one active hold
            ledger().hold_open(execution=execution, amount=hold_amount)
        approval_announce(approval, events.CREATED, waiting=sum(te.requires_approval for te in tool_executions))
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
        approval_announce(approval, events.EXPIRED)
    return True


def approval_interrupt(*, approval: Approval) -> None:
    """A resumed approval whose run's process died waits again, for its client to resume it once more
    (SPEC §7), with a fresh expiry. Runs inside the caller's transaction (approvals.recovery)."""
    approval.status = Approval.Status.INTERRUPTED
    approval.expires_at = timezone.now() + timedelta(seconds=approval.group.approval_ttl_seconds)
    approval.resolved_at = None
    approval.save(update_fields=["status", "expires_at", "resolved_at"])
    approval_announce(approval, events.INTERRUPTED)


def approvals_expire_due() -> int:
    """Expire every approval past its time (the sweep); how many were expired."""
    due = Approval.objects.filter(status__in=WAITING, expires_at__lte=timezone.now()).select_related("group")
    return sum(approval_expire(approval=approval) for approval in due.iterator())


def approval_expire_if_due(approval: Approval) -> None:
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
    *,
    approval: Approval,
    tool_execution: ToolExecution,
    approve: bool,
    reason: str,
    actor: AbstractBaseUser,
    arguments: str | None = None,
) -> None:
    """A decision from the approver page: recorded once, with who, when and why; with `arguments`, an
    approval of the call with those arguments instead of the model's (approvals.edits: 400 or 403, nothing
    decided, when they fail its schema or a rule denies them). The approval row lock orders it against a
    resume claim, so a decision is either seen by the resume or refused, and orders the people approving a
    call that needs several, so each counts once."""
    approval_expire_if_due(approval)
    with transaction.atomic(durable=True):
        _decidable_lock(approval)
        call = ToolExecution.objects.filter(
            pk=tool_execution.pk, approval=approval, requires_approval=True, status=Status.PENDING
        ).first()
        if call is None:
            raise Conflict(
                f"{tool_execution.tool_name} was already decided; nothing was changed.", code="decision_conflict"
            )
        if arguments is not None:
            _edit(call, arguments, approve=approve)
        if not _call_decide(call, approve=approve, reason=reason, actor=actor):
            raise Conflict(
                f"You already approved {call.tool_name}; it needs the approval of "
                f"{call.approvals_required} different people.",
                code="decision_conflict",
            )
        approval_announce(approval, events.DECIDED, waiting=_waiting(approval))


def approval_decide_all(*, approval: Approval, approve: bool, reason: str, actor: AbstractBaseUser) -> int:
    """Approve or deny, in one transaction, every call of the approval still waiting for a decision (the
    only way `batch` groups decide on the page); returns how many this person decided or approved."""
    approval_expire_if_due(approval)
    with transaction.atomic(durable=True):
        _decidable_lock(approval)
        waiting = ToolExecution.objects.filter(approval=approval, requires_approval=True, status=Status.PENDING)
        decided = sum(_call_decide(call, approve=approve, reason=reason, actor=actor) for call in waiting)
        if not decided:
            raise Conflict("Every tool call was already decided; nothing was changed.", code="decision_conflict")
        approval_announce(approval, events.DECIDED, waiting=_waiting(approval))
    return decided


def _edit(call: ToolExecution, arguments: str, *, approve: bool) -> None:
    """A page's edit, checked and written before its approval: a call that needs several people starts
    counting again, since the approvals it had were of other arguments."""
    if not approve:
        raise InvalidRequest("An edit approves the call: deny it without arguments.", param="arguments")
    arguments = _secrets_kept(arguments, call.arguments)
    edit_check(call, arguments, param="arguments")
    sql_update(call, edit_apply(call, arguments))
    CallApproval.objects.filter(tool_execution=call).delete()


def _secrets_kept(edited: str, model: str) -> str:
    """The page shows arguments redacted: a value its approver left "[redacted]" keeps the model's value."""
    try:
        value, original = json.loads(edited), json.loads(model)
    except ValueError:
        return edited  # the schema check says what is wrong
    return json.dumps(redacted_kept(value, original), ensure_ascii=False)


def _call_decide(call: ToolExecution, *, approve: bool, reason: str, actor: AbstractBaseUser) -> bool:
    """One person's decision on a waiting call, under its approval's lock: a deny denies; an approval
    approves, or counts towards the `approvals_required` different people. False when this person had
    approved it already (nothing is changed)."""
    fields = _decision_fields(approve=approve, reason=reason, actor=actor)
    if approve and call.approvals_required > 1:
        given = CallApproval.objects.filter(tool_execution=call)
        if given.filter(user=actor).exists():
            return False
        CallApproval.objects.create(tool_execution=call, user=actor, username=actor.get_username(), reason=reason[:500])
        people = list(given.values_list("username", flat=True))
        if len(people) < call.approvals_required:
            return True
        fields["decided_by"] = ", ".join(people)[:150]
    ToolExecution.objects.filter(pk=call.pk, status=Status.PENDING).update(**fields)
    return True
