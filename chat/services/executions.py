"""Executions: start one (idempotency check, record, credit hold) and finish it (steps, settle,
outcome) — each one short transaction, so no transaction stays open while a model answers."""

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from billing.models import Hold
from billing.services.ledger import (
    SETTLED_CHARGE,
    execution_insert_with_hold,
    hold_create,
    hold_settle,
    hold_settle_with,
)
from chat.errors import ApiError, AuthenticationError, Conflict, InternalError
from chat.services.tokens import INVALID_TOKEN_MESSAGE, token_live_check, token_live_query
from core.models import ApiToken, Execution, Group, Step, ToolExecution
from kitemesh_site.sql import insert_values, single_statement_writes, sql_insert, sql_update, update_statement

logger = logging.getLogger(__name__)


@dataclass
class ExecutionStart:
    execution: Execution
    hold: Hold | None
    replayed: bool = False


def _earlier_for_request_id(*, team_id: int, request_id: str, body_hash: str) -> Execution | None:
    """The execution that holds this client request_id, unless a retry may run anew."""
    from chat.services.recovery import execution_recover_if_lapsed  # (recovery builds on this module)

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
        raise Conflict(
            "A request with this request_id is still running; retry when it has finished.",
            param="metadata.request_id",
            code="request_id_conflict",
        )
    return earlier


def execution_start(
    *,
    token: ApiToken,
    group: Group,
    mode: str,
    request_id: str,
    client_request_id: bool,
    body_hash: str,
    stream: bool,
    metadata: dict,
    hold_amount: int,
) -> ExecutionStart:
    """Record the execution and hold its worst case (InsufficientCredits when the team cannot cover it),
    if the token is still live (AuthenticationError when it was revoked or expired since it was read: the
    API may have read it a few seconds ago). A client request_id seen before returns the earlier execution
    instead (replayed=True)."""
    if client_request_id:
        earlier = _earlier_for_request_id(team_id=group.team_id, request_id=request_id, body_hash=body_hash)
        if earlier is not None:
            token_live_check(token)
            return ExecutionStart(execution=_answer_restored(earlier), hold=None, replayed=True)
    execution = Execution(
        team_id=group.team_id,
        group=group,
        token=token,
        request_id=request_id,
        client_request_id=client_request_id,
        request_hash=body_hash,
        mode=mode,
        stream=stream,
        metadata=metadata,
        lease_expires_at=lease_deadline(),
    )
    try:
        if hold_amount > 0 and single_statement_writes():
            hold = execution_insert_with_hold(execution=execution, amount=hold_amount, gate=token_live_query(token))
            if hold is None:
                raise AuthenticationError(INVALID_TOKEN_MESSAGE)
        else:
            with transaction.atomic(durable=True):
                token_live_check(token)
                sql_insert([execution])
                hold = hold_create(execution=execution, amount=hold_amount) if hold_amount > 0 else None
    except IntegrityError:
        # A concurrent request with the same request_id won the insert: it is in flight.
        raise Conflict(
            "A request with this request_id is still running; retry when it has finished.",
            param="metadata.request_id",
            code="request_id_conflict",
        ) from None
    return ExecutionStart(execution=execution, hold=hold)


def _answer_restored(execution: Execution) -> Execution:
    """The execution with its first answer as it was sent: a pause's tool call arguments are kept
    encrypted with their tool executions, not in the stored answer (approvals.services.approval_pause)."""
    calls = tool_calls_of(execution.response)
    kept = dict(ToolExecution.objects.filter(pk__in=[c["id"] for c in calls]).values_list("pk", "arguments"))
    for call in calls:
        call["function"]["arguments"] = kept[uuid.UUID(call["id"])]
    return execution


def tool_calls_of(response: dict) -> list[dict]:
    """The tool calls of a completion body (a pause's), or none."""
    return [call for choice in response.get("choices", ()) for call in choice["message"].get("tool_calls") or ()]


