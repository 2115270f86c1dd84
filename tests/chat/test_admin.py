"""The Django admin (SPEC §5): every configuration object, a token secret shown once, write-only vault
values, and a read-only ledger."""

import hashlib
import re

import pytest
from django.urls import reverse
from django.utils import timezone

from billing.models import CreditAccount, LedgerEntry
from chat.services.vault import secret_set
from core.models import ApiToken, Execution, Step, Tool, VaultSecret, WebhookDelivery
from core.vault import secret_value
from tests.conftest import UPSTREAM_API_KEY, Setup
from tests.support.helpers import live_token

SECRET_IN_PAGE = re.compile(r'value="(km_[A-Za-z0-9_-]+)"')


@pytest.fixture
def configured(setup: Setup) -> Setup:
    """The setup plus a tool, an execution with a step: one of every object the admin lists."""
    tool = Tool.objects.create(
        team=setup.team, name="create_ticket", url="https://crm.example/tickets", requires_approval=True
    )
    setup.group.tools.add(tool)
    execution = Execution.objects.create(team=setup.team, group=setup.group, request_id="req_admin", mode="normal")
    Step.objects.create(execution=execution, kind="model_call", model_name="up-model", status="succeeded")
    return setup


ADMIN_MODELS = [
    "core.team",
    "core.vaultsecret",
    "core.custommodel",
    "core.tool",
    "core.group",
    "core.apitoken",
    "core.execution",
    "billing.ledgerentry",
    "billing.creditaccount",
    "billing.hold",
]


@pytest.mark.parametrize("label", ADMIN_MODELS)
def test_admin_changelist_works(admin_client, configured: Setup, label: str):
    app, model = label.split(".")

    response = admin_client.get(reverse(f"admin:{app}_{model}_changelist"))

    assert response.status_code == 200


def _object_for(label: str, setup: Setup):
    return {
        "core.team": setup.team,
        "core.vaultsecret": setup.brain.api_key_secret,
        "core.custommodel": setup.brain,
        "core.tool": Tool.objects.get(team=setup.team),
        "core.group": setup.group,
        "core.apitoken": setup.token,
        "core.execution": Execution.objects.get(request_id="req_admin"),
        "billing.ledgerentry": LedgerEntry.objects.filter(team=setup.team).first(),
        "billing.creditaccount": CreditAccount.objects.get(team=setup.team),
    }[label]


@pytest.mark.parametrize("label", [m for m in ADMIN_MODELS if m != "billing.hold"])
def test_admin_change_page_works(admin_client, configured: Setup, label: str):
    app, model = label.split(".")
    obj = _object_for(label, configured)

    response = admin_client.get(reverse(f"admin:{app}_{model}_change", args=[obj.pk]))

    assert response.status_code == 200


def _add_token(admin_client, setup: Setup, name: str = "from-admin"):
    return admin_client.post(
        reverse("admin:core_apitoken_add"),
        {
            "team": setup.team.pk,
            "name": name,
            "groups": [str(setup.group.pk)],
            "expires_at_0": "",
            "expires_at_1": "",
            "revoked_at_0": "",
            "revoked_at_1": "",
            "credit_period": "total",  # the form's preselected default
        },
    )


def test_adding_a_token_shows_its_secret_once_and_stores_only_its_hash(admin_client, setup: Setup):
    response = _add_token(admin_client, setup)

    assert response.status_code == 200
    content = response.content.decode()
    secrets_shown = SECRET_IN_PAGE.findall(content)
    assert len(secrets_shown) == 1, content
    secret = secrets_shown[0]
    token = ApiToken.objects.get(team=setup.team, name="from-admin")
    assert token.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert token.prefix == secret[: len(token.prefix)]
    assert list(token.groups.all()) == [setup.group]
    assert live_token(secret) == token

    change_page = admin_client.get(reverse("admin:core_apitoken_change", args=[token.pk]))
    changelist = admin_client.get(reverse("admin:core_apitoken_changelist"))
    for page in (change_page, changelist):
        assert page.status_code == 200
        assert secret not in page.content.decode()
        assert secret[len(token.prefix) :] not in page.content.decode()


def test_editing_a_token_in_the_admin_keeps_its_secret(admin_client, setup: Setup):
    secret = SECRET_IN_PAGE.findall(_add_token(admin_client, setup).content.decode())[0]
    token = ApiToken.objects.get(name="from-admin")

    response = admin_client.post(
        reverse("admin:core_apitoken_change", args=[token.pk]),
        {
            "team": setup.team.pk,
            "name": "renamed",
            "expires_at_0": "",
            "expires_at_1": "",
            "revoked_at_0": "",
            "revoked_at_1": "",
            "credit_period": "total",  # the form's preselected default
        },
    )

    assert response.status_code == 302
    assert "km_" not in response.content.decode()
    token.refresh_from_db()
    assert token.name == "renamed"
    assert live_token(secret) == token


