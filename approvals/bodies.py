"""A tool call and an approval as the API shows them (GET /v1/approvals/{id}), with arguments redacted; the
approver page shows the same."""

import json
from urllib.parse import urlsplit

from core.models import Approval, ToolExecution
from core.redaction import arguments_redact
from core.timestamps import iso


def tool_execution_decision(te: ToolExecution) -> dict:
    """A tool call and its decision: what a webhook event tells of it."""
    return {
        "id": str(te.id),
        "tool": te.tool_name,
        "risk": te.risk,
        "decision": te.decision,
        "decided_by": te.decided_by or None,
        "decided_via": te.decided_via or None,
        "decided_at": iso(te.decided_at),
    }


def tool_execution_body(te: ToolExecution) -> dict:
    """A tool call as approvers and clients see it: its decision, where it goes, its arguments with secrets
    redacted."""
    url = urlsplit(te.tool.url) if te.tool else None
    try:
        arguments = json.loads(te.arguments)
    except ValueError:
        arguments = {"_unparsed": "[not valid JSON]"}
    if te.tool and isinstance(arguments, dict):
        arguments = arguments_redact(te.tool, arguments)
    return {
        **tool_execution_decision(te),
        "method": te.tool.method if te.tool else None,
        "host": url.hostname if url else None,
        "path": url.path if url else None,
        "arguments": arguments,
        "requires_approval": te.requires_approval,
        "approvals_required": te.approvals_required,
        "approved_by": [given.username for given in te.approvals_given.all()] if te.approvals_required > 1 else [],
        "status": te.status,
        "reason": te.decision_reason,
    }


def approval_body(approval: Approval) -> dict:
    return {
        "object": "approval",
        "id": str(approval.id),
        "status": approval.status,
        "execution_id": str(approval.execution_id),
        "model": f"group:{approval.group_id}",
        "created_at": iso(approval.created_at),
        "expires_at": iso(approval.expires_at),
        "tool_executions": [tool_execution_body(te) for te in approval.tool_executions.all()],
    }
