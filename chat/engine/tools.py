"""HTTP tools: the spec offered to the model, its arguments checked and redacted, the risk label, and the call
itself — SSRF-checked on every hop, pinned to the checked address, bounded in time and size, never raising."""

import asyncio
import codecs
import copy
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpx
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from chat.engine.clients import per_loop
from core.models import Tool
from core.pinned_http import pinned_send
from core.redaction import REDACTED
from core.ssrf import DestinationBlocked, Resolver, destination_check
from core.vault import secret_value

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
MAX_REDIRECTS = 3
DEFAULT_TIMEOUT_SECONDS = 10.0
TRUNCATED_MARK = "…[truncated]"
USER_AGENT = "KiteMesh-Tool/1"
IDEMPOTENCY_HEADER = "Idempotency-Key"

_METHOD_RISK = {"GET": "low", "HEAD": "low", "POST": "medium", "PUT": "medium", "PATCH": "medium", "DELETE": "high"}
_BODY_METHODS = {"POST", "PUT", "PATCH"}
_REDIRECT_STATUSES = {301, 302, 303, 307, 308}


# --- What the model is offered and may send -------------------------------------------------------


def tool_spec(tool: Tool) -> dict:
    """The OpenAI `tools` entry for this tool."""
    parameters = copy.deepcopy(tool.parameters) if tool.parameters else {"type": "object", "properties": {}}
    return {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": parameters},
    }


# --- What people see -------------------------------------------------------------------------------


def tool_risk(tool: Tool) -> str:
    """The tool's risk override, else by method: GET/HEAD low, POST/PUT/PATCH medium, DELETE high."""
    return tool.risk or _METHOD_RISK.get(tool.method.upper(), "high")


# --- The call --------------------------------------------------------------------------------------


@dataclass
class ToolResult:
    """The outcome of a tool call. `sent` is true once request bytes began to leave: from then on the tool
    may have acted. A non-2xx answer is not an error: the model sees its status and body, and `ok` is false."""

    sent: bool
    status_code: int | None
    body: str
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.sent and not self.error and self.status_code is not None and 200 <= self.status_code < 300

    def model_content(self, **told: Any) -> str:
        """The content of the `tool` message the model receives (with what else it is `told`)."""
        if self.error or not self.sent:
            return json.dumps({"error": self.error or "the tool call was not sent", **told}, ensure_ascii=False)
        return json.dumps({"status": self.status_code, "body": self.body, **told}, ensure_ascii=False)


class _CallRefused(Exception):
    """The call cannot start (configuration); becomes an unsent ToolResult."""


@dataclass
class _Hop:
    """One request of a call: the first, then one per redirect. `url` keeps the host name; the connection
    goes to a checked address."""

    method: str
    url: httpx.URL
    body: bytes | None
    headers: dict[str, str]
    auth: dict[str, str] = field(default_factory=dict)


class _Progress:
    """Notices (through httpcore's trace hook) when request headers start to go out."""

    def __init__(self) -> None:
        self.sent = False
        self.status_code: int | None = None

    async def trace(self, event: str, info: dict) -> None:
        if event.endswith("send_request_headers.started"):
            self.sent = True


async def tool_call_run(
    *, tool: Tool, arguments: dict, idempotency_key: str, resolve: Resolver | None = None
) -> ToolResult:
    """Call the tool with validated arguments, sending `Idempotency-Key: <idempotency_key>` (the tool
    execution's id: the same on every send of one call, so the service can drop a duplicate).
    `tool.auth_secret` must be loaded (select_related): no query runs here. Never raises for network or
    HTTP trouble; the secret never appears in the result or logs."""
    timeout = float(getattr(settings, "KITEMESH_TOOL_TIMEOUT_SECONDS", DEFAULT_TIMEOUT_SECONDS))
    progress = _Progress()
    secret = ""
    try:
        secret, auth = _auth(tool)
        hop = _first_hop(tool, arguments, auth, idempotency_key)
        _client()  # built before the clock starts: this loop's first call loads the CA certificates
        async with asyncio.timeout(timeout):
            result = await _exchange(hop, resolve, timeout, progress)
    except _CallRefused as exc:
        result = ToolResult(sent=False, status_code=None, body="", error=str(exc))
    except TimeoutError:
        result = _failure(progress, _timed_out(timeout))
    result = _scrub(result, secret)
    _log(tool, result)
    return result


