import functools

from django import forms
from django.contrib import admin
from django.db import models
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse

from approvals.rules import rules_problem
from chat.services.tokens import token_secret_new
from core.models import (
    ApiToken,
    CustomModel,
    Execution,
    Group,
    GroupAgent,
    GroupFallback,
    Step,
    Team,
    Tool,
    VaultSecret,
)
from core.vault import encrypt

# URLs without a scheme are taken as https (Django 6's default; saying it now silences its warning).
URL_FIELDS = {models.URLField: {"assume_scheme": "https"}}


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    formfield_overrides = URL_FIELDS
    list_display = ["name", "alert_below", "created_at"]
    search_fields = ["name"]
    filter_horizontal = ["members"]


class VaultSecretForm(forms.ModelForm):
    value = forms.CharField(
        widget=forms.PasswordInput(render_value=False),
        required=False,
        help_text="Write-only. Leave empty to keep the current value; a new value rotates the secret in place.",
    )

    class Meta:
        model = VaultSecret
        fields = ["team", "name", "description"]

    def clean(self) -> dict:
        data = super().clean()
        if not self.instance.pk and not data.get("value"):
            self.add_error("value", "A new secret needs a value.")
        return data


@admin.register(VaultSecret)
class VaultSecretAdmin(admin.ModelAdmin):
    form = VaultSecretForm
    list_display = ["name", "team", "description", "created_at", "rotated_at"]
    list_filter = ["team"]

    def save_model(self, request: HttpRequest, obj: VaultSecret, form: VaultSecretForm, change: bool) -> None:
        if form.cleaned_data.get("value"):
            from django.utils import timezone

            obj.ciphertext = encrypt(form.cleaned_data["value"])
            if change:
                obj.rotated_at = timezone.now()
        super().save_model(request, obj, form, change)


@admin.register(CustomModel)
class CustomModelAdmin(admin.ModelAdmin):
    formfield_overrides = URL_FIELDS
    list_display = ["name", "team", "provider", "model", "input_per_1k", "output_per_1k"]
    list_filter = ["team", "provider"]


class ToolForm(forms.ModelForm):
    class Meta:
        model = Tool
        fields = [
            *("team", "name", "description", "method", "url", "parameters", "auth_type", "auth_header"),
            *("auth_secret", "requires_approval", "idempotent", "approver", "approvals_required"),
            *("approval_rules", "risk", "price", "tags"),
        ]
        field_classes = {"url": functools.partial(forms.URLField, assume_scheme="https")}

    def clean_approval_rules(self) -> list:
        rules = self.cleaned_data["approval_rules"] or []
        if (problem := rules_problem(rules)) is not None:
            raise forms.ValidationError(f"{problem[0]}: {problem[1]}")
        return rules


@admin.register(Tool)
class ToolAdmin(admin.ModelAdmin):
    form = ToolForm
    formfield_overrides = URL_FIELDS
    list_display = ["name", "team", "method", "url", "requires_approval", "idempotent", "price"]
    list_filter = ["team", "requires_approval", "idempotent"]


class GroupAgentInline(admin.TabularInline):
    model = GroupAgent
    extra = 0


class GroupFallbackInline(admin.TabularInline):
    model = GroupFallback
    extra = 0


@admin.register(Group)
class GroupAdmin(admin.ModelAdmin):
    formfield_overrides = URL_FIELDS
    list_display = ["name", "id", "team", "brain", "mode", "approval_style"]
    list_filter = ["team", "mode"]
    filter_horizontal = ["tools"]
    inlines = [GroupAgentInline, GroupFallbackInline]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """The secret is generated on add and shown on the next page only; it is never stored in clear."""

    list_display = ["name", "team", "prefix", "created_at", "expires_at", "revoked_at"]
    list_filter = ["team"]
    readonly_fields = ["prefix", "created_at"]
    filter_horizontal = ["groups", "excluded_groups", "tools", "excluded_tools"]

    def save_model(self, request: HttpRequest, obj: ApiToken, form: forms.ModelForm, change: bool) -> None:
        if not change:
            obj._new_secret, obj.prefix, obj.secret_hash = token_secret_new()
        super().save_model(request, obj, form, change)

    def response_add(self, request: HttpRequest, obj: ApiToken, post_url_continue: str | None = None) -> HttpResponse:
        context = {
            **self.admin_site.each_context(request),
            "token": obj,
            "secret": obj._new_secret,
            "list_url": reverse("admin:core_apitoken_changelist"),
        }
        return render(request, "admin/chat/apitoken/created.html", context)


class StepInline(admin.TabularInline):
    model = Step
    extra = 0
    can_delete = False
    readonly_fields = [f.name for f in Step._meta.fields]


@admin.register(Execution)
class ExecutionAdmin(admin.ModelAdmin):
    list_display = ["id", "team", "group", "mode", "status", "credits_charged", "created_at"]
    list_filter = ["team", "status", "mode"]
    inlines = [StepInline]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Execution | None = None) -> bool:
        return False
