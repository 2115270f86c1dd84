"""API tokens: `km_` + 43 url-safe characters (256 random bits). The first characters are a lookup
prefix kept in clear; the whole token is stored as a SHA-256 hash and compared in constant time."""

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from chat.models import ApiToken, Group, Team, Tool
from chat.selectors import team_get

TOKEN_PREFIX = "km_"
LOOKUP_PREFIX_LENGTH = 12  # "km_" + 9 random characters: unique enough to find the row, useless to guess


def token_hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def token_secret_new() -> tuple[str, str, str]:
    """A new token: (the secret shown once, its lookup prefix, its hash)."""
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return raw, raw[:LOOKUP_PREFIX_LENGTH], token_hash(raw)


@transaction.atomic
def token_create(
    *,
    team: Team,
    name: str,
    groups: Iterable[Group] = (),
    tools: Iterable[Tool] = (),
    expires_at: datetime | None = None,
    requests_per_minute: int | None = None,
    concurrent_streams: int | None = None,
) -> tuple[ApiToken, str]:
    """Create a token and return it with its secret, which is never recoverable afterwards."""
    raw, prefix, secret_hash = token_secret_new()
    token = ApiToken.objects.create(
        team=team,
        name=name,
        prefix=prefix,
        secret_hash=secret_hash,
        expires_at=expires_at,
        requests_per_minute=requests_per_minute,
        concurrent_streams=concurrent_streams,
    )
    token.groups.set(groups)
    token.tools.set(tools)
    return token, raw


def token_expiry(seconds: int | None) -> datetime | None:
    return timezone.now() + timedelta(seconds=seconds) if seconds else None


def token_revoke(*, token: ApiToken) -> bool:
    """Revoke at once; returns False when it was already revoked."""
    return bool(ApiToken.objects.filter(pk=token.pk, revoked_at=None).update(revoked_at=timezone.now()))


def token_authenticate(raw: str) -> ApiToken | None:
    """The live token for a bearer secret (with its team), or None."""
    if not raw.startswith(TOKEN_PREFIX) or len(raw) < LOOKUP_PREFIX_LENGTH + 8:
        return None
    # Every request reads its token (revocation and expiry apply at once), so the statement is written
    # out: the ORM's compiler costs five times the query here. The team comes from the config cache.
    rows = ApiToken.objects.raw("SELECT * FROM chat_apitoken WHERE prefix = %s", [raw[:LOOKUP_PREFIX_LENGTH]])
    token = next(iter(rows), None)
    if token is None or not hmac.compare_digest(token.secret_hash, token_hash(raw)):
        return None
    if token.revoked_at is not None or (token.expires_at is not None and token.expires_at <= timezone.now()):
        return None
    token.team = team_get(team_id=token.team_id)
    return token