def _auth(tool: Tool) -> tuple[str, dict[str, str]]:
    """The clear secret (to scrub it from what comes back) and the headers that carry it."""
    if tool.auth_type == Tool.AuthType.NONE:
        return "", {}
    if tool.auth_secret is None:
        raise _CallRefused(f"the tool {tool.name!r} uses {tool.auth_type} auth but has no vault secret")
    try:
        value = secret_value(tool.auth_secret)
    except ImproperlyConfigured as exc:
        raise _CallRefused(str(exc)) from None
    if tool.auth_type == Tool.AuthType.BEARER:
        return value, {"Authorization": f"Bearer {value}"}
    if tool.auth_type == Tool.AuthType.HEADER and tool.auth_header:
        return value, {tool.auth_header: value}
    raise _CallRefused(f"the tool {tool.name!r} has an incomplete auth configuration ({tool.auth_type})")


def _first_hop(tool: Tool, arguments: dict, auth: dict[str, str], idempotency_key: str) -> _Hop:
    method = tool.method.upper()
    try:
        url = httpx.URL(tool.url)
    except (httpx.InvalidURL, TypeError):
        raise _CallRefused(f"the tool {tool.name!r} has an invalid URL") from None
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json, */*;q=0.5", IDEMPOTENCY_HEADER: idempotency_key}
    if method in _BODY_METHODS:
        headers["Content-Type"] = "application/json"
        body = json.dumps(arguments, ensure_ascii=False, separators=(",", ":")).encode()
        return _Hop(method, url, body, headers, auth)
    query = {key: _query_value(value) for key, value in arguments.items()}
    return _Hop(method, url.copy_merge_params(query), None, headers, auth)


def _query_value(value: Any) -> str:
    # Strings go as they are; numbers, booleans, null, arrays and objects as their JSON text.
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


async def _exchange(hop: _Hop, resolve: Resolver | None, timeout: float, progress: _Progress) -> ToolResult:
    """Send the hop, following at most MAX_REDIRECTS redirects, each one checked before it is connected to."""
    redirects = 0
    while True:
        try:
            addresses = await destination_check(str(hop.url), resolve=resolve)
        except DestinationBlocked as exc:
            return _failure(progress, f"{'redirect blocked' if redirects else 'blocked destination'}: {exc}")
        try:
            response = await pinned_send(
                _client(),
                hop.method,
                hop.url,
                addresses,
                headers={**hop.headers, **hop.auth},
                content=hop.body,
                timeout=timeout,
                trace=progress.trace,
            )
            try:
                progress.status_code = response.status_code
                if response.status_code not in _REDIRECT_STATUSES or "location" not in response.headers:
                    return ToolResult(sent=True, status_code=response.status_code, body=await _body_read(response))
            finally:
                await response.aclose()
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return _failure(progress, _transport_error(exc, hop.url.host, timeout))
        if redirects == MAX_REDIRECTS:
            return _failure(progress, f"too many redirects (more than {MAX_REDIRECTS})")
        redirects += 1
        try:
            hop = _redirect(hop, response)
        except httpx.InvalidURL:
            return _failure(progress, f"{hop.url.host!r} redirected to an invalid URL")


def _transport_error(exc: Exception, host: str, timeout: float) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return _timed_out(timeout)
    if isinstance(exc, httpx.ConnectError):
        return f"could not connect to {host!r} ({exc or 'connection failed'})"
    # Other messages can quote request headers (h11 does): name the kind of failure only.
    return f"the request to {host!r} failed ({type(exc).__name__})"


def _timed_out(timeout: float) -> str:
    return f"the tool did not answer within {timeout:g} s"


def _failure(progress: _Progress, error: str) -> ToolResult:
    return ToolResult(sent=progress.sent, status_code=progress.status_code, body="", error=error)


def _redirect(hop: _Hop, response: httpx.Response) -> _Hop:
    """The next hop, with httpx's method rules; the secret goes only back to the same origin."""
    url = hop.url.join(response.headers["location"]).copy_with(fragment=None)
    status, method, body, headers = response.status_code, hop.method, hop.body, dict(hop.headers)
    if (status in (302, 303) and method != "HEAD") or (status == 301 and method == "POST"):
        method, body = "GET", None
        headers.pop("Content-Type", None)
    auth = hop.auth if _origin(url) == _origin(hop.url) else {}
    return _Hop(method, url, body, headers, auth)


def _origin(url: httpx.URL) -> tuple[str, bytes, int | None]:
    return url.scheme, url.raw_host, url.port or {"http": 80, "https": 443}.get(url.scheme)


async def _body_read(response: httpx.Response) -> str:
    """At most MAX_BODY_BYTES of the body, decoded; a longer one is cut and marked."""
    data, truncated = bytearray(), False
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            truncated = True
            break
    try:
        decoder = codecs.getincrementaldecoder(response.charset_encoding or "utf-8")(errors="replace")
    except LookupError:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    # Not final when cut: a character split at the limit is dropped rather than shown as garbage.
    text = decoder.decode(bytes(data[:MAX_BODY_BYTES]), final=not truncated).replace("\x00", "")  # unstorable
    return text + TRUNCATED_MARK if truncated else text


def _scrub(result: ToolResult, secret: str) -> ToolResult:
    # A tool (or an error message) can echo the credential back; it must not reach the model or the records.
    if secret:
        result.body = result.body.replace(secret, REDACTED)
        result.error = result.error.replace(secret, REDACTED)
    return result


def _log(tool: Tool, result: ToolResult) -> None:
    if result.error:
        logger.warning("tool %s failed (sent=%s): %s", tool.name, result.sent, result.error)
    else:
        logger.info("tool %s answered HTTP %s", tool.name, result.status_code)


# --- The shared client -----------------------------------------------------------------------------


class _PoolPerServerName(httpx.AsyncBaseTransport):
    """One connection pool per TLS server name. Requests are addressed to IPs and httpcore pools connections
    by (scheme, IP, port): shared, a connection whose certificate was checked for one host could carry
    another host's request and credentials."""

    max_pools = 64

    def __init__(self) -> None:
        self._pools: OrderedDict[str, httpx.AsyncHTTPTransport] = OrderedDict()
        # One context for all pools (loading CA certificates is slow); SSL_CERT_FILE/SSL_CERT_DIR are honoured.
        self._ssl_context = httpx.create_ssl_context()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        name = request.extensions.get("sni_hostname", "")
        pool = self._pools.pop(name, None) or httpx.AsyncHTTPTransport(
            verify=self._ssl_context, limits=httpx.Limits(max_connections=200, max_keepalive_connections=20)
        )
        self._pools[name] = pool
        if len(self._pools) > self.max_pools:
            # A call still reading from the evicted pool fails like a dropped connection; 64 TLS hosts
            # between two uses of one host is far beyond a team's tool set.
            await self._pools.popitem(last=False)[1].aclose()
        return await pool.handle_async_request(request)

    async def aclose(self) -> None:
        while self._pools:
            await self._pools.popitem()[1].aclose()


def _tool_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=_PoolPerServerName(),
        # No proxies or .netrc from the environment (they would bypass the guard or add credentials),
        # and no cookie jar shared between teams' tools.
        trust_env=False,
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        follow_redirects=False,
    )


_client = per_loop(_tool_client, close=httpx.AsyncClient.aclose)
