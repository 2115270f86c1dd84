"""Signed webhook deliveries, for every event KiteMesh sends a receiver (approval events, credit alerts): each
event is recorded (WebhookDelivery) in the transaction of the change it announces, signed with a vault secret
(`X-KiteMesh-Signature: sha256=<HMAC-SHA256 of the raw body>`), and delivered by the worker (the
webhook_deliver task): retried with backoff, across restarts of any process, with the same event id and body
on every attempt, through the SSRF guard and the pinned send. No request ever waits on a receiver."""

import asyncio
import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from datetime import timedelta

import httpx
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.utils import timezone
from django_tasks import task

from core.models import VaultSecret, WebhookDelivery
from core.pinned_http import pinned_send
from core.ssrf import DestinationBlocked, IPAddress, destination_check
from core.vault import secret_value

logger = logging.getLogger(__name__)

USER_AGENT = "KiteMesh-Webhook/1"
SIGNATURE_HEADER = "X-KiteMesh-Signature"
EVENT_HEADER = "X-KiteMesh-Event"
DELIVERY_HEADER = "X-KiteMesh-Delivery"
_RETRY_STATUSES = {408, 425, 429}


def _timeout() -> timedelta:
    """How long an attempt may take, from its DNS lookup to the receiver's answer."""
    return timedelta(seconds=settings.KITEMESH_WEBHOOK_TIMEOUT_SECONDS)


def webhook_signature(secret: str, body: bytes) -> str:
    """What a receiver recomputes over the raw body it got (compare with hmac.compare_digest)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signing_secret(secret: VaultSecret | None, team_id: int) -> VaultSecret | None:
    """`secret` when it is the team's own and can be decrypted."""
    if secret is None or secret.team_id != team_id:
        return None
    try:
        secret_value(secret)
    except ImproperlyConfigured:
        return None
    return secret


def webhook_record(*, payload: dict, url: str, secret: VaultSecret, label: str) -> WebhookDelivery:
    """Record the event (`payload`, with its `id` and `type`) for the receiver at `url` and queue its
    delivery: a rolled-back change sends nothing, a committed one is delivered even if this process dies
    right after. Runs inside the caller's transaction."""
    delivery = WebhookDelivery.objects.create(
        id=payload["id"],
        event_type=payload["type"],
        url=url,
        body=json.dumps(payload, separators=(",", ":")),
        secret=secret,
        label=label,
        next_attempt_at=timezone.now(),
    )
    webhook_deliver.enqueue(delivery.id)
    return delivery


# --- Delivery, in the worker -------------------------------------------------------------------------


def webhook_attempt(*, delivery_id: str) -> str:
    """One attempt at a pending delivery that is due (else nothing): POST it, then record the outcome —
    delivered, failed (refused, or out of attempts: logged, without secrets) or retried later with
    backoff (its next attempt queued). Returns the delivery's status."""
    delivery = _claim(delivery_id)
    if delivery is None:
        return "not due"
    body = delivery.body.encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_HEADER: delivery.event_type,
        DELIVERY_HEADER: delivery.id,
    }
    if delivery.secret is None:
        outcome = _Outcome(ok=False, retry=False, detail="its signing secret was deleted")
    else:
        headers[SIGNATURE_HEADER] = webhook_signature(secret_value(delivery.secret), body)
        outcome = asyncio.run(_attempt(delivery.url, body, headers))
    return _outcome_record(delivery, outcome)


def _claim(delivery_id: str) -> WebhookDelivery | None:
    """Take a pending, due delivery for one attempt: its next attempt moves past this one's end (twice its
    timeout), so no other worker sends it meanwhile (a duplicated task finds it not due); a worker that
    dies mid-attempt leaves it due again then."""
    now = timezone.now()
    held_until = now + 2 * _timeout()
    claimed = WebhookDelivery.objects.filter(
        pk=delivery_id, status=WebhookDelivery.Status.PENDING, next_attempt_at__lte=now
    ).update(next_attempt_at=held_until)
    return WebhookDelivery.objects.select_related("secret").get(pk=delivery_id) if claimed else None