def lease_deadline() -> datetime:
    """When a run's lease lapses unless its process renews it."""
    return timezone.now() + timedelta(seconds=settings.KITEMESH_RUN_LEASE_SECONDS)


def execution_lease_renew(*, execution: Execution) -> bool:
    """Extend a running execution's lease; False when it is running no more (finished, or recovered)."""
    return bool(
        Execution.objects.filter(pk=execution.pk, status=Execution.Status.RUNNING).update(
            lease_expires_at=lease_deadline()
        )
    )


def steps_write(*, steps: list[Step]) -> None:
    """Write steps that ended while their run goes on, not yet settled: they are charged by their
    request's settlement, or by its recovery if its process dies first."""
    for step in steps:
        step.settled = False
    sql_insert(steps)


def execution_settle(*, execution: Execution, hold: Hold | None, steps: list[Step], steps_written: int = 0) -> int:
    """Write one request's steps (the first `steps_written` are written already, and are now marked
    settled), settle its hold into one charge and add its usage to the execution's totals (a run that
    pauses and resumes is several requests). Runs inside the caller's transaction; returns the credits
    charged for this request."""
    if len(steps) > steps_written:
        sql_insert(steps[steps_written:])
    if steps_written:
        _steps_settled(execution)
    charged = hold_settle(hold=hold, cost=_cost(steps)) if hold is not None else 0
    _usage_add(execution, steps)
    execution.credits_charged += charged
    return charged


def _steps_settled(execution: Execution) -> int:
    return Step.objects.filter(execution=execution, settled=False).update(settled=True)


def _cost(steps: list[Step]) -> Decimal:
    return sum((s.cost for s in steps), Decimal(0))


def _usage_add(execution: Execution, steps: list[Step]) -> None:
    execution.prompt_tokens += sum(s.prompt_tokens for s in steps)
    execution.completion_tokens += sum(s.completion_tokens for s in steps)


_OUTCOME = [
    "status",
    "prompt_tokens",
    "completion_tokens",
    "credits_charged",
    "finished_at",
    "response",
    "error",
    "client_request_id",
    "lease_expires_at",
]
_NO_ANSWER = (Execution.Status.FAILED, Execution.Status.CANCELLED)


def _error_record(error: ApiError) -> dict:
    return {"status": error.status, "type": error.type, "code": error.code, "message": error.message}


def execution_finish(
    *,
    execution: Execution,
    hold: Hold | None,
    steps: list[Step],
    status: str,
    steps_written: int = 0,
    response: dict | None = None,
    error: ApiError | None = None,
) -> int:
    """Settle the request and record the run's outcome, in one transaction; returns credits charged for
    this request (`steps` are all of its steps, the first `steps_written` of them written already). A
    `response` body gets its final `kitemesh.credits_charged` here. The first result of
    an execution is kept for replays of its client's request_id (a resumed run's later answers do not
    replace it); a run that ends without ever answering frees its request_id, so a retry runs anew.

    When the database refuses the outcome (a row it cannot store), the run is settled all the same by
    execution_fail, and InternalError is raised: the caller answers 500 instead of what it meant to."""
    try:
        return _outcome_write(execution, hold, steps, steps_written, status, response, error)
    except Exception:
        logger.exception("execution %s: its outcome could not be written; settling it as failed", execution.pk)
        execution_fail(execution=execution, hold=hold, cost=_cost(steps))
        raise InternalError() from None


def _outcome_write(
    execution: Execution,
    hold: Hold | None,
    steps: list[Step],
    steps_written: int,
    status: str,
    response: dict | None,
    error: ApiError | None,
) -> int:
    execution.status = status
    execution.finished_at = timezone.now()
    execution.lease_expires_at = None
    if error is not None and execution.response is None and response is None:
        execution.error = _error_record(error)
    if status in _NO_ANSWER and execution.response is None:
        execution.client_request_id = False
    if hold is not None and single_statement_writes():
        charged = _finish_in_one_statement(execution, hold, steps, steps_written, response)
    else:
        with transaction.atomic(durable=True):
            charged = execution_settle(execution=execution, hold=hold, steps=steps, steps_written=steps_written)
            _response_record(execution, response, charged)
            sql_update(execution, _OUTCOME)
    return charged


