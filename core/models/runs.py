"""The record of every run: executions and their steps, the tool calls the brain asked for, and the approvals
that paused them. Written by the engine, decided on by people, charged by the ledger."""

import uuid
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q

from core.fields import EncryptedJSONField, EncryptedTextField
from core.models.config import ApiToken, CustomModel, Group, Mode, Tool
from core.models.teams import Team


class Execution(models.Model):
    """One request (and its resumes) run through a group."""

    class Status(models.TextChoices):
        RUNNING = "running"
        PAUSED = "paused"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"
        EXPIRED = "expired"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    # Indexed by Meta's (team, -created_at), which serves lookups by team too: one index less to write
    # on every request.
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="executions", db_index=False)
    group = models.ForeignKey(Group, on_delete=models.SET_NULL, null=True, related_name="executions")
    token = models.ForeignKey(ApiToken, on_delete=models.SET_NULL, null=True, related_name="executions")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="executions",
        help_text="The person who ran it in the browser (/chat/), when no token did.",
    )
    request_id = models.CharField(max_length=128)
    client_request_id = models.BooleanField(default=False, help_text="request_id came from the client.")
    request_hash = models.CharField(max_length=64, blank=True)
    mode = models.CharField(max_length=20, choices=Mode.choices)
    stream = models.BooleanField(default=False)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.RUNNING)
    metadata = models.JSONField(default=dict, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    credits_charged = models.PositiveIntegerField(default=0)
    response = models.JSONField(null=True, blank=True, help_text="Non-stream response body, for replays.")
    error = models.JSONField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(
        null=True, blank=True, help_text="While running: renewed by the process working on it; lapsed, it died."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "chat_execution"
        indexes = [
            models.Index(fields=["team", "-created_at"]),
            # The sweep's question, over the few running rows only.
            models.Index(fields=["lease_expires_at"], condition=Q(status="running"), name="execution_running_lease"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["team", "request_id"], condition=Q(client_request_id=True), name="execution_idempotency_key"
            )
        ]

    def __str__(self) -> str:
        return str(self.id)


class Step(models.Model):
    """One model call or tool run inside an execution."""

    class Kind(models.TextChoices):
        MODEL_CALL = "model_call"
        TOOL_CALL = "tool_call"

    class Status(models.TextChoices):
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"
        DENIED = "denied"  # a call a person or a rule denied: it never ran

    execution = models.ForeignKey(Execution, on_delete=models.CASCADE, related_name="steps")
    kind = models.CharField(max_length=20, choices=Kind.choices)
    tool_execution = models.ForeignKey(
        "ToolExecution", null=True, blank=True, on_delete=models.SET_NULL, related_name="steps"
    )
    agent = models.CharField(max_length=64, blank=True, help_text="Agent name; blank for the brain.")
    custom_model = models.ForeignKey(CustomModel, null=True, blank=True, on_delete=models.SET_NULL)
    model_name = models.CharField(max_length=200, blank=True, help_text="Model, or tool name for a tool call.")
    status = models.CharField(max_length=20, choices=Status.choices)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    usage_estimated = models.BooleanField(default=False)
    cost = models.DecimalField(
        max_digits=18, decimal_places=6, default=Decimal(0), help_text="Exact credits before rounding."
    )
    latency_ms = models.PositiveIntegerField(default=0)
    error = models.CharField(max_length=500, blank=True)
    settled = models.BooleanField(
        default=True,
        help_text="Charged by its request's settlement. A step written while its run works is not yet: a run "
        "recovered after a crash charges those.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "chat_step"
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.kind} {self.model_name} ({self.status})"


class ToolExecution(models.Model):
    """One tool call the brain asked for; its UUID is the id clients see, and the Idempotency-Key of every
    send. The status only moves forward, each move a conditional update (pending → approved/denied →
    running → succeeded/failed, or unknown when the run's process died while it was sent), so no path can
    run a call twice; only an idempotent tool's unknown call is sent again (unknown → running).
    `arguments` is exactly what was shown for approval; `arguments_hash` is checked again before sending."""

    class Status(models.TextChoices):
        PENDING = "pending"
        APPROVED = "approved"
        DENIED = "denied"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        UNKNOWN = "unknown"

    class DecidedVia(models.TextChoices):
        AUTO = "auto", "No approval needed"
        API = "api", "API client"
        UI = "ui", "Approver page"
        RULE = "rule", "Approval rule"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    execution = models.ForeignKey(Execution, on_delete=models.CASCADE, related_name="tool_executions")
    approval = models.ForeignKey(
        "Approval", null=True, blank=True, on_delete=models.CASCADE, related_name="tool_executions"
    )
    tool = models.ForeignKey(Tool, null=True, on_delete=models.SET_NULL, related_name="executions")
    tool_name = models.CharField(max_length=64)
    call_id = models.CharField(max_length=100, help_text="The upstream's id for this call.")
    position = models.PositiveSmallIntegerField(default=0, help_text="Order within its round.")
    arguments = EncryptedTextField(
        help_text="The arguments JSON that runs: the model's, or an approver's edit of them (encrypted at rest)."
    )
    arguments_hash = models.CharField(max_length=64)
    original_arguments = EncryptedTextField(
        null=True, blank=True, help_text="The model's arguments, when an approver edited them (encrypted at rest)."
    )
    requires_approval = models.BooleanField(default=False)
    approvals_required = models.PositiveSmallIntegerField(
        default=1, help_text="Different people whose approval it needs (its tool's, when it was called)."
    )
    risk = models.CharField(max_length=10, choices=Tool.Risk.choices)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    decided_via = models.CharField(max_length=4, choices=DecidedVia.choices, blank=True)
    decided_by = models.CharField(max_length=150, blank=True, help_text="User name or 'token:<name>'.")
    decided_by_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decision_reason = models.CharField(max_length=500, blank=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    response_body = models.TextField(blank=True)
    error = models.CharField(max_length=500, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "chat_toolexecution"
        ordering = ["created_at", "position"]

    def __str__(self) -> str:
        return f"{self.tool_name} ({self.status})"

    @property
    def edited(self) -> bool:
        """An approver changed its arguments before it ran (`arguments` are theirs)."""
        return self.original_arguments is not None

    @property
    def decision(self) -> str | None:
        """approved / denied once decided (also after it ran), else None."""
        if self.status == self.Status.PENDING:
            return None
        return "denied" if self.status == self.Status.DENIED else "approved"


class CallApproval(models.Model):
    """One person's approval of a call that needs several (its `approvals_required`). The call is approved
    when it has enough; a person counts once (the unique constraint, whatever the races)."""

    tool_execution = models.ForeignKey(ToolExecution, on_delete=models.CASCADE, related_name="approvals_given")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    username = models.CharField(max_length=150)
    reason = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "approvals_callapproval"
        ordering = ["created_at", "id"]
        constraints = [models.UniqueConstraint(fields=["tool_execution", "user"], name="call_approved_once_per_user")]

    def __str__(self) -> str:
        return f"{self.username} approved {self.tool_execution_id}"


class Approval(models.Model):
    """A paused round of tool calls awaiting decisions, with what the run needs to continue (persisted, so
    a restart between pause and resume loses nothing; encrypted at rest). While it waits, the execution's
    one active hold reserves what the round's tools cost."""

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
    created_at = models.DateTimeField(auto_now_add=True)
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "approvals_approval"
        ordering = ["-created_at"]
        permissions = [("decide_approval", "Can decide tool calls on the approver page")]
        indexes = [models.Index(fields=["team", "status", "-created_at"])]

    def __str__(self) -> str:
        return f"approval {self.id} ({self.status})"
