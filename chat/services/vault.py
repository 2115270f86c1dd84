"""The vault: team secrets, encrypted at rest with the vault key (core.vault), set and rotated in place."""

from django.db import transaction
from django.utils import timezone

from core.models import Team, VaultSecret
from core.vault import encrypt, secret_value


@transaction.atomic
def secret_set(*, team: Team, name: str, value: str, description: str | None = None) -> VaultSecret:
    """Create the secret, or update it in place (same row, so models and tools keep pointing at it):
    a new value is a rotation; the same value is not re-encrypted; description None keeps it."""
    secret, created = VaultSecret.objects.select_for_update().get_or_create(
        team=team, name=name, defaults={"ciphertext": encrypt(value), "description": description or ""}
    )
    if created:
        return secret
    changed = []
    if secret_value(secret) != value:
        secret.ciphertext, secret.rotated_at = encrypt(value), timezone.now()
        changed += ["ciphertext", "rotated_at"]
    if description is not None and secret.description != description:
        secret.description = description
        changed.append("description")
    if changed:
        secret.save(update_fields=changed)
    return secret
