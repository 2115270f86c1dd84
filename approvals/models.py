"""Approvals: a paused round of tool calls awaiting decisions, with what the run needs to continue
(persisted, so a restart between pause and resume loses nothing) and the credits held meanwhile."""

import uuid

from django.db import models

from billing.models import Hold
from chat.models import Execution, Group, Team


class Approval(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        RESUMED = "resumed"
        EXPIRED = "expired"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    execution = models.ForeignKey(Execution, on_delete=models.CASCADE, related_name="approvals")
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="approvals")
    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="approvals")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    expires_at = models.DateTimeField()
    state = models.JSONField(help_text="The conversation and upstream parameters to continue with.")
    hold = models.ForeignKey(Hold, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        permissions = [("decide_approval", "Can decide tool calls on the approver page")]
        indexes = [models.Index(fields=["team", "status", "-created_at"])]

    def __str__(self) -> str:
        return f"approval {self.id} ({self.status})"