def test_adding_a_vault_secret_stores_it_encrypted_and_never_renders_it(admin_client, setup: Setup):
    value = "crm-secret-typed-into-the-admin"

    response = admin_client.post(
        reverse("admin:core_vaultsecret_add"),
        {"team": setup.team.pk, "name": "crm-key", "description": "CRM API key", "value": value},
    )

    assert response.status_code == 302
    secret = VaultSecret.objects.get(team=setup.team, name="crm-key")
    assert value.encode() not in bytes(secret.ciphertext)
    assert secret_value(secret) == value
    assert secret.description == "CRM API key"
    for url in (
        reverse("admin:core_vaultsecret_change", args=[secret.pk]),
        reverse("admin:core_vaultsecret_changelist"),
    ):
        page = admin_client.get(url)
        assert page.status_code == 200
        assert value not in page.content.decode()
        assert UPSTREAM_API_KEY not in page.content.decode()


def test_a_new_vault_secret_needs_a_value(admin_client, setup: Setup):
    response = admin_client.post(
        reverse("admin:core_vaultsecret_add"), {"team": setup.team.pk, "name": "empty-key", "value": ""}
    )

    assert response.status_code == 200
    assert "A new secret needs a value." in response.content.decode()
    assert not VaultSecret.objects.filter(name="empty-key").exists()


def test_editing_a_vault_secret_without_a_value_keeps_it(admin_client, setup: Setup):
    secret = setup.brain.api_key_secret
    ciphertext = bytes(secret.ciphertext)

    response = admin_client.post(
        reverse("admin:core_vaultsecret_change", args=[secret.pk]),
        {"team": setup.team.pk, "name": secret.name, "description": "now described", "value": ""},
    )

    assert response.status_code == 302
    secret.refresh_from_db()
    assert bytes(secret.ciphertext) == ciphertext
    assert secret.description == "now described"
    assert secret_value(secret) == UPSTREAM_API_KEY


def test_a_new_value_in_the_admin_rotates_the_secret_in_place(admin_client, setup: Setup):
    secret = secret_set(team=setup.team, name="crm-key", value="old-value")

    response = admin_client.post(
        reverse("admin:core_vaultsecret_change", args=[secret.pk]),
        {"team": setup.team.pk, "name": "crm-key", "description": "", "value": "new-value"},
    )

    assert response.status_code == 302
    assert VaultSecret.objects.filter(team=setup.team, name="crm-key").count() == 1
    secret.refresh_from_db()
    assert secret_value(secret) == "new-value"
    assert secret.rotated_at is not None


def test_ledger_admin_refuses_adding_entries(admin_client, setup: Setup):
    response = admin_client.get(reverse("admin:billing_ledgerentry_add"))

    assert response.status_code == 403


def test_ledger_admin_refuses_editing_and_deleting_entries(admin_client, setup: Setup):
    entry = LedgerEntry.objects.filter(team=setup.team).first()

    edit = admin_client.post(
        reverse("admin:billing_ledgerentry_change", args=[entry.pk]),
        {"team": setup.team.pk, "kind": "grant", "amount": 999999, "balance_after": 999999, "held_after": 0},
    )
    delete = admin_client.post(reverse("admin:billing_ledgerentry_delete", args=[entry.pk]), {"post": "yes"})

    assert edit.status_code == 403
    assert delete.status_code == 403
    entry.refresh_from_db()
    assert (entry.amount, entry.balance_after) == (1000, 1000)


def test_credit_account_admin_refuses_adding_and_editing(admin_client, setup: Setup):
    account = CreditAccount.objects.get(team=setup.team)

    add = admin_client.get(reverse("admin:billing_creditaccount_add"))
    edit = admin_client.post(
        reverse("admin:billing_creditaccount_change", args=[account.pk]), {"balance": 10**9, "held": 0}
    )

    assert (add.status_code, edit.status_code) == (403, 403)
    account.refresh_from_db()
    assert account.balance == 1000


def test_the_admin_lists_webhook_deliveries_with_their_last_error(admin_client, setup: Setup):
    WebhookDelivery.objects.create(
        id="evt_admin_1",
        event_type="approval.created",
        url="https://hooks.example/k",
        body="{}",
        label="acme/support",
        status=WebhookDelivery.Status.FAILED,
        attempts=4,
        last_error="HTTP 502",
        next_attempt_at=timezone.now(),
    )

    response = admin_client.get(reverse("admin:core_webhookdelivery_changelist"))

    assert response.status_code == 200
    page = response.content.decode()
    assert "evt_admin_1" in page and "HTTP 502" in page and "acme/support" in page
    assert admin_client.get(reverse("admin:core_webhookdelivery_add")).status_code == 403
