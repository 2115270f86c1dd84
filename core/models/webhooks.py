"""Webhook deliveries: events owed to a receiver, recorded in the transaction of the change they announce."""

from django.db import models
from django.db.models import Q

from core.models.config import VaultSecret


class WebhookDelivery(models.Model):
    """An event owed to a webhook receiver (a group's, or a team's for credit alerts): recorded in the
    transaction of the change it announces and delivered by the worker (core.webhooks) at least once, across
    restarts, with the same event id and body on every attempt."""

    class Status(models.TextChoices):
        PENDING = "pending"
        DELIVERED = "delivered"
        FAILED = "failed"  # refused, or given up after KITEMESH_WEBHOOK_ATTEMPTS

    id = models.CharField(primary_key=True, max_length=40, help_text="The event id (X-KiteMesh-Delivery).")
    event_type = models.CharField(max_length=40)
    url = models.URLField(max_length=500)
    body = models.TextField(help_text="The JSON sent, exactly: every attempt signs and sends these bytes.")
    secret = models.ForeignKey(
        VaultSecret, null=True, on_delete=models.SET_NULL, related_name="+", help_text="Signs the body."
    )
    label = models.CharField(max_length=250, help_text="team/group, for logs.")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    last_error = models.CharField(max_length=500, blank=True)
    next_attempt_at = models.DateTimeField(help_text="Pending: when the next attempt is due (or an attempt's lease).")
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "approvals_webhookdelivery"
        verbose_name_plural = "webhook deliveries"
        indexes = [
            models.Index(fields=["next_attempt_at"], condition=Q(status="pending"), name="webhook_delivery_pending")
        ]

    def __str__(self) -> str:
        return f"{self.event_type} {self.id} ({self.status})"
