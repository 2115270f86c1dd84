"""The pinned HTTP send, for every request KiteMesh makes to an address someone configured (tools, webhooks):
to the addresses the SSRF guard checked (core.ssrf.destination_check), never resolved again, so DNS cannot
change between the check and the use; with the URL's Host header and, over https, its TLS server name, so the
certificate is still checked against the host name."""

from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from core.ssrf import IPAddress, literal_address


def pinned_request(
    method: str,
    url: httpx.URL,
    ip: str,
    *,
    headers: dict[str, str],
    content: bytes | None,
    timeout: float,
    trace: Callable[[str, dict], Awaitable[None]] | None = None,
) -> httpx.Request:
    """The request for `url`, addressed to `ip`. An httpx.Request, not client.build_request: nothing of a
    shared client (headers, cookies) is merged in."""
    host = url.raw_host.decode("ascii")
    extensions: dict[str, Any] = {"timeout": httpx.Timeout(timeout).as_dict()}
    if trace is not None:
        extensions["trace"] = trace
    if url.scheme == "https" and literal_address(host) is None:
        extensions["sni_hostname"] = host
    headers = {"Host": url.netloc.decode("ascii"), **headers}
    return httpx.Request(method, url.copy_with(host=ip), headers=headers, content=content, extensions=extensions)


async def pinned_send(
    client: httpx.AsyncClient,
    method: str,
    url: httpx.URL,
    addresses: list[IPAddress],
    *,
    headers: dict[str, str],
    content: bytes | None,
    timeout: float,
    trace: Callable[[str, dict], Awaitable[None]] | None = None,
) -> httpx.Response:
    """Send to the first checked address that accepts a connection (a refused connect sent nothing, so the
    next may be tried); the response is streamed, for the caller to read and close."""
    error: httpx.ConnectError | None = None
    for ip in addresses:
        request = pinned_request(method, url, str(ip), headers=headers, content=content, timeout=timeout, trace=trace)
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError as exc:
            error = exc
    assert error is not None  # destination_check never returns an empty list
    raise error
