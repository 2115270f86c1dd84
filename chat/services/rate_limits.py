"""Rate limits per token (or per person, on /chat/) and per team: requests per minute (a fixed one-minute
window) and concurrent streams. Counted in Redis when REDIS_URL is set, so every worker shares them; in this
process otherwise."""

import time
from dataclasses import dataclass

from django.conf import settings

from chat.engine.clients import per_loop
from core.callers import Caller
from core.errors import RateLimited

STREAM_SLOT_TTL = 3600  # a worker that dies mid-stream frees its slots after this long (Redis only)


@dataclass(frozen=True)
class Limit:
    key: str  # "token:12", "user:5" or "team:3"
    requests_per_minute: int | None
    concurrent_streams: int | None


def limits_for(caller: Caller) -> list[Limit]:
    """The caller's own limits (its token's, or a person's from settings) and its team's: both apply;
    limits left empty are no limit."""
    team = caller.team
    if caller.token is not None:
        own = Limit(f"token:{caller.token.pk}", caller.token.requests_per_minute, caller.token.concurrent_streams)
    else:
        per_minute, streams = settings.KITEMESH_CHAT_REQUESTS_PER_MINUTE, settings.KITEMESH_CHAT_CONCURRENT_STREAMS
        own = Limit(f"user:{caller.user.pk}", per_minute, streams)
    return [own, Limit(f"team:{team.pk}", team.requests_per_minute, team.concurrent_streams)]


class _LocalCounters:
    """In-process counters (one event loop per worker, so no lock is needed between awaits)."""

    def __init__(self) -> None:
        self.windows: dict[str, tuple[int, int]] = {}  # key → (window start, count)
        self.streams: dict[str, int] = {}

    async def hit(self, key: str, window: int) -> int:
        start, count = self.windows.get(key, (window, 0))
        count = count + 1 if start == window else 1
        self.windows[key] = (window, count)
        return count

    async def stream_open(self, key: str) -> int:
        self.streams[key] = self.streams.get(key, 0) + 1
        return self.streams[key]

    async def stream_close(self, key: str) -> None:
        self.streams[key] = max(self.streams.get(key, 0) - 1, 0)

    async def close(self) -> None:
        pass


class _RedisCounters:
    def __init__(self, url: str) -> None:
        import redis.asyncio

        self.redis = redis.asyncio.Redis.from_url(url)

    async def hit(self, key: str, window: int) -> int:
        name = f"kitemesh:rpm:{key}:{window}"
        async with self.redis.pipeline(transaction=True) as pipe:
            count, _ = await pipe.incr(name).expire(name, 120).execute()
        return count

    async def stream_open(self, key: str) -> int:
        name = f"kitemesh:streams:{key}"
        async with self.redis.pipeline(transaction=True) as pipe:
            count, _ = await pipe.incr(name).expire(name, STREAM_SLOT_TTL).execute()
        return count

    async def stream_close(self, key: str) -> None:
        await self.redis.decr(f"kitemesh:streams:{key}")

    async def close(self) -> None:
        await self.redis.aclose()


def _counters_make() -> _LocalCounters | _RedisCounters:
    return _RedisCounters(settings.REDIS_URL) if settings.REDIS_URL else _LocalCounters()


_counters = per_loop(_counters_make, close=lambda counters: counters.close())


async def request_admit(*, caller: Caller) -> None:
    """Count one request against every requests-per-minute limit; 429 with Retry-After when over."""
    now = time.time()
    window = int(now // 60)
    for limit in limits_for(caller):
        if limit.requests_per_minute is None:
            continue
        if await _counters().hit(limit.key, window) > limit.requests_per_minute:
            raise RateLimited(
                f"Rate limit of {limit.requests_per_minute} requests per minute reached for this "
                f"{limit.key.split(':')[0]}.",
                retry_after=max(int((window + 1) * 60 - now), 1),
            )


async def stream_admit(*, caller: Caller) -> list[str]:
    """Take a stream slot under every concurrent-streams limit (429 when one is full); returns the keys
    to release with stream_release when the stream ends."""
    taken: list[str] = []
    for limit in limits_for(caller):
        if limit.concurrent_streams is None:
            continue
        taken.append(limit.key)
        if await _counters().stream_open(limit.key) > limit.concurrent_streams:
            await stream_release(taken)
            raise RateLimited(
                f"Too many open streams ({limit.concurrent_streams} allowed) for this {limit.key.split(':')[0]}.",
                retry_after=1,
            )
    return taken


async def stream_release(keys: list[str]) -> None:
    for key in keys:
        await _counters().stream_close(key)


class Admitted:
    """Rate limits for one request (`async with Admitted(caller, stream) as slots`): counts it, takes
    stream slots, and gives them back if the request ends before its stream starts (the stream releases
    them itself once it runs)."""

    def __init__(self, caller: Caller, stream: bool) -> None:
        self.caller, self.stream, self.slots = caller, stream, []

    async def __aenter__(self) -> list[str]:
        await request_admit(caller=self.caller)
        if self.stream:
            self.slots = await stream_admit(caller=self.caller)
        return self.slots

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            await stream_release(self.slots)
