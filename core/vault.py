"""The vault key: Fernet keys from KITEMESH_VAULT_KEY (comma-separated, newest first, so a key rotation
can still read older values). Encrypts team secrets (chat's vault) and what runs keep at rest
(core.fields)."""

from functools import cache
from typing import TYPE_CHECKING

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from core.models import VaultSecret


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


def encrypt(text: str) -> bytes:
    return _fernet().encrypt(text.encode())


def decrypt(token: bytes, *, what: str) -> str:
    """The clear text of `token`; ImproperlyConfigured naming `what` (never the token or the key) when no
    key of KITEMESH_VAULT_KEY opens it."""
    try:
        return _fernet().decrypt(token).decode()
    except InvalidToken as exc:
        raise ImproperlyConfigured(f"{what} cannot be decrypted with KITEMESH_VAULT_KEY") from exc


def secret_value(secret: "VaultSecret") -> str:
    """A team's vault secret in clear, for the upstream or tool that needs it: never logged, never returned."""
    return decrypt(bytes(secret.ciphertext), what=f"Vault secret {secret.name!r}")