def _response_record(execution: Execution, response: dict | None, charged: int) -> None:
    if response is not None:
        response["kitemesh"]["credits_charged"] = charged
        if _response_kept(execution):
            execution.response = execution.response or response


def _response_kept(execution: Execution) -> bool:
    """A response is stored for replays of its client's request_id; an execution without one is never
    replayed, so its response is not written (nor encoded a second time)."""
    return execution.client_request_id


def _finish_in_one_statement(
    execution: Execution, hold: Hold, steps: list[Step], steps_written: int, response: dict | None
) -> int:
    """execution_finish's writes as one statement (kitemesh_site.sql): the steps, the outcome and the
    settlement, whose charge the outcome's credits (and stored response) read in the statement."""
    exprs = {"credits_charged": f"%s + {SETTLED_CHARGE}"}
    if response is not None and execution.response is None and _response_kept(execution):
        execution.response = response
        exprs["response"] = f"jsonb_set(%s, '{{kitemesh,credits_charged}}', to_jsonb({SETTLED_CHARGE}))"
    _usage_add(execution, steps)
    writes = [insert_values(steps[steps_written:])] if len(steps) > steps_written else []
    if steps_written:
        writes.append(_steps_settled_statement(execution))
    writes.append(update_statement(execution, _OUTCOME, **exprs))
    charged = hold_settle_with(hold=hold, cost=_cost(steps), writes=writes)
    execution.credits_charged += charged
    _response_record(execution, response, charged)
    return charged


def _steps_settled_statement(execution: Execution) -> tuple[str, list]:
    """_steps_settled as SQL, for a single statement's writes."""
    table = Step._meta.db_table
    return f"UPDATE {table} SET settled = %s WHERE execution_id = %s AND NOT settled", [True, execution.pk]


def execution_fail(*, execution: Execution, hold: Hold | None, cost: Decimal) -> int:
    """The last resort of a run whose outcome could not be written: its hold settled for `cost` (what its
    steps used), the run marked failed with an internal error, its request_id freed; its steps and
    response are not written (those it wrote while working are marked settled). Returns the credits
    charged."""
    with transaction.atomic(durable=True):
        charged = hold_settle(hold=hold, cost=cost) if hold is not None else 0
        _steps_settled(execution)
        Execution.objects.filter(pk=execution.pk).update(
            status=Execution.Status.FAILED,
            error=_error_record(InternalError()),
            finished_at=timezone.now(),
            lease_expires_at=None,
            client_request_id=False,
            credits_charged=F("credits_charged") + charged,
        )
    return charged


def tool_execution_start(*, tool_execution: ToolExecution) -> bool:
    """approved → running (or, for an idempotent tool's call whose outcome a crash left unknown, unknown →
    running), once: False when another path already took it."""
    if tool_execution.status not in (ToolExecution.Status.APPROVED, ToolExecution.Status.UNKNOWN):
        return False
    return bool(
        ToolExecution.objects.filter(pk=tool_execution.pk, status=tool_execution.status).update(
            status=ToolExecution.Status.RUNNING, started_at=timezone.now()
        )
    )


def tool_execution_finish(
    *, tool_execution: ToolExecution, ok: bool, status_code: int | None, body: str, error: str
) -> None:
    ToolExecution.objects.filter(pk=tool_execution.pk, status=ToolExecution.Status.RUNNING).update(
        status=ToolExecution.Status.SUCCEEDED if ok else ToolExecution.Status.FAILED,
        response_status=status_code,
        response_body=body,
        error=error[:500],
        finished_at=timezone.now(),
    )
