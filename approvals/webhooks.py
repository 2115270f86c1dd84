"""Approval webhooks: when a group has a `webhook_url`, each approval event is POSTed there as JSON, signed
with the group's vault secret; recorded in the transaction of the change it announces and delivered by the
worker (core.webhooks, which every event to a receiver goes through)."""

import logging
import secrets

from django.utils import timezone

from approvals.bodies import tool_execution_decision
from core.models import Approval, ToolExecution, WebhookDelivery
from core.timestamps import iso
from core.webhooks import signing_secret, webhook_record

logger = logging.getLogger(__name__)


def webhook_payload(*, event_type: str, approval: Approval, tool_executions: list[ToolExecution]) -> dict:
    """Ids and labels: no arguments (but an approver's edit, redacted), reasons or anything else a receiver
    could leak."""
    return {
        "id": "evt_" + secrets.token_hex(12),
        "type": event_type,
        "created_at": iso(timezone.now()),
        "approval_id": str(approval.id),
        "execution_id": str(approval.execution_id),
        "status": approval.status,
        "expires_at": iso(approval.expires_at),
        "team": approval.team.name,
        "group": {"id": str(approval.group_id), "name": approval.group.name, "model": approval.group.model_id},
        "tool_executions": [tool_execution_decision(te) for te in tool_executions],
    }


def approval_webhook_record(*, approval: Approval, event_type: str) -> WebhookDelivery | None:
    """Record the event for the group's receiver, built from the state the caller's transaction is
    writing, and queue its delivery: a rolled-back change sends nothing, a committed one is delivered even
    if this process dies right after. Runs inside the caller's transaction."""
    approval = Approval.objects.select_related("group", "group__webhook_secret", "team").get(pk=approval.pk)
    group = approval.group
    label = f"{approval.team.name}/{group.name}"
    secret = signing_secret(group.webhook_secret, group.team_id)
    if secret is None:
        logger.warning("webhook %s for group %s not sent: the group has no usable webhook_secret", event_type, label)
        return None
    calls = list(approval.tool_executions.filter(requires_approval=True).order_by("position"))
    payload = webhook_payload(event_type=event_type, approval=approval, tool_executions=calls)
    return webhook_record(payload=payload, url=group.webhook_url, secret=secret, label=label)
