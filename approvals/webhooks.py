"""Approval webhooks: when a group has a `webhook_url`, each approval event is POSTed there as JSON, signed
with the group's vault secret (`X-KiteMesh-Signature: sha256=<HMAC-SHA256 of the raw body>`), retried with
backoff, through the tools' SSRF guard, from a background thread: no request ever waits on a receiver."""

import asyncio
import atexit
import concurrent.futures
import hashlib
import hmac
import json
import logging
import secrets
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import httpx
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from approvals.models import Approval
from chat.engine.ssrf import DestinationBlocked, IPAddress, destination_check, literal_address
from chat.models import Group, ToolExecution
from chat.services.vault import vault_decrypt
from chat.wire import iso

logger = logging.getLogger(__name__)

USER_AGENT = "KiteMesh-Webhook/1"
SIGNATURE_HEADER = "X-KiteMesh-Signature"
EVENT_HEADER = "X-KiteMesh-Event"
DELIVERY_HEADER = "X-KiteMesh-Delivery"
_RETRY_STATUSES = {408, 425, 429}


def webhook_signature(secret: str, body: bytes) -> str:
    """What a receiver recomputes over the raw body it got (compare with hmac.compare_digest)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def webhook_payload(*, event_type: str, approval: Approval, tool_executions: list[ToolExecution]) -> dict:
    """Ids and labels only: never arguments, reasons or anything else a receiver could leak."""
    return {
        "id": "evt_" + secrets.token_hex(12),
        "type": event_type,
        "created_at": iso(timezone.now()),
        "approval_id": str(approval.id),
        "execution_id": str(approval.execution_id),
        "status": approval.status,
        "expires_at": iso(approval.expires_at),
        "team": approval.team.name,
        "group": {"id": str(approval.group_id), "name": approval.group.name, "model": approval.group.model_id},
        "tool_executions": [
            {
                "id": str(te.id),
                "tool": te.tool_name,
                "risk": te.risk,
                "decision": te.decision,
                "decided_via": te.decided_via or None,
                "decided_by": te.decided_by or None,
                "decided_at": iso(te.decided_at),
            }
            for te in tool_executions
        ],
    }


@dataclass(frozen=True)
class Delivery:
    url: str
    body: bytes
    headers: dict[str, str]
    event_id: str
    event_type: str
    group: str  # "team/group" for logs

    @property
    def host(self) -> str:
        # Logs name the host only: a URL's path or query can carry the receiver's own token.
        return httpx.URL(self.url).host


def _signing_secret(group: Group) -> str | None:
    secret = group.webhook_secret
    if secret is None or secret.team_id != group.team_id:
        return None
    try:
        return vault_decrypt(secret)
    except ImproperlyConfigured:
        return None


def approval_webhook_send(*, approval_id: uuid.UUID, event_type: str) -> Future | None:
    """Build the event from what was committed and queue its delivery. Runs from transaction.on_commit,
    on the request's thread: a few quick queries here, every network wait in the background."""
    approval = Approval.objects.select_related("group", "group__webhook_secret", "team").filter(pk=approval_id).first()
    if approval is None or not approval.group.webhook_url:
        return None
    label = f"{approval.team.name}/{approval.group.name}"
    secret = _signing_secret(approval.group)
    if secret is None:
        logger.warning("webhook %s for group %s not sent: the group has no usable webhook_secret", event_type, label)
        return None
    calls = list(approval.tool_executions.filter(requires_approval=True).order_by("position"))
    payload = webhook_payload(event_type=event_type, approval=approval, tool_executions=calls)
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_HEADER: event_type,
        DELIVERY_HEADER: payload["id"],
        SIGNATURE_HEADER: webhook_signature(secret, body),
    }
    delivery = Delivery(approval.group.webhook_url, body, headers, payload["id"], event_type, label)
    return _sender.submit(delivery)


# --- Delivery, in the background ------------------------------------------------------------------