@task()
def webhook_deliver(delivery_id: str) -> str:
    """The worker's job for a delivery: one attempt (webhook_attempt)."""
    return webhook_attempt(delivery_id=delivery_id)


@transaction.atomic
def _outcome_record(delivery: WebhookDelivery, outcome: "_Outcome") -> str:
    delivery.attempts += 1
    delivery.last_error = "" if outcome.ok else outcome.detail[:500]
    if outcome.ok:
        delivery.status, delivery.delivered_at = WebhookDelivery.Status.DELIVERED, timezone.now()
        logger.info("webhook %s %s delivered to %s", delivery.event_type, delivery.id, _host(delivery.url))
    elif outcome.retry and delivery.attempts < max(1, settings.KITEMESH_WEBHOOK_ATTEMPTS):
        backoff = settings.KITEMESH_WEBHOOK_BACKOFF_SECONDS * 2 ** (delivery.attempts - 1)
        delivery.next_attempt_at = timezone.now() + timedelta(seconds=backoff)
        webhook_deliver.using(run_after=delivery.next_attempt_at).enqueue(delivery.id)
    else:
        delivery.status = WebhookDelivery.Status.FAILED
        logger.warning(
            "webhook %s %s for %s not delivered to %s after %d attempt(s): %s",
            delivery.event_type,
            delivery.id,
            delivery.label,
            _host(delivery.url),
            delivery.attempts,
            outcome.detail,
        )
    delivery.save(update_fields=["attempts", "last_error", "status", "delivered_at", "next_attempt_at"])
    return delivery.status


def webhook_deliveries_requeue() -> int:
    """Queue again the deliveries a dead worker left pending: due for longer than an attempt takes (their
    own task would have run). The sweep's part in delivering at least once. How many were queued."""
    stuck = WebhookDelivery.objects.filter(
        status=WebhookDelivery.Status.PENDING, next_attempt_at__lt=timezone.now() - _timeout()
    ).values_list("pk", flat=True)
    queued = 0
    for delivery_id in stuck.iterator():
        webhook_deliver.enqueue(delivery_id)
        queued += 1
    return queued


def _host(url: str) -> str:
    # Logs name the host only: a URL's path or query can carry the receiver's own token.
    return httpx.URL(url).host


@dataclass
class _Outcome:
    ok: bool
    retry: bool
    detail: str


async def _attempt(url: str, body: bytes, headers: dict[str, str]) -> _Outcome:
    try:
        async with asyncio.timeout(_timeout().total_seconds()):
            addresses = await destination_check(url)
            status = await _post_pinned(url, body, headers, addresses)
    except DestinationBlocked as exc:
        return _Outcome(ok=False, retry=False, detail=f"blocked destination: {exc}")
    except (TimeoutError, httpx.TimeoutException):
        return _Outcome(ok=False, retry=True, detail="timed out")
    except httpx.HTTPError as exc:
        # Only the kind of failure: some messages quote request headers, and those carry the signature.
        return _Outcome(ok=False, retry=True, detail=f"request failed ({type(exc).__name__})")
    if 200 <= status < 300:
        return _Outcome(ok=True, retry=False, detail=f"HTTP {status}")
    return _Outcome(ok=False, retry=status >= 500 or status in _RETRY_STATUSES, detail=f"HTTP {status}")


async def _post_pinned(url: str, body: bytes, headers: dict[str, str], addresses: list[IPAddress]) -> int:
    """POST to the checked addresses (core.pinned_http); the status is the answer, the body is not read."""
    # No proxies or .netrc from the environment, no redirects: the checked address is the only one reached.
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False) as client:
        response = await pinned_send(
            client,
            "POST",
            httpx.URL(url),
            addresses,
            headers=headers,
            content=body,
            timeout=settings.KITEMESH_WEBHOOK_TIMEOUT_SECONDS,
        )
        await response.aclose()
        return response.status_code
