"""Approvals: a paused round of tool calls awaiting decisions, with what the run needs to continue
(persisted, so a restart between pause and resume loses nothing) and the credits held meanwhile."""

import uuid

from django.db import models
from django.db.models import Q

from billing.models import Hold
from chat.models import Execution, Group, Team
from core.fields import EncryptedJSONField


class Approval(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        RESUMED = "resumed"
        EXPIRED = "expired"
        INTERRUPTED = "interrupted"  # the resumed run's process died: it can be resumed once more

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    execution = models.ForeignKey(Execution, on_delete=models.CASCADE, related_name="approvals")
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="approvals")
    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="approvals")
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PENDING)
    expires_at = models.DateTimeField()
    state = EncryptedJSONField(
        help_text="The conversation and upstream parameters to continue with (encrypted at rest)."
    )
    hold = models.ForeignKey(Hold, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        permissions = [("decide_approval", "Can decide tool calls on the approver page")]
        indexes = [models.Index(fields=["team", "status", "-created_at"])]

    def __str__(self) -> str:
        return f"approval {self.id} ({self.status})"


class WebhookDelivery(models.Model):
    """An event owed to a group's webhook receiver: recorded in the transaction of the change it announces
    and delivered by the worker (approvals.webhooks) at least once, across restarts,
    with the same event id and body on every attempt."""

    class Status(models.TextChoices):
        PENDING = "pending"
        DELIVERED = "delivered"
        FAILED = "failed"  # refused, or given up after KITEMESH_WEBHOOK_ATTEMPTS

    id = models.CharField(primary_key=True, max_length=40, help_text="The event id (X-KiteMesh-Delivery).")
    event_type = models.CharField(max_length=40)
    url = models.URLField(max_length=500)
    body = models.TextField(help_text="The JSON sent, exactly: every attempt signs and sends these bytes.")
    secret = models.ForeignKey(
        "chat.VaultSecret", null=True, on_delete=models.SET_NULL, related_name="+", help_text="Signs the body."
    )
    label = models.CharField(max_length=250, help_text="team/group, for logs.")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    last_error = models.CharField(max_length=500, blank=True)
    next_attempt_at = models.DateTimeField(help_text="Pending: when the next attempt is due (or an attempt's lease).")
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "webhook deliveries"
        indexes = [
            models.Index(fields=["next_attempt_at"], condition=Q(status="pending"), name="webhook_delivery_pending")
        ]

    def __str__(self) -> str:
        return f"{self.event_type} {self.id} ({self.status})"
