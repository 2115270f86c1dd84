"""The vault: team secrets encrypted with Fernet keys from KITEMESH_VAULT_KEY (comma-separated, newest
first, so a key rotation can still read older values)."""

from functools import cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.utils import timezone

from chat.models import Team, VaultSecret


@cache
def _fernet() -> MultiFernet:
    keys = [k.strip() for k in settings.KITEMESH_VAULT_KEY.split(",") if k.strip()]
    try:
        return MultiFernet([Fernet(k) for k in keys])
    except (ValueError, TypeError) as exc:
        raise ImproperlyConfigured(
            "KITEMESH_VAULT_KEY must be one or more comma-separated Fernet keys (32 url-safe base64 bytes); "
            'make one with: python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
        ) from exc


def vault_key_check() -> None:
    """Fail at start-up, not at the first secret, when the key is malformed."""
    _fernet()


def vault_encrypt(value: str) -> bytes:
    return _fernet().encrypt(value.encode())


def vault_decrypt(secret: VaultSecret) -> str:
    try:
        return _fernet().decrypt(bytes(secret.ciphertext)).decode()
    except InvalidToken as exc:
        # Never include the ciphertext or the key in the message.
        raise ImproperlyConfigured(f"Vault secret {secret.name!r} cannot be decrypted with KITEMESH_VAULT_KEY") from exc


@transaction.atomic
def secret_set(*, team: Team, name: str, value: str, description: str | None = None) -> VaultSecret:
    """Create the secret, or update it in place (same row, so models and tools keep pointing at it):
    a new value is a rotation; the same value is not re-encrypted; description None keeps it."""
    secret, created = VaultSecret.objects.select_for_update().get_or_create(
        team=team, name=name, defaults={"ciphertext": vault_encrypt(value), "description": description or ""}
    )
    if created:
        return secret
    changed = []
    if vault_decrypt(secret) != value:
        secret.ciphertext, secret.rotated_at = vault_encrypt(value), timezone.now()
        changed += ["ciphertext", "rotated_at"]
    if description is not None and secret.description != description:
        secret.description = description
        changed.append("description")
    if changed:
        secret.save(update_fields=changed)
    return secret
