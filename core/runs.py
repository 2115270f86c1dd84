"""The run record's own bookkeeping, shared by the engine and by approvals: a run's lease, the steps it
writes while it works, and what a stored answer holds."""

from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from core.models import Execution, Step
from core.sql import sql_insert


def lease_deadline() -> datetime:
    """When a run's lease lapses unless its process renews it (SPEC §7)."""
    return timezone.now() + timedelta(seconds=settings.KITEMESH_RUN_LEASE_SECONDS)


def execution_lease_renew(*, execution: Execution) -> bool:
    """Extend a running execution's lease; False when it is running no more (finished, or recovered)."""
    running = Execution.objects.filter(pk=execution.pk, status=Execution.Status.RUNNING)
    return bool(running.update(lease_expires_at=lease_deadline()))


def steps_write(*, steps: list[Step]) -> None:
    """Write steps that ended while their run goes on, not yet settled: they are charged by their
    request's settlement, or by its recovery if its process dies first."""
    for step in steps:
        step.settled = False
    sql_insert(steps)


def tool_calls_of(response: dict) -> list[dict]:
    """The tool calls of a completion body (a pause's), or none."""
    return [call for choice in response.get("choices", ()) for call in choice["message"].get("tool_calls") or ()]
