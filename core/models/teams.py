"""Teams: the workspaces that own configuration, runs and a credit account; their members are people."""

from django.conf import settings
from django.db import models


class RateLimits(models.Model):
    """Abstract: limits on API use; empty means no limit (a token's limit applies beside its team's)."""

    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    concurrent_streams = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        abstract = True


class Team(RateLimits):
    name = models.CharField(max_length=100, unique=True)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="teams")
    alert_below = models.PositiveIntegerField(
        null=True, blank=True, help_text="Send credits.low when the available credits fall below this."
    )
    webhook_url = models.URLField(
        max_length=500, blank=True, help_text="Receives the team's credit alerts as signed JSON POSTs."
    )
    webhook_secret = models.ForeignKey(
        "core.VaultSecret", null=True, blank=True, on_delete=models.PROTECT, related_name="+", help_text="Signs them."
    )
    credits_low_alerted = models.BooleanField(
        default=False, editable=False, help_text="credits.low was sent and the credits are still below the line."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "chat_team"

    def __str__(self) -> str:
        return self.name
