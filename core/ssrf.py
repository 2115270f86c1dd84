"""The SSRF guard for tool calls: a URL may be fetched only when every address its host resolves to is
publicly routable, or when KITEMESH_TOOL_HOST_ALLOWLIST names the host or covers each of its addresses."""

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable

import httpx
from django.conf import settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

# Checked before Python's own classification, so the message says which well-known target was hit.
_NAMED_NETWORKS: list[tuple[IPNetwork, str]] = [
    (ipaddress.ip_network("169.254.169.254/32"), "the cloud metadata address"),
    (ipaddress.ip_network("fd00:ec2::254/128"), "the cloud metadata address"),
    (ipaddress.ip_network("100.64.0.0/10"), "a shared (CGNAT) address"),
]
# NAT64's well-known prefix: traffic goes to the embedded IPv4 address, which is the one to judge.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Only such hosts can be IPv4 numbers in the forms inet_aton accepts (2130706433, 0x7f000001, 127.1, 0177.0.0.1),
# which the system resolver would also turn into addresses.
_NUMERIC_HOST = re.compile(r"[0-9a-fx.]+")


class DestinationBlocked(Exception):
    """The URL may not be fetched. The message names the host and the reason, never the URL (whose query
    can carry a key) nor a secret."""


def address_problem(ip: IPAddress) -> str | None:
    """Why connecting to `ip` is refused by default, or None when it is publicly routable."""
    for network, reason in _NAMED_NETWORKS:
        if ip in network:
            return reason
    checks = [
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),  # is_global holds for some multicast ranges
        (ip.is_reserved, "a reserved address"),
        (ip.is_private, "a private address"),
        (not ip.is_global, "a non-public address"),
    ]
    return next((reason for failed, reason in checks if failed), None)


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address really reaches (mapped, 6to4, NAT64), if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip.sixtofour:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _problem(ip: IPAddress) -> str | None:
    embedded = _embedded_ipv4(ip)
    if embedded is None:
        return address_problem(ip)
    if ip.ipv4_mapped or ip in _NAT64:
        # The IPv6 form only carries the IPv4 destination (DNS64 answers NAT64 ones for public hosts).
        return address_problem(embedded)
    return address_problem(ip) or address_problem(embedded)  # 6to4: both ends must be public


def _connect_address(ip: IPAddress) -> IPAddress:
    """IPv4-mapped addresses are connected to as plain IPv4: same destination, no dual-stack socket needed."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def _destination(url: str) -> tuple[str, int]:
    """The URL's host (lowercase, ASCII, no trailing dot) and port; httpx parses it, as it will send it."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        raise DestinationBlocked("the tool URL is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise DestinationBlocked(f"only http and https URLs are allowed, not {parsed.scheme or 'none'!r}")
    host = parsed.raw_host.decode("ascii").lower()
    host = host[:-1] if host.endswith(".") else host
    if not host:
        raise DestinationBlocked("the tool URL has no host")
    return host, parsed.port or (443 if parsed.scheme == "https" else 80)


def literal_address(host: str) -> IPAddress | None:
    """The address a host names by itself (IPv6, dotted IPv4 or an inet_aton number form), else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


async def _system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


async def _addresses(host: str, port: int, resolve: Resolver | None) -> list[IPAddress]:
    literal = literal_address(host)
    if literal is not None:
        return [literal]
    if host == "localhost" or host.endswith(".localhost"):
        # RFC 6761: these always mean this machine, whatever a resolver might answer.
        return [ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")]
    try:
        found = await (resolve or _system_resolve)(host, port)
        addresses = [ipaddress.ip_address(a) for a in found]
    except (OSError, ValueError):
        raise DestinationBlocked(f"host {host!r} could not be resolved") from None
    if not addresses:
        raise DestinationBlocked(f"host {host!r} resolved to no address")
    return list(dict.fromkeys(addresses))


def _allowlist_parse(entries: Iterable[str]) -> tuple[set[str], list[IPNetwork]]:
    names: set[str] = set()
    networks: list[IPNetwork] = []
    for raw in entries:
        entry = raw.strip().lower().strip("[]")
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            names.add(entry.removesuffix("."))
    return names, networks


def _allowed(ip: IPAddress, networks: list[IPNetwork]) -> bool:
    candidates = {ip, _connect_address(ip)}
    return any(candidate in network for candidate in candidates for network in networks)


async def destination_check(
    url: str, *, allowlist: list[str] | None = None, resolve: Resolver | None = None
) -> list[IPAddress]:
    """The addresses to connect to for `url`, or DestinationBlocked. Every address the host resolves to
    must be public or inside an allowlisted network; an allowlisted host name is trusted whatever it resolves
    to. Connect only to the returned addresses: resolving again would let DNS change between check and use."""
    host, port = _destination(url)
    names, networks = _allowlist_parse(settings.KITEMESH_TOOL_HOST_ALLOWLIST if allowlist is None else allowlist)
    addresses = await _addresses(host, port, resolve)
    if host not in names:
        verb = "is" if literal_address(host) is not None else "resolves to"
        for ip in addresses:
            problem = _problem(ip)
            if problem and not _allowed(ip, networks):
                raise DestinationBlocked(
                    f"host {host!r} {verb} {problem}; tools may reach it only if KITEMESH_TOOL_HOST_ALLOWLIST allows it"
                )
    return list(dict.fromkeys(_connect_address(ip) for ip in addresses))
