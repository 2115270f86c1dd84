"""The resume rules (SPEC: POST /v1/chat/resume): the API's decisions checked against the approval's round
and the decisions people made on the page, the token's right to run the round, and the claim — the approval
resumed exactly once, under its row lock, its hold swapped for the resume's."""

import datetime
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from django.db import transaction
from django.utils import timezone

from approvals import events
from approvals.edits import edit_apply, edit_check
from approvals.recovery import execution_lapsed, execution_recover
from approvals.services import WAITING, approval_announce, approval_expire_if_due
from billing.ledger import ledger
from billing.models import Hold
from core.callers import Caller
from core.errors import Conflict, Expired, InvalidRequest, NotFound, PermissionDenied
from core.models import Approval, Execution, Group, Tool, ToolExecution
from core.runs import lease_deadline
from core.sql import db_value, for_update, sql_instances, sql_update, table
from core.tool_arguments import edit_param

Status = ToolExecution.Status


@dataclass
class ResumeClaim:
    approval: Approval
    execution: Execution
    tool_executions: list[ToolExecution]  # the whole round, in the order the model asked
    hold: Hold | None


@dataclass
class ApiDecisions:
    """A resume's decisions: approvals, denials (with their reasons) and edits (approvals with other
    arguments: the JSON text of an object, in the body's order)."""

    approved: set[uuid.UUID] = field(default_factory=set)
    denied: dict[uuid.UUID, str] = field(default_factory=dict)
    edited: dict[uuid.UUID, str] = field(default_factory=dict)

    def verdicts(self) -> dict[uuid.UUID, bool]:
        return {i: True for i in self.approved} | {i: True for i in self.edited} | {i: False for i in self.denied}

    def param(self, te_id: uuid.UUID) -> str:
        if te_id in self.edited:
            return "edited_tool_executions"
        return "approved_tool_execution_ids" if te_id in self.approved else "denied_tools"


def _decisions_merge(
    *, approval: Approval, round_calls: list[ToolExecution], decisions: ApiDecisions
) -> dict[uuid.UUID, bool]:
    """The API's decisions checked against the SPEC's rules and the UI's; returns the API decisions to
    write (id → approve). Raises the SPEC's errors before anything is written."""
    needing = {te.id: te for te in round_calls if te.requires_approval}
    _ids_check(decisions, needing.keys())
    api = decisions.verdicts()
    final = {}
    for te_id, te in needing.items():
        recorded = None if te.decision is None else te.decision == "approved"
        if te_id in api:
            _api_may_decide(te, decisions)
            if recorded is not None and (api[te_id] != recorded or te_id in decisions.edited):
                raise Conflict(f"Tool execution {te_id} was already decided otherwise.", code="decision_conflict")
        final[te_id] = api.get(te_id, recorded)
    missing = [str(i) for i, decision in final.items() if decision is None]
    if missing:
        raise Conflict(f"No decision for: {', '.join(missing)}.", code="decision_required")
    if approval.group.approval_style == Group.ApprovalStyle.BATCH and len(set(final.values())) > 1:
        raise InvalidRequest("This group approves in batch: approve all or deny all.", param="denied_tools")
    for index, (te_id, arguments) in enumerate(decisions.edited.items()):
        edit_check(needing[te_id], arguments, param=edit_param(index))
    return {i: a for i, a in api.items() if needing[i].status == Status.PENDING}


def _ids_check(decisions: ApiDecisions, needing: Iterable[uuid.UUID]) -> None:
    """Every id is a call of this approval that needs a decision, and is in one list only."""
    approved, denied, edited = decisions.approved, decisions.denied.keys(), decisions.edited.keys()
    unknown = sorted((approved | denied | edited) - set(needing))
    if unknown:
        raise InvalidRequest(
            f"Not a tool execution of this approval: {', '.join(map(str, unknown))}.",
            param=decisions.param(unknown[0]),
            code="unknown_tool_execution",
        )
    twice = sorted((approved & denied) | (approved & edited) | (denied & edited))
    if twice:
        raise InvalidRequest(
            f"Decided twice: {', '.join(map(str, twice))}.",
            param="edited_tool_executions" if set(twice) & edited else "denied_tools",
        )


