"""Read queries for approvals."""

import uuid

from approvals.models import Approval
from chat.errors import NotFound


def approval_for_team_get(*, team_id: int, approval_id: uuid.UUID) -> Approval:
    """The team's approval with its group and execution (404 for any other team's)."""
    approval = Approval.objects.select_related("execution", "group").filter(pk=approval_id, team_id=team_id).first()
    if approval is None:
        raise NotFound(f"No approval {approval_id}.", param="approval_id", code="approval_not_found")
    return approval


def approval_with_calls_get(*, team_id: int, approval_id: uuid.UUID) -> Approval:
    """The approval with its tool executions and their tools, for showing it."""
    approval = (
        Approval.objects.select_related("execution", "group")
        .prefetch_related("tool_executions__tool")
        .filter(pk=approval_id, team_id=team_id)
        .first()
    )
    if approval is None:
        raise NotFound(f"No approval {approval_id}.", code="approval_not_found")
    return approval
