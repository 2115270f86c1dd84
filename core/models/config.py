"""What a team configures: vault secrets, custom models (upstream LLMs), HTTP tools, groups (a brain, agents,
tools, fallbacks) and API tokens."""

import secrets
import uuid
from decimal import Decimal

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

from core.models.teams import RateLimits, Team

APPROVALS_REQUIRED_MAX = 5  # a two-person rule, or a few more; not a vote


class VaultSecret(models.Model):
    """A team's secret, Fernet-encrypted at rest (chat.services.vault); the clear value never leaves
    the process except to the upstream or tool that needs it."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="secrets")
    name = models.CharField(max_length=100)
    description = models.CharField(max_length=300, blank=True)
    ciphertext = models.BinaryField(editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    rotated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "chat_vaultsecret"
        constraints = [models.UniqueConstraint(fields=["team", "name"], name="vault_secret_unique_name")]

    def __str__(self) -> str:
        return f"{self.team.name}/{self.name}"


class CustomModel(models.Model):
    class Provider(models.TextChoices):
        OPENAI = "openai", "OpenAI-compatible"
        SCRIPTED = "scripted", "Scripted (offline)"

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="custom_models")
    name = models.CharField(max_length=100)
    provider = models.CharField(max_length=20, choices=Provider.choices, default=Provider.OPENAI)
    base_url = models.URLField(max_length=500, blank=True)
    model = models.CharField(max_length=200, help_text="Model name sent upstream.")
    api_key_secret = models.ForeignKey(
        VaultSecret, null=True, blank=True, on_delete=models.PROTECT, related_name="custom_models"
    )
    system = models.TextField(blank=True, help_text="System instruction placed first in every call.")
    input_per_1k = models.DecimalField(max_digits=16, decimal_places=6, default=Decimal(0))
    output_per_1k = models.DecimalField(max_digits=16, decimal_places=6, default=Decimal(0))
    timeout_seconds = models.FloatField(null=True, blank=True, help_text="Read timeout; default from settings.")

    class Meta:
        db_table = "chat_custommodel"
        constraints = [
            models.UniqueConstraint(fields=["team", "name"], name="custom_model_unique_name"),
            models.CheckConstraint(
                condition=Q(input_per_1k__gte=0, output_per_1k__gte=0), name="custom_model_prices_positive"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.team.name}/{self.name}"


class Tool(models.Model):
    class Method(models.TextChoices):
        GET = "GET"
        POST = "POST"
        PUT = "PUT"
        PATCH = "PATCH"
        DELETE = "DELETE"
        HEAD = "HEAD"

    class AuthType(models.TextChoices):
        NONE = "none"
        BEARER = "bearer"
        HEADER = "header"

    class Approver(models.TextChoices):
        ANY = "any", "API client or UI"
        HUMAN = "human", "UI only"

    class Risk(models.TextChoices):
        LOW = "low"
        MEDIUM = "medium"
        HIGH = "high"

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="tools")
    name = models.CharField(max_length=64, help_text="Function name offered to the model.")
    description = models.TextField(blank=True)
    method = models.CharField(max_length=8, choices=Method.choices, default=Method.POST)
    url = models.URLField(max_length=1000)
    parameters = models.JSONField(default=dict, blank=True, help_text="JSON schema of the arguments.")
    auth_type = models.CharField(max_length=10, choices=AuthType.choices, default=AuthType.NONE)
    auth_header = models.CharField(max_length=100, blank=True, help_text="Header name for auth type 'header'.")
    auth_secret = models.ForeignKey(VaultSecret, null=True, blank=True, on_delete=models.PROTECT, related_name="tools")
    requires_approval = models.BooleanField(default=False)
    idempotent = models.BooleanField(
        default=False,
        help_text="Safe to send twice with the same Idempotency-Key: a call whose outcome a crash left unknown "
        "is sent again when its approval is resumed.",
    )
    approver = models.CharField(max_length=10, choices=Approver.choices, default=Approver.ANY)
    approvals_required = models.PositiveSmallIntegerField(
        default=1,
        validators=[MinValueValidator(1), MaxValueValidator(APPROVALS_REQUIRED_MAX)],
        help_text="How many different people must approve a call on the approver page (more than 1: API "
        "clients cannot decide it; one deny denies).",
    )
    approval_rules = models.JSONField(
        default=list,
        blank=True,
        help_text="Ordered rules, the first whose `when` (a JSON Schema) the arguments satisfy decides: "
        '[{"name": "small", "when": {"properties": {"amount": {"maximum": 50}}}, "then": "approve"}]; '
        "`then` is approve, deny (with a `reason` for the model) or ask.",
    )
    risk = models.CharField(max_length=10, choices=Risk.choices, blank=True, help_text="Overrides the method's.")
    price = models.DecimalField(max_digits=16, decimal_places=6, default=Decimal(0))
    tags = models.JSONField(default=list, blank=True)

    class Meta:
        db_table = "chat_tool"
        constraints = [
            models.UniqueConstraint(fields=["team", "name"], name="tool_unique_name"),
            models.CheckConstraint(condition=Q(price__gte=0), name="tool_price_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.team.name}/{self.name}"


class Mode(models.TextChoices):
    AUTO = "auto"
    NORMAL = "normal"
    SYNTHESIS = "synthesis"
    ORCHESTRATION = "orchestration"


class Group(models.Model):
    class ApprovalStyle(models.TextChoices):
        PER_TOOL = "per_tool", "Per tool"
        BATCH = "batch", "Batch (all or nothing)"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="groups")
    name = models.CharField(max_length=100)
    brain = models.ForeignKey(CustomModel, on_delete=models.PROTECT, related_name="brain_of")
    tools = models.ManyToManyField(Tool, blank=True, related_name="groups")
    mode = models.CharField(max_length=20, choices=Mode.choices, default=Mode.NORMAL)
    approval_style = models.CharField(max_length=10, choices=ApprovalStyle.choices, default=ApprovalStyle.PER_TOOL)
    approval_ttl_seconds = models.PositiveIntegerField(default=900)
    max_output_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="Output-token cap when the client gives none; default from settings."
    )
    webhook_url = models.URLField(
        max_length=500, blank=True, help_text="Receives approval events as signed JSON POSTs (approvals.webhooks)."
    )
    webhook_secret = models.ForeignKey(
        VaultSecret,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="webhook_of",
        help_text="The team's secret that signs webhook bodies (X-KiteMesh-Signature); required with a URL.",
    )

    class Meta:
        db_table = "chat_group"
        constraints = [models.UniqueConstraint(fields=["team", "name"], name="group_unique_name")]

    def __str__(self) -> str:
        return f"{self.name} ({self.id})"

    @property
    def model_id(self) -> str:
        """The `model` value clients send for this group."""
        return f"group:{self.id}"


class GroupAgent(models.Model):
    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="agents")
    name = models.CharField(max_length=64, help_text="How the brain names this agent; defaults to the model's.")
    model = models.ForeignKey(CustomModel, on_delete=models.PROTECT, related_name="agent_of")
    role = models.TextField(blank=True, help_text="Role/instruction that overrides the model's system.")
    position = models.PositiveSmallIntegerField(default=0)

    class Meta:
        db_table = "chat_groupagent"
        ordering = ["position", "id"]
        constraints = [models.UniqueConstraint(fields=["group", "name"], name="group_agent_unique_name")]

    def __str__(self) -> str:
        return self.name


class GroupFallback(models.Model):
    """A model that answers for the group's brain, in order, when the brain's upstream fails before
    producing anything."""

    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="fallbacks")
    model = models.ForeignKey(CustomModel, on_delete=models.PROTECT, related_name="fallback_of")
    position = models.PositiveSmallIntegerField(default=0)

    class Meta:
        db_table = "chat_groupfallback"
        ordering = ["position", "id"]
        constraints = [models.UniqueConstraint(fields=["group", "model"], name="group_fallback_unique_model")]

    def __str__(self) -> str:
        return f"{self.group.name} → {self.model.name}"


class ApiToken(RateLimits):
    """A `km_…` bearer token. Only `prefix` is kept in clear (for lookup); the secret is a SHA-256 hash.
    An empty group or tool selection means all of the team's, minus the exclusions."""

    class CreditPeriod(models.TextChoices):
        DAY = "day", "UTC day"
        MONTH = "month", "UTC month"
        TOTAL = "total", "Ever"

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    groups = models.ManyToManyField(Group, blank=True, related_name="+")
    excluded_groups = models.ManyToManyField(Group, blank=True, related_name="+")
    tools = models.ManyToManyField(Tool, blank=True, related_name="+")
    excluded_tools = models.ManyToManyField(Tool, blank=True, related_name="+")
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    credit_limit = models.PositiveIntegerField(
        null=True, blank=True, help_text="Credits its runs may be charged and hold in a period; empty: no limit."
    )
    credit_period = models.CharField(max_length=5, choices=CreditPeriod.choices, default=CreditPeriod.TOTAL)
    credit_alert_percent = models.PositiveSmallIntegerField(default=0, editable=False)  # billing.alerts
    credit_alert_period_start = models.DateTimeField(null=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "chat_apitoken"
        constraints = [
            models.UniqueConstraint(
                fields=["team", "name"], condition=Q(revoked_at=None), name="api_token_unique_active_name"
            )
        ]

    # The token is DRF's principal for API requests (chat.authentication).
    is_authenticated = True

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"


def version_start() -> int:
    """A new row's version, random: a row made again (after a flush) never meets a version cached before."""
    return secrets.randbelow(2**62)


class ConfigVersion(models.Model):
    """One row whose `version` the database raises on every write to a table of configuration (triggers:
    QuerySet.update() and raw SQL count too, core.config_version). A process's cached configuration is good
    while the version it was read at is current."""

    version = models.BigIntegerField(default=version_start)

    class Meta:
        db_table = "core_configversion"

    def __str__(self) -> str:
        return f"configuration version {self.version}"