def _api_may_decide(te: ToolExecution, decisions: ApiDecisions) -> None:
    """403 for a call only people may decide: its tool says so, or it needs several people."""
    if te.tool is not None and te.tool.approver == Tool.Approver.HUMAN:
        raise PermissionDenied(
            f"Tool {te.tool_name!r} can only be decided by a person on the approver page.", param=decisions.param(te.id)
        )
    if te.approvals_required > 1:
        raise PermissionDenied(
            f"Tool {te.tool_name!r} needs the approval of {te.approvals_required} different people on the"
            " approver page; an API client cannot decide it.",
            param=decisions.param(te.id),
        )


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
    caller: Caller,
    approval: Approval,
    tools: dict[int, Tool],
    decisions: ApiDecisions,
    hold_amount_for: Callable[[list[ToolExecution]], int],
) -> ResumeClaim:
    """Apply the API's decisions and claim the approval for this resume, exactly once: the approval row is
    locked and its status checked under the lock, so a second or concurrent resume gets 409. The approval's
    hold becomes this request's, resized to `hold_amount_for(round)` (402 leaves the approval waiting). A
    round with a tool outside `tools` (the tools the caller may use, by id, with their secrets) is 403. An
    approval whose resuming run died is recovered first (approvals.recovery) and then claimed: it waits again.
    Lock order: the approval, then the account (as the page's decisions take them). `approval.group` must be
    loaded."""
    try:
        return _claim(caller, approval, tools, decisions, hold_amount_for)
    except _RunLapsed:
        execution_recover(execution_id=approval.execution_id)
        return _claim(caller, approval, tools, decisions, hold_amount_for)


def _claim(
    caller: Caller,
    approval: Approval,
    tools: dict[int, Tool],
    decisions: ApiDecisions,
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
        if caller.token is not None and execution.token_id == caller.token.pk:
            execution.token = caller.token  # the run's own token resumes it (its credit limit is at hand)
        if execution.approval_status not in WAITING:
            if execution_lapsed(execution):
                raise _RunLapsed()
            raise Conflict("This approval was already resumed.", code="approval_already_resumed")
        round_calls = _round(approval, tools)
        verdicts = _decisions_merge(approval=approval, round_calls=round_calls, decisions=decisions)
        now = timezone.now()
        for te in round_calls:
            if te.id in verdicts:
                _decision_write(te, verdicts[te.id], decisions, by=caller.label, now=now)
        approval.status, approval.resolved_at = Approval.Status.RESUMED, now
        sql_update(approval, ["status", "resolved_at"])
        if verdicts:
            approval_announce(approval, events.DECIDED, waiting=0)
        approval_announce(approval, events.RESUMED)
        hold = ledger().hold_resize(execution=execution, amount=hold_amount_for(round_calls))
        execution.status, execution.lease_expires_at = Execution.Status.RUNNING, lease_deadline()
        sql_update(execution, ["status", "lease_expires_at"])
    return ResumeClaim(approval=approval, execution=execution, tool_executions=round_calls, hold=hold)


def _decision_write(
    te: ToolExecution, approve: bool, decisions: ApiDecisions, *, by: str, now: datetime.datetime
) -> None:
    """The API's decision on a call, with its edit: the edited arguments become the ones that run, bound by
    their hash; the model's are kept beside them."""
    te.status = Status.APPROVED if approve else Status.DENIED
    te.decided_via, te.decided_by, te.decided_at = ToolExecution.DecidedVia.API, by, now
    te.decision_reason = decisions.denied.get(te.id, "")[:500]
    fields = ["status", "decided_via", "decided_by", "decision_reason", "decided_at"]
    if te.id in decisions.edited:
        fields += edit_apply(te, decisions.edited[te.id])
    sql_update(te, fields)


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
