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
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "chat_team"

    def __str__(self) -> str:
        return self.name
