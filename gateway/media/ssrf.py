"""Which addresses the gateway may connect to, and a resolver that only ever returns those.

The check runs on *resolved addresses* (``ipaddress``), never on spellings: ``127.1``, ``2130706433``,
``0x7f000001`` and ``[::ffff:127.0.0.1]`` are all loopback once parsed. The resolver the HTTP client
connects with is the one that checks (``GuardedResolver``), so the address checked is the address
connected to: there is no second lookup for DNS rebinding to slip into. If any address in an answer
is refused, the whole answer is (an attacker controls which one the client tries first).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable

from aiohttp.abc import AbstractResolver, ResolveResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud metadata services: never an image server, refused even with allow_private_networks.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "169.254.169.123", "100.100.100.200", "fd00:ec2::254")
)
_ALWAYS_BLOCKED = frozenset({"metadata", "unspecified", "multicast"})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
# WHATWG URL: a host whose last label is a number is an IPv4 address in some spelling.
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)


class BlockedAddress(Exception):
    """An address the policy refuses. Not an ``OSError``, so aiohttp lets it through unwrapped.

    ``reason`` is for logs only; clients get a generic message.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_ip(host: str) -> IPAddress | None:
    """The address ``host`` spells in canonical form (IPv6 may carry a zone), or None for a name."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    text = text.replace("%25", "%")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def looks_numeric(host: str) -> bool:
    """True for hosts a URL parser or ``inet_aton`` would read as an IPv4 address (``127.1``, ``0x7f.1``)."""
    labels = host.rstrip(".").split(".")
    return bool(labels) and _NUMERIC_LABEL.match(labels[-1]) is not None


def is_local_name(host: str) -> bool:
    """``localhost`` and ``*.localhost`` (RFC 6761), whatever the case or trailing dot."""
    name = host.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost")


def classify(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address, or None if it is one."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "scoped"
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = classify(embedded)
            return f"embedded-{inner}" if inner else None
        if ip.teredo is not None:
            return "teredo"
        if ip.is_site_local:
            return "site-local"
    if ip in METADATA_ADDRESSES:
        return "metadata"
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("cgnat", isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT),
        ("reserved", ip.is_reserved),
        ("non-global", not ip.is_global),
    )
    for name, hit in checks:
        if hit:
            return name
    return None


class AddressPolicy:
    """Decides one address. ``allow_private`` opens loopback/private/link-local, not metadata or multicast.

    ``trusted`` is for tests only: exact ``(address, port)`` pairs treated as public, so a local image
    server can stand in for a public one while every other local port stays refused.
    """

    def __init__(self, *, allow_private: bool = False, trusted: Iterable[tuple[str, int]] = ()) -> None:
        self.allow_private = allow_private
        self.trusted = frozenset((ipaddress.ip_address(a), int(p)) for a, p in trusted)

    def check(self, ip: IPAddress, port: int) -> None:
        """Raise ``BlockedAddress`` unless the gateway may connect to ``ip:port``."""
        if (ip, port) in self.trusted:
            return
        reason = classify(ip)
        if reason is None:
            return
        if self.allow_private and reason.removeprefix("embedded-") not in _ALWAYS_BLOCKED:
            return
        raise BlockedAddress(reason)

    def check_host(self, host: str, port: int) -> None:
        """Checks a URL host before connecting: literals here, names later by ``GuardedResolver``.

        aiohttp does not call the resolver for IP literals, so they must be checked here; odd
        IPv4 spellings are refused outright rather than guessed at.
        """
        ip = parse_ip(host)
        if ip is not None:
            self.check(ip, port)
        elif ":" in host or looks_numeric(host):
            raise BlockedAddress("odd-literal")
        elif is_local_name(host) and not self.allow_private:
            raise BlockedAddress("localhost")


class GuardedResolver(AbstractResolver):
    """Resolves with ``inner`` (the loop's getaddrinfo by default) and returns only checked addresses."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if is_local_name(host) and not self._policy.allow_private:
            raise BlockedAddress("localhost")
        if self._inner is None:
            from aiohttp.resolver import ThreadedResolver

            self._inner = ThreadedResolver()
        answers = await self._inner.resolve(host, port, family)
        if not answers:
            raise OSError(f"no address for {host}")
        for answer in answers:
            ip = parse_ip(answer["host"])
            if ip is None:
                raise BlockedAddress("unparsable-answer")
            self._policy.check(ip, port)
        return answers

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()
