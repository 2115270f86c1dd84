"""The vault (SPEC §1): secrets encrypted at rest, rotated in place, protected while used, and a
KITEMESH_VAULT_KEY that must be valid (and present in production)."""

import os
import subprocess
import sys

import pytest
from cryptography.fernet import Fernet
from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.db.models import ProtectedError

from chat.services.vault import secret_set
from core import vault
from core.models import CustomModel, Team, Tool, VaultSecret
from core.vault import secret_value, vault_key_check

PLAINTEXT = "sk-live-plaintext-value-1234567890"


@pytest.fixture
def team(db) -> Team:
    return Team.objects.create(name="acme")


@pytest.fixture
def vault_settings(settings):
    """Settings whose KITEMESH_VAULT_KEY a test may change; the cached Fernet follows them."""
    vault._fernet.cache_clear()
    yield settings
    vault._fernet.cache_clear()


def use_vault_key(settings, key: str) -> None:
    settings.KITEMESH_VAULT_KEY = key
    vault._fernet.cache_clear()


def test_ciphertext_at_rest_never_contains_the_plaintext(team: Team):
    secret = secret_set(team=team, name="crm-key", value=PLAINTEXT)

    stored = bytes(VaultSecret.objects.get(pk=secret.pk).ciphertext)

    assert PLAINTEXT.encode() not in stored
    assert PLAINTEXT[:12].encode() not in stored
    assert secret_value(VaultSecret.objects.get(pk=secret.pk)) == PLAINTEXT


def test_same_value_twice_gives_different_ciphertexts(team: Team):
    one = secret_set(team=team, name="one", value=PLAINTEXT)
    two = secret_set(team=team, name="two", value=PLAINTEXT)

    assert bytes(one.ciphertext) != bytes(two.ciphertext)


def test_rotating_keeps_the_row_and_changes_the_value(team: Team):
    secret = secret_set(team=team, name="crm-key", value=PLAINTEXT, description="CRM")
    model = CustomModel.objects.create(
        team=team, name="brain", base_url="http://127.0.0.1:1/v1", model="m", api_key_secret=secret
    )
    old_ciphertext = bytes(secret.ciphertext)

    rotated = secret_set(team=team, name="crm-key", value="sk-rotated")

    assert rotated.pk == secret.pk
    assert VaultSecret.objects.filter(team=team).count() == 1
    stored = VaultSecret.objects.get(pk=secret.pk)
    assert bytes(stored.ciphertext) != old_ciphertext
    assert secret_value(stored) == "sk-rotated"
    assert stored.rotated_at is not None
    assert stored.description == "CRM"
    model.refresh_from_db()
    assert secret_value(model.api_key_secret) == "sk-rotated"


def test_setting_the_same_value_again_does_not_re_encrypt(team: Team):
    secret = secret_set(team=team, name="crm-key", value=PLAINTEXT)

    again = secret_set(team=team, name="crm-key", value=PLAINTEXT)

    assert bytes(again.ciphertext) == bytes(secret.ciphertext)
    assert VaultSecret.objects.get(pk=secret.pk).rotated_at is None


def test_deleting_a_secret_used_by_a_model_is_refused(team: Team):
    secret = secret_set(team=team, name="upstream-key", value=PLAINTEXT)
    CustomModel.objects.create(
        team=team, name="brain", base_url="http://127.0.0.1:1/v1", model="m", api_key_secret=secret
    )

    with pytest.raises(ProtectedError):
        secret.delete()

    assert VaultSecret.objects.filter(pk=secret.pk).exists()


def test_deleting_a_secret_used_by_a_tool_is_refused(team: Team):
    secret = secret_set(team=team, name="crm-key", value=PLAINTEXT)
    Tool.objects.create(team=team, name="t", url="https://crm.example/t", auth_type="bearer", auth_secret=secret)

    with pytest.raises(ProtectedError):
        VaultSecret.objects.filter(pk=secret.pk).delete()

    assert VaultSecret.objects.filter(pk=secret.pk).exists()


def test_deleting_an_unused_secret_is_allowed(team: Team):
    secret = secret_set(team=team, name="spare", value=PLAINTEXT)

    secret.delete()

    assert not VaultSecret.objects.filter(name="spare").exists()


@pytest.mark.parametrize(
    "bad_key",
    [
        pytest.param("not-a-fernet-key", id="garbage"),
        pytest.param("", id="empty"),
        pytest.param(" , ", id="only-commas"),
        pytest.param(Fernet.generate_key().decode() + ",short", id="one-good-one-bad"),
    ],
)
def test_malformed_vault_key_is_an_improperly_configured_naming_the_setting(vault_settings, bad_key: str):
    use_vault_key(vault_settings, bad_key)

    with pytest.raises(ImproperlyConfigured, match="KITEMESH_VAULT_KEY"):
        vault_key_check()


def test_malformed_vault_key_message_does_not_echo_the_key(vault_settings):
    use_vault_key(vault_settings, "my-very-private-but-broken-key")

    with pytest.raises(ImproperlyConfigured) as excinfo:
        vault_key_check()

    assert "my-very-private-but-broken-key" not in str(excinfo.value)


def test_key_rotation_still_decrypts_values_under_the_old_key(vault_settings, team: Team):
    key_a, key_b = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    use_vault_key(vault_settings, key_a)
    secret = secret_set(team=team, name="crm-key", value=PLAINTEXT)

    use_vault_key(vault_settings, f"{key_b},{key_a}")

    assert secret_value(VaultSecret.objects.get(pk=secret.pk)) == PLAINTEXT
    rotated = secret_set(team=team, name="crm-key", value="sk-new")
    assert Fernet(key_b).decrypt(bytes(rotated.ciphertext)) == b"sk-new", "new values use the newest key"


def test_value_under_an_unknown_key_fails_without_leaking_it(vault_settings, team: Team):
    use_vault_key(vault_settings, Fernet.generate_key().decode())
    secret = secret_set(team=team, name="crm-key", value=PLAINTEXT)
    use_vault_key(vault_settings, Fernet.generate_key().decode())

    with pytest.raises(ImproperlyConfigured) as excinfo:
        secret_value(VaultSecret.objects.get(pk=secret.pk))

    assert "crm-key" in str(excinfo.value)
    assert PLAINTEXT not in str(excinfo.value)


def _django_setup_in_production(extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KITEMESH_VAULT_KEY"}
    env.update(DJANGO_SECRET_KEY="prod-secret-key-for-the-test", DJANGO_ALLOWED_HOSTS="kitemesh.example", **extra_env)
    code = "import django, os; os.environ['DJANGO_SETTINGS_MODULE']='kitemesh_site.settings.production'; django.setup()"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=django_settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_production_settings_refuse_to_start_without_a_vault_key():
    result = _django_setup_in_production({})

    assert result.returncode != 0
    assert "KITEMESH_VAULT_KEY" in result.stderr


def test_production_settings_refuse_to_start_with_a_malformed_vault_key():
    result = _django_setup_in_production({"KITEMESH_VAULT_KEY": "not-a-fernet-key"})

    assert result.returncode != 0
    assert "KITEMESH_VAULT_KEY" in result.stderr
    assert "not-a-fernet-key" not in result.stderr


def test_production_settings_start_with_a_valid_vault_key():
    result = _django_setup_in_production({"KITEMESH_VAULT_KEY": Fernet.generate_key().decode()})

    assert result.returncode == 0, result.stderr
