"""The models every app reads: teams, their configuration, the record of runs and approvals, webhook
deliveries. Apps own the behaviour (chat runs, approvals decides, billing charges); the schema they share
lives here, below all of them."""

from core.models.config import (
    ApiToken,
    ConfigVersion,
    CustomModel,
    Group,
    GroupAgent,
    GroupFallback,
    Mode,
    Tool,
    VaultSecret,
)
from core.models.runs import Approval, CallApproval, Execution, Step, ToolExecution
from core.models.teams import RateLimits, Team
from core.models.webhooks import WebhookDelivery

__all__ = [
    "ApiToken",
    "Approval",
    "CallApproval",
    "ConfigVersion",
    "CustomModel",
    "Execution",
    "Group",
    "GroupAgent",
    "GroupFallback",
    "Mode",
    "RateLimits",
    "Step",
    "Team",
    "Tool",
    "ToolExecution",
    "VaultSecret",
    "WebhookDelivery",
]
