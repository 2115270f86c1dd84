"""The configuration a worker keeps between requests — tokens, teams, what a token may run of a group —
all read at one configuration version (core.config_version), and kept while that version is current, so
no write, however it is made (QuerySet.update(), another process), is served stale. Code in a database
thread calls `version_check()` before it reads here; the completion path, on the event loop, reads without
a query and lets the write that starts its run check the version (core.config_version.config_guard)."""

from core.config_version import config_version

_MAX_ENTRIES = 10_000
_entries: dict[tuple, tuple[int, object]] = {}  # key → (the version it was read at, the value)
_version: int | None = None


def cached(key: tuple) -> tuple[int, object] | None:
    """(The version it was read at, the value) kept for `key`, or None (no query). Database threads may
    refill the cache meanwhile: a caller that checks the version later checks the one that came with it."""
    return _entries.get(key)


def keep(key: tuple, value: object, *, version: int) -> None:
    """Keep `value`, read at `version` (or later); values kept at another version are dropped."""
    global _version
    if version != _version:
        _entries.clear()
        _version = version
    if len(_entries) >= _MAX_ENTRIES:
        _entries.clear()
    _entries[key] = (version, value)


def version_check() -> int:
    """Read the configuration's version (one query) and drop what was kept at another; the version."""
    version = config_version()
    if version != _version:
        config_cache_clear()
    return version


def config_cache_clear() -> None:
    global _version
    _entries.clear()
    _version = None
