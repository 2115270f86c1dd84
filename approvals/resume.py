"""The resume rules (SPEC: POST /v1/chat/resume): the API's decisions checked against the approval's round
and the decisions people made on the page, the token's right to run the round, and the claim — the approval
resumed exactly once, under its row lock, its hold swapped for the resume's."""

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from approvals import events
from approvals.recovery import execution_lapsed, execution_recover
from approvals.services import WAITING, approval_announce, approval_expire_if_due
from billing.ledger import ledger
from billing.models import Hold
from core.errors import Conflict, Expired, InvalidRequest, NotFound, PermissionDenied
from core.models import ApiToken, Approval, Execution, Group, Tool, ToolExecution
from core.runs import lease_deadline
from core.sql import db_value, for_update, sql_instances, sql_update, table

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
        if te_id in api and te.approvals_required > 1:
            raise PermissionDenied(
                f"Tool {te.tool_name!r} needs the approval of {te.approvals_required} different people on the"
                " approver page; an API client cannot decide it.",
                param="approved_tool_execution_ids" if te_id in approved else "denied_tools",
            )
        if recorded is not None and te_id in api and api[te_id] != recorded:
            raise Conflict(f"Tool execution {te_id} was already decided otherwise.", code="decision_conflict")
        final[te_id] = api.get(te_id, recorded)
    missing = [str(i) for i, decision in final.items() if decision is None]
    if missing:
        raise Conflict(f"No decision for: {', '.join(missing)}.", code="decision_required")
    if approval.group.approval_style == Group.ApprovalStyle.BATCH and len(set(final.values())) > 1:
        raise InvalidRequest("This group approves in batch: approve all or deny all.", param="denied_tools")
    return {i: a for i, a in api.items() if needing[i].status == Status.PENDING}


def approval_for_resume_get(*, team_id: int, approval_id: uuid.UUID) -> Approval:
    """The team's approval, with its round's conversation (one written-out statement: this is every resume's
    first read); 404 when the team has no such approval. Whether the token's scope covers its group is the
    caller's to check, with the group."""
    found = sql_instances(
        Approval,
        f"SELECT * FROM {table(Approval)} WHERE id = %s AND team_id = %s",
        [db_value(Approval, "id", approval_id), team_id],
    )
    if not found:
        raise approval_not_found(approval_id)
    return found[0]


def approval_not_found(approval_id: uuid.UUID) -> NotFound:
    return NotFound(f"No approval {approval_id}.", param="approval_id", code="approval_not_found")


class _RunLapsed(Exception):
    """The approval was resumed, and the run resuming it lost its process (its lease lapsed)."""


def approval_resume_claim(
    *,
    token: ApiToken,
    approval: Approval,
    tools: dict[int, Tool],
    approved: set[uuid.UUID],
    denied: dict[uuid.UUID, str],
    hold_amount_for: Callable[[list[ToolExecution]], int],
) -> ResumeClaim:
    """Apply the API's decisions and claim the approval for this resume, exactly once: the approval row is
    locked and its status checked under the lock, so a second or concurrent resume gets 409. The approval's
    hold becomes this request's, resized to `hold_amount_for(round)` (402 leaves the approval waiting). A
    round with a tool outside `tools` (the tools the token may use, by id, with their secrets) is 403. An
    approval whose resuming run died is recovered first (approvals.recovery) and then claimed: it waits again.
    Lock order: the approval, then the account (as the page's decisions take them). `approval.group` must be
    loaded."""
    try:
        return _claim(token, approval, tools, approved, denied, hold_amount_for)
    except _RunLapsed:
        execution_recover(execution_id=approval.execution_id)
        return _claim(token, approval, tools, approved, denied, hold_amount_for)


def _claim(
    token: ApiToken,
    approval: Approval,
    tools: dict[int, Tool],
    approved: set[uuid.UUID],
    denied: dict[uuid.UUID, str],
    hold_amount_for: Callable[[list[ToolExecution]], int],
) -> ResumeClaim:
    approval_expire_if_due(approval)
    if approval.status == Approval.Status.EXPIRED:
        raise Expired("This approval has expired.", param="approval_id")
    with transaction.atomic(durable=True):
        execution = sql_instances(
            Execution,
            f"SELECT e.*, a.status AS approval_status FROM {table(Execution)} e JOIN {table(Approval)} a"
            f" ON a.execution_id = e.id WHERE a.id = %s{for_update(of='a')}",
            [db_value(Approval, "id", approval.pk)],
        )[0]
        if execution.approval_status not in WAITING:
            if execution_lapsed(execution):
                raise _RunLapsed()
            raise Conflict("This approval was already resumed.", code="approval_already_resumed")
        round_calls = _round(approval, tools)
        decisions = _decisions_merge(approval=approval, round_calls=round_calls, approved=approved, denied=denied)
        now = timezone.now()
        for te in round_calls:
            if te.id in decisions:
                te.status = Status.APPROVED if decisions[te.id] else Status.DENIED
                te.decided_via, te.decided_by, te.decided_at = ToolExecution.DecidedVia.API, f"token:{token.name}", now
                te.decision_reason = denied.get(te.id, "")[:500]
                sql_update(te, ["status", "decided_via", "decided_by", "decision_reason", "decided_at"])
        approval.status, approval.resolved_at = Approval.Status.RESUMED, now
        sql_update(approval, ["status", "resolved_at"])
        if decisions:
            approval_announce(approval, events.DECIDED, waiting=0)
        approval_announce(approval, events.RESUMED)
        hold = ledger().hold_resize(execution=execution, amount=hold_amount_for(round_calls))
        execution.status, execution.lease_expires_at = Execution.Status.RUNNING, lease_deadline()
        sql_update(execution, ["status", "lease_expires_at"])
    return ResumeClaim(approval=approval, execution=execution, tool_executions=round_calls, hold=hold)


def _round(approval: Approval, tools: dict[int, Tool]) -> list[ToolExecution]:
    """The approval's round, in the order the model asked, each call with its tool (None when the tool was
    deleted since); 403 when the token may not use one of its tools: the round's calls run under its name."""
    round_calls = sql_instances(
        ToolExecution,
        f"SELECT * FROM {table(ToolExecution)} WHERE approval_id = %s ORDER BY position",
        [db_value(ToolExecution, "approval_id", approval.pk)],
    )
    outside = sorted({te.tool_name for te in round_calls if te.tool_id is not None and te.tool_id not in tools})
    if outside:
        raise PermissionDenied(
            f"This API token may not use {', '.join(map(repr, outside))}; nothing was decided or run.",
            param="approval_id",
        )
    for te in round_calls:
        te.tool = tools.get(te.tool_id)
    return round_calls
