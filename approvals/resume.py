"""The resume rules (SPEC: POST /v1/chat/resume): the API's decisions checked against the approval's round
and the decisions people made on the page, the token's right to run the round, and the claim — the approval
resumed exactly once, under its row lock, its hold swapped for the resume's."""

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from approvals import events
from approvals.services import WAITING, approval_announce, approval_expire_if_due
from billing.ledger import hold_open, holds_release
from billing.models import Hold
from core.errors import Conflict, Expired, InvalidRequest, PermissionDenied
from core.models import ApiToken, Approval, Execution, Group, Tool, ToolExecution
from core.runs import lease_deadline

Status = ToolExecution.Status


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
    approval_expire_if_due(approval)
    if approval.status == Approval.Status.EXPIRED:
        raise Expired("This approval has expired.", param="approval_id")
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
            approval_announce(approval, events.DECIDED, waiting=0)
        approval_announce(approval, events.RESUMED)
        holds_release(execution_id=locked.execution_id)  # the approval's, swapped for this request's below
        execution = locked.execution
        amount = hold_amount_for(round_calls)
        hold = hold_open(execution=execution, amount=amount) if amount > 0 else None
        execution.status = Execution.Status.RUNNING
        execution.lease_expires_at = lease_deadline()
        execution.save(update_fields=["status", "lease_expires_at"])
    locked.group = approval.group
    return ResumeClaim(approval=locked, execution=execution, tool_executions=round_calls, hold=hold)
