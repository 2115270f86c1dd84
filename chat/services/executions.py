"""Executions: start one (idempotency check, record, credit hold) and finish it (steps, settle, outcome)
— each one short unit of work through the ledger (billing.ledger), so no transaction stays open while a
model answers — and the moves of its tool calls."""

import logging
import uuid
from dataclasses import dataclass

from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from approvals.recovery import execution_recover_if_lapsed
from billing.ledger import Settlement, credits_round, holds_settle, ledger, steps_cost, steps_settled
from billing.models import Hold
from core.callers import Caller
from core.envelope import error_record
from core.errors import Conflict, InternalError, KiteMeshError
from core.models import Execution, Group, Step, ToolExecution
from core.runs import lease_deadline, tool_calls_of
from core.sql import Guard, guard_holds, sql_update

logger = logging.getLogger(__name__)

_STILL_RUNNING = "A request with this request_id is still running; retry when it has finished."


@dataclass
class ExecutionStart:
    execution: Execution
    hold: Hold | None
    replayed: bool = False


def _earlier_for_request_id(*, team_id: int, request_id: str, body_hash: str) -> Execution | None:
    """The execution that holds this client request_id, unless a retry may run anew."""
    earlier = Execution.objects.filter(team_id=team_id, request_id=request_id, client_request_id=True).first()
    if earlier is not None and execution_recover_if_lapsed(execution=earlier):
        earlier.refresh_from_db()  # its process died: failed (its request_id freed), or paused
        earlier = earlier if earlier.client_request_id else None
    if earlier is None:
        return None
    if earlier.request_hash != body_hash:
        raise Conflict(
            "This request_id was already used with a different body.",
            param="metadata.request_id",
            code="request_id_conflict",
        )
    if earlier.status == Execution.Status.RUNNING:
        raise Conflict(_STILL_RUNNING, param="metadata.request_id", code="request_id_conflict")
    return earlier


def execution_start(
    *,
    caller: Caller,
    group: Group,
    mode: str,
    request_id: str,
    client_request_id: bool,
    body_hash: str,
    stream: bool,
    metadata: dict,
    hold_amount: int,
    guard: Guard | None = None,
) -> ExecutionStart | None:
    """Record the execution and hold its worst case (InsufficientCredits when the team cannot cover it),
    while `guard` holds (the configuration the run was sized with is current): None, with nothing
    written, when it does not. A client request_id seen before returns the earlier execution instead
    (replayed=True), once the guard is found to hold."""
    if client_request_id:
        if guard is not None and not guard_holds(guard):
            return None
        earlier = _earlier_for_request_id(team_id=group.team_id, request_id=request_id, body_hash=body_hash)
        if earlier is not None:
            return ExecutionStart(execution=_answer_restored(earlier), hold=None, replayed=True)
    execution = Execution(
        team_id=group.team_id,
        group=group,
        token=caller.token,
        user=caller.user,
        request_id=request_id,
        client_request_id=client_request_id,
        request_hash=body_hash,
        mode=mode,
        stream=stream,
        metadata=metadata,
        lease_expires_at=lease_deadline(),
    )
    try:
        hold = ledger().run_open(execution=execution, amount=hold_amount, guard=guard)
    except IntegrityError:  # a concurrent request with the same request_id won the insert: it is in flight
        raise Conflict(_STILL_RUNNING, param="metadata.request_id", code="request_id_conflict") from None
    if execution._state.adding:
        return None  # the guard did not hold
    return ExecutionStart(execution=execution, hold=hold)


def _answer_restored(execution: Execution) -> Execution:
    """The execution with its first answer as it was sent: a pause's tool call arguments are kept
    encrypted with their tool executions, not in the stored answer (approvals.services.approval_pause)."""
    calls = tool_calls_of(execution.response)
    kept = dict(ToolExecution.objects.filter(pk__in=[c["id"] for c in calls]).values_list("pk", "arguments"))
    for call in calls:
        call["function"]["arguments"] = kept[uuid.UUID(call["id"])]
    return execution


