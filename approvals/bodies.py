"""A tool call and an approval as the API shows them (GET /v1/approvals/{id}), with arguments redacted; the
approver page shows the same."""

import json
from urllib.parse import urlsplit

from core.models import Approval, ToolExecution
from core.redaction import arguments_redact
from core.timestamps import iso


def tool_execution_decision(te: ToolExecution) -> dict:
    """A tool call and its decision: what a webhook event tells of it. An edited call carries both its
    arguments and the model's, redacted: that an approver changed the call, and how, is the decision."""
    decision = {
        "id": str(te.id),
        "tool": te.tool_name,
        "risk": te.risk,
        "decision": te.decision,
        "decided_by": te.decided_by or None,
        "decided_via": te.decided_via or None,
        "decided_at": iso(te.decided_at),
        "edited": te.edited,
    }
    if te.edited:
        decision |= {"arguments": _shown(te, te.arguments), "original_arguments": _shown(te, te.original_arguments)}
    return decision


def tool_execution_body(te: ToolExecution) -> dict:
    """A tool call as approvers and clients see it: its decision, where it goes, its arguments (what runs or
    ran; the model's too when an approver edited them) with secrets redacted."""
    url = urlsplit(te.tool.url) if te.tool else None
    return {
        **tool_execution_decision(te),
        "method": te.tool.method if te.tool else None,
        "host": url.hostname if url else None,
        "path": url.path if url else None,
        "arguments": _shown(te, te.arguments),
        "original_arguments": _shown(te, te.original_arguments) if te.edited else None,
        "requires_approval": te.requires_approval,
        "approvals_required": te.approvals_required,
        "approved_by": [given.username for given in te.approvals_given.all()] if te.approvals_required > 1 else [],
        "status": te.status,
        "reason": te.decision_reason,
    }


def _shown(te: ToolExecution, arguments: str) -> object:
    """Arguments as JSON with secret values redacted (by the tool's rules)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {"_unparsed": "[not valid JSON]"}
    return arguments_redact(te.tool, value) if te.tool and isinstance(value, dict) else value


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