class _Sender:
    """A daemon thread running its own event loop, started on first use: deliveries and their backoff
    sleeps wait there, concurrently, so a slow or dead receiver delays nothing else. At exit, the process
    gives deliveries still under way a short while (a command like expire_approvals ends right after)."""

    drain_seconds = 10.0

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._pending: set[Future] = set()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="kitemesh-webhooks", daemon=True).start()
                atexit.register(self.drain)
            return self._loop

    def submit(self, delivery: Delivery) -> Future:
        future = asyncio.run_coroutine_threadsafe(webhook_deliver(delivery), self._running_loop())
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)

    def drain(self, timeout: float | None = None) -> None:
        """Wait (bounded) for the deliveries under way."""
        with self._lock:
            pending = list(self._pending)
        concurrent.futures.wait(pending, timeout=self.drain_seconds if timeout is None else timeout)


_sender = _Sender()


@dataclass
class _Outcome:
    ok: bool
    retry: bool
    detail: str


async def webhook_deliver(delivery: Delivery) -> bool:
    """POST until the receiver answers 2xx, at most KITEMESH_WEBHOOK_ATTEMPTS times; True when delivered.
    Every attempt sends the same body and event id, so a receiver can drop duplicates."""
    attempts = max(1, settings.KITEMESH_WEBHOOK_ATTEMPTS)
    for attempt in range(1, attempts + 1):
        outcome = await _attempt(delivery)
        if outcome.ok:
            logger.info("webhook %s %s delivered to %s", delivery.event_type, delivery.event_id, delivery.host)
            return True
        if not outcome.retry or attempt == attempts:
            break
        await asyncio.sleep(settings.KITEMESH_WEBHOOK_BACKOFF_SECONDS * 2 ** (attempt - 1))
    logger.warning(
        "webhook %s %s for group %s not delivered to %s after %d attempt(s): %s",
        delivery.event_type,
        delivery.event_id,
        delivery.group,
        delivery.host,
        attempt,
        outcome.detail,
    )
    return False


async def _attempt(delivery: Delivery) -> _Outcome:
    try:
        addresses = await destination_check(delivery.url)
    except DestinationBlocked as exc:
        return _Outcome(ok=False, retry=False, detail=f"blocked destination: {exc}")
    try:
        status = await _post_pinned(delivery, addresses)
    except httpx.TimeoutException:
        return _Outcome(ok=False, retry=True, detail="timed out")
    except httpx.HTTPError as exc:
        # Only the kind of failure: some messages quote request headers, and those carry the signature.
        return _Outcome(ok=False, retry=True, detail=f"request failed ({type(exc).__name__})")
    if 200 <= status < 300:
        return _Outcome(ok=True, retry=False, detail=f"HTTP {status}")
    return _Outcome(ok=False, retry=status >= 500 or status in _RETRY_STATUSES, detail=f"HTTP {status}")


async def _post_pinned(delivery: Delivery, addresses: list[IPAddress]) -> int:
    """POST to the first checked address that accepts a connection (DNS is not asked again, so it cannot
    change between the check and the use); the Host header and TLS server name stay the URL's."""
    url = httpx.URL(delivery.url)
    host = url.raw_host.decode("ascii")
    extensions: dict[str, Any] = {"timeout": httpx.Timeout(settings.KITEMESH_WEBHOOK_TIMEOUT_SECONDS).as_dict()}
    if url.scheme == "https" and literal_address(host) is None:
        extensions["sni_hostname"] = host
    headers = {"Host": url.netloc.decode("ascii"), **delivery.headers}
    # No proxies or .netrc from the environment, no redirects: the checked address is the only one reached.
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False) as client:
        error: httpx.ConnectError | None = None
        for ip in addresses:
            request = httpx.Request(
                "POST", url.copy_with(host=str(ip)), headers=headers, content=delivery.body, extensions=extensions
            )
            try:
                response = await client.send(request, stream=True)
            except httpx.ConnectError as exc:
                error = exc
                continue
            await response.aclose()  # the status is the answer; the body is not read
            return response.status_code
        assert error is not None  # destination_check never returns an empty list
        raise error
