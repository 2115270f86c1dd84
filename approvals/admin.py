from django.contrib import admin
from django.http import HttpRequest

from core.models import Approval, ToolExecution, WebhookDelivery


class ToolExecutionInline(admin.TabularInline):
    model = ToolExecution
    extra = 0
    can_delete = False
    fields = ["tool_name", "status", "risk", "decided_by", "decided_via", "decision_reason", "response_status"]
    readonly_fields = fields


@admin.register(Approval)
class ApprovalAdmin(admin.ModelAdmin):
    """Read-only: decisions are made on the approver page or through the API, never by editing rows."""

    list_display = ["id", "team", "group", "status", "created_at", "expires_at"]
    list_filter = ["team", "status"]
    exclude = ["state"]
    inlines = [ToolExecutionInline]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Approval | None = None) -> bool:
        return False


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    """Read-only: what the worker delivered, is still trying, or gave up on (with the last error)."""

    list_display = ["id", "event_type", "label", "status", "attempts", "last_error", "created_at", "delivered_at"]
    list_filter = ["status", "event_type"]
    search_fields = ["id", "label"]
    exclude = ["body"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: WebhookDelivery | None = None) -> bool:
        return False
