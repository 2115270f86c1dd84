"""API tokens: `km_` + 43 url-safe characters (256 random bits). The first characters are a lookup
prefix kept in clear; the whole token is stored as a SHA-256 hash and compared in constant time."""

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from chat.selectors import team_get
from chat.services.config_cache import cached, keep, version_check
from core.callers import Caller
from core.errors import AuthenticationError
from core.models import ApiToken, Group, Team, Tool
from core.sql import sql_instances, table

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
    credit_limit: int | None = None,
    credit_period: str = ApiToken.CreditPeriod.TOTAL,
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
        credit_limit=credit_limit,
        credit_period=credit_period,
    )
    token.groups.set(groups)
    token.tools.set(tools)
    return token, raw


def token_expiry(seconds: int | None) -> datetime | None:
    return timezone.now() + timedelta(seconds=seconds) if seconds else None


def token_revoke(*, token: ApiToken) -> bool:
    """Revoke at once; returns False when it was already revoked."""
    return bool(ApiToken.objects.filter(pk=token.pk, revoked_at=None).update(revoked_at=timezone.now()))


INVALID_TOKEN_MESSAGE = "Invalid, expired or revoked API token."


# --- Who calls: the one rule for every API request (chat.api, chat.authentication) ---------------------------


def token_authenticate(raw: str) -> Caller | None:
    """The caller of a bearer secret, or None when it is not a live token. Checks the configuration version
    first (one query; a revocation changes it) and reads the token only when this worker does not keep it
    at that version. In a database thread."""
    if not raw.startswith(TOKEN_PREFIX) or len(raw) < LOOKUP_PREFIX_LENGTH + 8:
        return None
    version = version_check()
    key = ("token", raw[:LOOKUP_PREFIX_LENGTH])
    entry = cached(key)
    if entry is None:
        token = _token_read(raw[:LOOKUP_PREFIX_LENGTH], version)
        if token is None:
            return None
        keep(key, token, version=version)
    else:
        token = entry[1]
    return Caller(token.team, version, token=token) if _token_usable(token, raw) else None


def token_recent(raw: str) -> Caller | None:
    """The unconfirmed caller of a bearer secret from what this worker keeps, with no query (callable on the
    event loop), or None ("authenticate it"). Only for a request whose write checks its version (a
    completion's start: core.config_version.config_guard), so a revocation still applies at once."""
    entry = cached(("token", raw[:LOOKUP_PREFIX_LENGTH]))
    if entry is None or not _token_usable(entry[1], raw):
        return None
    return Caller(entry[1].team, entry[0], token=entry[1], confirmed=False)


def token_reload(*, token: ApiToken) -> Caller:
    """The caller as the database has it now, after the configuration changed under a request that had it;
    AuthenticationError when its token was revoked, expired or deleted meanwhile."""
    version = version_check()
    fresh = _token_read(token.prefix, version)
    if fresh is None or fresh.pk != token.pk or not _token_live(fresh):
        raise AuthenticationError(INVALID_TOKEN_MESSAGE)
    keep(("token", token.prefix), fresh, version=version)
    return Caller(fresh.team, version, token=fresh)


def token_error_first(*, raw: str, error: Exception) -> Exception:
    """The error to answer a request that failed before its run started, when its token came from
    token_recent: a token revoked or expired meanwhile gets its 401, whatever else was wrong, so a dead
    token never learns anything else. In a database thread."""
    if isinstance(error, AuthenticationError) or token_authenticate(raw) is not None:
        return error
    return AuthenticationError(INVALID_TOKEN_MESSAGE)


def _token_usable(token: ApiToken, raw: str) -> bool:
    return hmac.compare_digest(token.secret_hash, token_hash(raw)) and _token_live(token)


def _token_live(token: ApiToken) -> bool:
    return token.revoked_at is None and (token.expires_at is None or token.expires_at > timezone.now())


def _token_read(prefix: str, version: int) -> ApiToken | None:
    """The token of a lookup prefix with its team (kept at `version`), by one written-out statement (the
    ORM's compiler cost more than the read: README, Benchmarks)."""
    columns = ", ".join(f.column for f in ApiToken._meta.concrete_fields)
    found = sql_instances(ApiToken, f"SELECT {columns} FROM {table(ApiToken)} WHERE prefix = %s", [prefix])
    if not found:
        return None
    token = found[0]
    token.team = team_get(team_id=token.team_id, version=version)
    return token
