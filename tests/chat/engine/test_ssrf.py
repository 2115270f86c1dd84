"""The SSRF guard: which destinations a tool may reach. Private and metadata targets are judged through
destination_check with IP literals or an injected resolver (it refuses before any connection); the live tests
connect to loopback tool servers only."""

import asyncio
import re
import socket
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from chat.engine.tools import ToolResult, tool_call_run
from core.models import Tool
from core.ssrf import DestinationBlocked, Resolver, destination_check
from tests.support.tool_server import ToolResponse, ToolServer


async def _no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"{host!r} is an address literal and must not be looked up")


def resolver(table: dict[str, list[str]]) -> Resolver:
    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    return resolve


def check(url: str, *, allowlist: list[str] | None = None, resolve: Resolver = _no_dns) -> list:
    return asyncio.run(destination_check(url, allowlist=[] if allowlist is None else allowlist, resolve=resolve))


# --- Decisions, without connecting ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://93.184.216.34/", IPv4Address("93.184.216.34")),
        ("https://93.184.216.34:8443/path?q=1", IPv4Address("93.184.216.34")),
        ("http://1572395042/", IPv4Address("93.184.216.34")),  # the same address as one number
        ("https://[2606:4700:4700::1111]/", IPv6Address("2606:4700:4700::1111")),
        ("http://[::ffff:93.184.216.34]/", IPv4Address("93.184.216.34")),
    ],
)
def test_public_address_literal_is_allowed_and_returned_without_dns(url: str, expected: object) -> None:
    assert check(url) == [expected]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/", "loopback"),
        ("http://127.0.0.2:8080/", "loopback"),
        ("http://10.0.0.5/", "private"),
        ("http://172.16.0.1/", "private"),
        ("http://192.168.1.1/", "private"),
        ("http://[fc00::1]/", "private"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://[fd00:ec2::254]/", "metadata"),
        ("http://169.254.1.1/", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://100.64.0.1/", "CGNAT"),
        ("http://100.127.255.254/", "CGNAT"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://0/", "unspecified"),
        ("http://[::]/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://239.1.2.3/", "multicast"),
        ("http://[ff02::1]/", "multicast"),
        ("http://240.0.0.1/", "reserved"),
        ("http://255.255.255.255/", "reserved"),
        ("http://192.0.2.1/", "private"),  # documentation range
        # Odd spellings of loopback and metadata addresses
        ("http://2130706433/", "loopback"),
        ("http://0x7f000001/", "loopback"),
        ("http://127.1/", "loopback"),
        ("http://0x7f.1/", "loopback"),
        ("http://[::1]/", "loopback"),
        ("http://[0:0:0:0:0:0:0:1]/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://[::ffff:7f00:1]/", "loopback"),
        ("http://[::ffff:169.254.169.254]/", "metadata"),
        ("http://[2002:7f00:1::]/", "loopback"),  # 6to4 around 127.0.0.1
        ("http://[64:ff9b::a00:5]/", "private"),  # NAT64 around 10.0.0.5
        ("http://localhost/", "loopback"),
        ("http://localhost./", "loopback"),
        ("http://LOCALHOST:8000/", "loopback"),
        ("http://api.localhost/", "loopback"),
        ("http://127.0.0.1./", "loopback"),
        ("HTTP://127.0.0.1/", "loopback"),
        ("http://public.example@127.0.0.1/", "loopback"),
        ("http://public.example:443@127.0.0.1/", "loopback"),
        ("http://127.0.0.1#@public.example/", "loopback"),
    ],
)
def test_non_public_destination_is_blocked(url: str, reason: str) -> None:
    with pytest.raises(DestinationBlocked, match=reason):
        check(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        # Leading zeros (octal to inet_aton): httpx refuses them, so no request could carry them either.
        ("http://0177.0.0.1/", "not a valid URL"),
        ("http://127.000.000.001/", "not a valid URL"),
        ("ftp://93.184.216.34/", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("gopher://127.0.0.1:25/", "only http and https"),
        ("http:///no-host", "no host"),
        ("//93.184.216.34/", "only http and https"),
    ],
)
def test_url_that_is_not_plain_http_to_a_host_is_blocked(url: str, message: str) -> None:
    with pytest.raises(DestinationBlocked, match=message):
        check(url)


def test_message_names_the_host_and_why() -> None:
    with pytest.raises(DestinationBlocked) as caught:
        check("http://169.254.169.254/latest/meta-data/iam?token=abc")
    assert str(caught.value).startswith("host '169.254.169.254' is the cloud metadata address")
    assert "token=abc" not in str(caught.value)


def test_name_resolving_to_a_private_address_is_blocked() -> None:
    resolve = resolver({"internal.example": ["10.0.0.5"]})
    with pytest.raises(DestinationBlocked, match=re.escape("host 'internal.example' resolves to a private address")):
        check("https://internal.example/hook", resolve=resolve)


def test_name_resolving_to_public_and_private_addresses_is_blocked() -> None:
    resolve = resolver({"rebind.example": ["93.184.216.34", "10.0.0.5"]})
    with pytest.raises(DestinationBlocked, match="private"):
        check("https://rebind.example/", resolve=resolve)


@pytest.mark.parametrize("address", ["::ffff:10.0.0.5", "169.254.169.254", "fd00:ec2::254", "::1", "100.64.1.1"])
def test_name_resolving_to_an_internal_address_in_any_form_is_blocked(address: str) -> None:
    with pytest.raises(DestinationBlocked):
        check("http://tricky.example/", resolve=resolver({"tricky.example": [address]}))


def test_public_name_returns_every_resolved_address_once_in_order() -> None:
    resolve = resolver({"api.example": ["93.184.216.34", "2606:4700::1", "93.184.216.34", "::ffff:1.1.1.1"]})
    assert check("https://API.Example./v1", resolve=resolve) == [
        IPv4Address("93.184.216.34"),
        IPv6Address("2606:4700::1"),
        IPv4Address("1.1.1.1"),
    ]


def test_name_that_does_not_resolve_is_blocked() -> None:
    with pytest.raises(DestinationBlocked, match=re.escape("host 'nowhere.example' could not be resolved")):
        check("http://nowhere.example/", resolve=resolver({}))


def test_name_resolving_to_nothing_is_blocked() -> None:
    with pytest.raises(DestinationBlocked, match="no address"):
        check("http://empty.example/", resolve=resolver({"empty.example": []}))


# --- The allowlist ----------------------------------------------------------------------------------


def test_allowlisted_host_name_is_allowed_whatever_it_resolves_to() -> None:
    resolve = resolver({"crm.internal": ["10.0.0.5", "127.0.0.1"]})
    addresses = check("http://CRM.internal./tickets", allowlist=["crm.INTERNAL"], resolve=resolve)
    assert addresses == [ip_address("10.0.0.5"), ip_address("127.0.0.1")]


def test_allowlisted_host_name_does_not_cover_another_name_with_the_same_address() -> None:
    resolve = resolver({"crm.internal": ["10.0.0.5"], "other.internal": ["10.0.0.5"]})
    with pytest.raises(DestinationBlocked):
        check("http://other.internal/", allowlist=["crm.internal"], resolve=resolve)


def test_allowlisted_ip_allows_exactly_that_address() -> None:
    resolve = resolver({"crm.internal": ["10.0.0.5"], "pair.internal": ["10.0.0.5", "10.0.0.6"]})
    assert check("http://crm.internal/", allowlist=["10.0.0.5"], resolve=resolve) == [ip_address("10.0.0.5")]
    assert check("http://10.0.0.5:8080/", allowlist=["10.0.0.5"]) == [ip_address("10.0.0.5")]
    with pytest.raises(DestinationBlocked, match=re.escape("pair.internal")):
        check("http://pair.internal/", allowlist=["10.0.0.5"], resolve=resolve)


def test_allowlisted_cidr_allows_addresses_inside_it() -> None:
    assert check("http://10.20.30.40/", allowlist=["10.0.0.0/8"]) == [ip_address("10.20.30.40")]
    assert check("http://[fd12::7]/", allowlist=["fd12::/16"]) == [ip_address("fd12::7")]
    assert check("http://[::ffff:10.1.1.1]/", allowlist=["10.0.0.0/8"]) == [ip_address("10.1.1.1")]
    with pytest.raises(DestinationBlocked):
        check(
            "http://11.0.0.1.internal/",
            allowlist=["10.0.0.0/8"],
            resolve=resolver({"11.0.0.1.internal": ["172.16.0.1"]}),
        )


def test_allowlisted_ipv6_loopback_in_brackets() -> None:
    assert check("http://[::1]:9000/", allowlist=["[::1]"]) == [ip_address("::1")]


def test_loopback_address_outside_the_allowlist_is_blocked() -> None:
    with pytest.raises(DestinationBlocked, match=re.escape("host '127.0.0.2' is a loopback address")):
        check("http://127.0.0.2:8765/", allowlist=["127.0.0.1"])


def test_allowlist_defaults_to_the_setting(settings) -> None:
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = ["10.0.0.0/8"]
    assert asyncio.run(destination_check("http://10.0.0.5/", resolve=_no_dns)) == [ip_address("10.0.0.5")]
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = []
    with pytest.raises(DestinationBlocked):
        asyncio.run(destination_check("http://10.0.0.5/", resolve=_no_dns))


def test_default_resolver_is_the_system_one_for_names() -> None:
    # "localhost" never reaches a resolver; the system resolver answers for the host's own name from
    # /etc/hosts or fails — either way the decision comes without any outside DNS.
    with pytest.raises(DestinationBlocked):
        asyncio.run(destination_check("http://localhost:1/", allowlist=[]))
    with pytest.raises(DestinationBlocked, match="could not be resolved"):
        asyncio.run(destination_check("http://name.invalid/", allowlist=[]))


# --- Live, against loopback tool servers ------------------------------------------------------------


def _tool(url: str, method: str = "GET") -> Tool:
    # Unsaved: tool_call_run reads only these fields, so no database is needed.
    return Tool(name="probe", method=method, url=url, auth_type=Tool.AuthType.NONE)


def run(tool: Tool, arguments: dict | None = None) -> ToolResult:
    return asyncio.run(tool_call_run(tool=tool, arguments=arguments or {}, idempotency_key="test-key"))


@pytest.fixture
def second_loopback_server() -> Iterator[ToolServer]:
    """A tool server on 127.0.0.2: bound only to prove that nothing is ever sent to it."""
    server = ToolServer(host="127.0.0.2").start()
    yield server
    server.stop()


def test_loopback_tool_is_not_called_when_the_allowlist_is_unset(tool_server: ToolServer, settings) -> None:
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = []
    result = run(_tool(tool_server.url + "/hook"))
    assert not result.sent
    assert result.status_code is None
    assert result.error.startswith("blocked destination: host '127.0.0.1' is a loopback address")
    assert tool_server.requests == []


def test_loopback_tool_is_called_when_allowlisted(tool_server: ToolServer, settings) -> None:
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = ["127.0.0.1"]
    result = run(_tool(tool_server.url + "/hook"))
    assert result.ok
    assert [r.path for r in tool_server.requests] == ["/hook"]


def test_ipv6_loopback_tool_is_called_when_allowlisted(settings) -> None:
    server = ToolServer(host="::1").start()
    try:
        settings.KITEMESH_TOOL_HOST_ALLOWLIST = []
        assert not run(_tool(server.url + "/v6")).sent
        settings.KITEMESH_TOOL_HOST_ALLOWLIST = ["::1"]
        assert run(_tool(server.url + "/v6")).ok
        assert [(r.path, r.headers["host"]) for r in server.requests] == [("/v6", f"[::1]:{server.port}")]
    finally:
        server.stop()


def test_redirect_outside_the_allowlist_is_refused_and_nothing_reaches_it(
    tool_server: ToolServer, second_loopback_server: ToolServer, settings
) -> None:
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = ["127.0.0.1"]
    tool_server.queue(ToolResponse(status=302, location=f"{second_loopback_server.url}/steal"))
    result = run(_tool(tool_server.url + "/start"))
    assert result.sent
    assert result.status_code == 302
    assert not result.ok
    assert result.error.startswith("redirect blocked: host '127.0.0.2' is a loopback address")
    assert [r.path for r in tool_server.requests] == ["/start"]
    assert second_loopback_server.requests == []


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.2]/",
        "http://localhost/",
        "http://0x7f000002/",
        "file:///etc/passwd",
    ],
)
def test_redirect_to_an_internal_target_is_refused(tool_server: ToolServer, settings, location: str) -> None:
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = ["127.0.0.1"]
    tool_server.queue(ToolResponse(status=307, location=location))
    result = run(_tool(tool_server.url + "/start"))
    assert result.error.startswith("redirect blocked:")
    assert len(tool_server.requests) == 1
