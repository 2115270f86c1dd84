"""Crash recovery (SPEC §7): a run whose process died is finished by whoever finds it — the sweep, or any
read or resume of its execution or approval. A working run renews a lease on its execution
(chat.engine.run.lease_renewals); a running execution whose lease lapsed has no process left."""

import logging
import uuid
from dataclasses import asdict, dataclass

from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from django_tasks import task

from approvals.selectors import approval_for_token_get
from approvals.services import approval_interrupt, approvals_expire_due
from billing.alerts import credit_alerts_check
from billing.ledger import holds_settle, steps_cost
from core.models import ApiToken, Approval, Execution, Step, ToolExecution
from core.webhooks import webhook_deliveries_requeue

logger = logging.getLogger(__name__)

RUN_INTERRUPTED = {
    "status": 500,
    "type": "server_error",
    "code": "run_interrupted",
    "message": "The run was interrupted: the process running it stopped. What it completed was charged.",
}
SWEEP_BATCH = 500  # runs recovered per sweep; the next sweep takes the rest


def _lapsed() -> Q:
    # No lease at all: a run started before leases existed.
    lease_gone = Q(lease_expires_at__lt=timezone.now()) | Q(lease_expires_at__isnull=True)
    return Q(status=Execution.Status.RUNNING) & lease_gone


def execution_recover(*, execution_id: uuid.UUID) -> bool:
    """Finish what a dead run left, if its lease lapsed (else nothing, False): its tool calls that were
    being sent become `unknown` (never sent again on their own); its hold is settled for the model calls
    and tool runs it completed (the steps it wrote, unsettled); a run that was resuming an approval
    leaves the approval `interrupted` (to be resumed once more) and the execution paused; any other run
    ends failed with `run_interrupted`. One transaction, holding the execution's row."""
    with transaction.atomic(durable=True):
        execution = Execution.objects.select_for_update().filter(_lapsed(), pk=execution_id).first()
        if execution is None:
            return False
        now = timezone.now()
        ToolExecution.objects.filter(execution=execution, status=ToolExecution.Status.RUNNING).update(
            status=ToolExecution.Status.UNKNOWN, finished_at=now
        )
        steps = list(Step.objects.filter(execution=execution, settled=False))
        Step.objects.filter(pk__in=[s.pk for s in steps]).update(settled=True)
        execution.credits_charged += holds_settle(execution_id=execution.pk, cost=steps_cost(steps))
        execution.prompt_tokens += sum(s.prompt_tokens for s in steps)
        execution.completion_tokens += sum(s.completion_tokens for s in steps)
        execution.lease_expires_at = None
        resuming = execution.approvals.order_by("-created_at").first()
        if resuming is not None and resuming.status == Approval.Status.RESUMED:
            approval_interrupt(approval=resuming)
            execution.status = Execution.Status.PAUSED
        else:
            execution.status, execution.error, execution.finished_at = Execution.Status.FAILED, RUN_INTERRUPTED, now
            execution.client_request_id = execution.client_request_id and execution.response is not None
        execution.save(
            update_fields=[
                "status",
                "error",
                "finished_at",
                "client_request_id",
                "credits_charged",
                "prompt_tokens",
                "completion_tokens",
                "lease_expires_at",
            ]
        )
    logger.warning("run %s recovered after its process stopped (%s)", execution_id, execution.status)
    return True


def execution_lapsed(execution: Execution) -> bool:
    """Whether a run just read has lost its process: running, with its lease lapsed."""
    lease = execution.lease_expires_at
    return execution.status == Execution.Status.RUNNING and (lease is None or lease < timezone.now())


def execution_recover_if_lapsed(*, execution: Execution) -> bool:
    """execution_recover for a run just read, when what was read says its lease lapsed (no query else)."""
    return execution_lapsed(execution) and execution_recover(execution_id=execution.pk)


def runs_recover_lapsed() -> int:
    """Recover every run whose lease lapsed (the sweep); how many were recovered."""
    lapsed = Execution.objects.filter(_lapsed()).values_list("pk", flat=True)[:SWEEP_BATCH]
    return sum(execution_recover(execution_id=pk) for pk in lapsed)


@dataclass
class Swept:
    recovered: int  # runs whose process had died
    expired: int  # approvals past their time
    requeued: int  # webhook deliveries a dead worker left pending
    alerted: int  # credit alerts recorded (billing.alerts)


def sweep() -> Swept:
    """What `manage.py sweep` does once and the worker periodically: recover the runs whose lease lapsed,
    expire the approvals past their time (an interrupted one's time starts again at its recovery), and
    queue again the webhook deliveries a dead worker left pending, record the credit alerts now due."""
    return Swept(
        recovered=runs_recover_lapsed(),
        expired=approvals_expire_due(),
        requeued=webhook_deliveries_requeue(),
        alerted=credit_alerts_check(),
    )


@task()
def sweep_task() -> dict:
    """The sweep, as the worker runs it (queued every KITEMESH_SWEEP_SECONDS)."""
    return asdict(sweep())


def approval_recovered_get(*, token: ApiToken, approval_id: uuid.UUID) -> Approval:
    """approval_for_token_get, with its run recovered first when its process died (so a resume finds
    the approval interrupted, not resumed for ever)."""
    approval = approval_for_token_get(token=token, approval_id=approval_id)
    if execution_recover_if_lapsed(execution=approval.execution):
        approval = approval_for_token_get(token=token, approval_id=approval_id)
    return approval
