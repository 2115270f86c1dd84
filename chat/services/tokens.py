"""API tokens: `km_` + 43 url-safe characters (256 random bits). The first characters are a lookup
prefix kept in clear; the whole token is stored as a SHA-256 hash and compared in constant time."""

import functools
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from chat.models import ApiToken, Group, Team, Tool
from chat.selectors import team_get
from kitemesh_site.sql import sql_rows

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


_tokens_built: dict[str, tuple[tuple, ApiToken]] = {}  # prefix → (its row, the token built from it)
_TOKENS_BUILT_MAX = 10_000


def token_authenticate(raw: str) -> ApiToken | None:
    """The live token for a bearer secret (with its team), or None."""
    if not raw.startswith(TOKEN_PREFIX) or len(raw) < LOOKUP_PREFIX_LENGTH + 8:
        return None
    token = _token_read(raw[:LOOKUP_PREFIX_LENGTH])
    if token is None or not hmac.compare_digest(token.secret_hash, token_hash(raw)):
        return None
    if token.revoked_at is not None or (token.expires_at is not None and token.expires_at <= timezone.now()):
        return None
    token.team = team_get(team_id=token.team_id)
    return token


@functools.cache
def _token_row_statement() -> str:
    """Every column of the token, as the database returns them (compared with the last read, not converted)."""
    columns = ", ".join(f.column for f in ApiToken._meta.concrete_fields)
    return f"SELECT {columns} FROM chat_apitoken WHERE prefix = %s"


def _token_read(prefix: str) -> ApiToken | None:
    """The token's row is read on every request (revocation and expiry apply at once), by one written-out
    statement; the ApiToken is built only when the row is new to this process or has changed, since
    building it costs more than the read (README, Benchmarks). Requests share it read-only."""
    rows = sql_rows(_token_row_statement(), [prefix])
    if not rows:
        return None
    built = _tokens_built.get(prefix)
    if built is not None and built[0] == rows[0]:
        return built[1]
    token = ApiToken.objects.filter(prefix=prefix).first()
    if token is not None:
        if len(_tokens_built) >= _TOKENS_BUILT_MAX:
            _tokens_built.clear()
        _tokens_built[prefix] = (rows[0], token)
    return token