# What a run's end writes of its execution (besides its credits and token counts, the ledger's).
OUTCOME = ["status", "finished_at", "response", "error", "client_request_id", "lease_expires_at"]
_NO_ANSWER = (Execution.Status.FAILED, Execution.Status.CANCELLED)


def execution_finish(
    *,
    execution: Execution,
    hold: Hold | None,
    steps: list[Step],
    status: str,
    steps_written: int = 0,
    response: dict | None = None,
    error: KiteMeshError | None = None,
) -> int:
    """Settle the request and record the run's outcome, in one unit of work; returns the credits charged
    for this request (`steps` are all of its steps, the first `steps_written` of them written already). A
    `response` body gets its final `kitemesh.credits_charged` here. The first result of an execution is
    kept for replays of its client's request_id (a resumed run's later answers do not replace it); a run
    that ends without ever answering frees its request_id, so a retry runs anew.

    When the database refuses the outcome (a row it cannot store), the run is settled all the same by
    execution_fail, and InternalError is raised: the caller answers 500 instead of what it meant to."""
    execution.status, execution.finished_at, execution.lease_expires_at = status, timezone.now(), None
    if error is not None and execution.response is None and response is None:
        execution.error = error_record(error)
    if status in _NO_ANSWER and execution.response is None:
        execution.client_request_id = False
    expected = None
    if response is not None:
        # The charge the settlement will take (rounded up once); kept only for replays of a client's id.
        expected = response["kitemesh"]["credits_charged"] = credits_round(steps_cost(steps))
        if execution.client_request_id and execution.response is None:
            execution.response = response
    try:
        charged = ledger().run_settle(Settlement(execution, hold, steps, steps_written, OUTCOME))
    except Exception:
        logger.exception("execution %s: its outcome could not be written; settling it as failed", execution.pk)
        execution_fail(execution=execution, hold=hold, steps=steps)
        raise InternalError() from None
    if response is not None and charged != expected:  # capped: an upstream ignored max_tokens
        response["kitemesh"]["credits_charged"] = charged
        if execution.response is response:
            Execution.objects.filter(pk=execution.pk).update(response=response)
    return charged


def execution_fail(*, execution: Execution, hold: Hold | None, steps: list[Step]) -> int:
    """The last resort of a run whose outcome could not be written: its hold settled for what its steps
    cost, the run marked failed with an internal error, its request_id freed; its steps and response are
    not written (those it wrote while working are marked settled). Returns the credits charged."""
    with transaction.atomic(durable=True):
        charged = holds_settle(execution_id=execution.pk, cost=steps_cost(steps)) if hold is not None else 0
        steps_settled(execution)
        Execution.objects.filter(pk=execution.pk).update(
            status=Execution.Status.FAILED,
            error=error_record(InternalError()),
            finished_at=timezone.now(),
            lease_expires_at=None,
            client_request_id=False,
            credits_charged=F("credits_charged") + charged,
        )
    return charged


def tool_execution_start(*, tool_execution: ToolExecution) -> bool:
    """approved → running (or, for an idempotent tool's call whose outcome a crash left unknown, unknown →
    running), once: False, the instance unchanged, when another path already took it."""
    previous = tool_execution.status
    if previous not in (ToolExecution.Status.APPROVED, ToolExecution.Status.UNKNOWN):
        return False
    tool_execution.status, tool_execution.started_at = ToolExecution.Status.RUNNING, timezone.now()
    if sql_update(tool_execution, ["status", "started_at"], only_if={"status": previous}):
        return True
    tool_execution.status, tool_execution.started_at = previous, None
    return False


def tool_execution_finish(
    *, tool_execution: ToolExecution, ok: bool, status_code: int | None, body: str, error: str
) -> None:
    """running → succeeded or failed, with what the tool answered (nothing when recovery took it first)."""
    tool_execution.status = ToolExecution.Status.SUCCEEDED if ok else ToolExecution.Status.FAILED
    tool_execution.response_status, tool_execution.response_body = status_code, body
    tool_execution.error, tool_execution.finished_at = error[:500], timezone.now()
    fields = ["status", "response_status", "response_body", "error", "finished_at"]
    sql_update(tool_execution, fields, only_if={"status": ToolExecution.Status.RUNNING})
