"""Which network addresses an image download may reach.

Image URLs are chosen by the service, or by whoever forged a record, so a download
must not become a way into the machine's own network (a blind SSRF). Addresses fall in
three classes: *forbidden* (link-local, such as the cloud metadata service at
169.254.169.254, and unspecified, multicast or reserved ones: never reached), *private*
(loopback, RFC 1918, unique-local and other non-global ranges, and ``localhost`` names:
reached only when the image URL itself is on such an address) and *public*.

A host is judged from its URL when it is a literal address (in any form the C library
accepts, such as ``2852039166`` or ``0x7f.1``) or a ``localhost`` name, else from what
its DNS name resolves to (:func:`reaches_of`). :class:`GuardedResolver` also keeps the
client's own session from ever connecting to a forbidden address a DNS name points at,
whenever aiohttp resolves it (a name that answers differently on each lookup included).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import ipaddress
import re
import socket
from typing import Final

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

__all__ = [
    "GuardedResolver",
    "Reach",
    "guarded_connector",
    "reach_of_host",
    "reach_of_ip",
    "reaches_of",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# What inet_aton(3) may read as an IPv4 address: dotted, decimal, octal or hex parts.
_INET_ATON_LIKE: Final = re.compile(r"[0-9a-fA-FxX.]+")
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_SHARED: Final = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT


class Reach(enum.Enum):
    """How far from the public internet an address is, for the download rules."""

    PUBLIC = "public"
    PRIVATE = "private"
    FORBIDDEN = "forbidden"


def reach_of_ip(ip: IPAddress) -> Reach:
    """The class of one address; an IPv4 address embedded in IPv6 counts as itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return reach_of_ip(embedded)
    if ip.is_loopback:  # before is_reserved, which ::1 also is
        return Reach.PRIVATE
    if ip.is_link_local or ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return Reach.FORBIDDEN
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return Reach.PRIVATE
    return Reach.PUBLIC if ip.is_global else Reach.PRIVATE


def parse_ip(host: str) -> IPAddress | None:
    """The address a URL host names literally, or None for a DNS name."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _INET_ATON_LIKE.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def reach_of_host(host: str) -> Reach | None:
    """The class of a URL's host, or None when only DNS can tell (a name)."""
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return Reach.PRIVATE
    ip = parse_ip(name)
    return None if ip is None else reach_of_ip(ip)


async def reaches_of(host: str, port: int) -> set[Reach]:
    """The classes of every address ``host`` stands for: resolved when it is a DNS name.

    An empty set when the name does not resolve here (a proxy may still reach it).
    """
    reach = reach_of_host(host)
    if reach is not None:
        return {reach}
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return set()
    reaches = set()
    for *_, address in infos:
        ip = _address(str(address[0]))
        reaches.add(Reach.FORBIDDEN if ip is None else reach_of_ip(ip))
    return reaches


class GuardedResolver(AbstractResolver):
    """aiohttp's threaded resolver, minus forbidden addresses (link-local and the like).

    A name that points only at forbidden addresses fails as unreachable, so neither an
    image URL nor a redirect can reach the metadata service through DNS.
    """

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if not _forbidden(r["host"])]
        if results and not allowed:
            raise OSError(
                errno.EHOSTUNREACH,
                f"{host} resolves only to link-local or other forbidden addresses",
            )
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def _forbidden(address: str) -> bool:
    ip = _address(address)
    return ip is None or reach_of_ip(ip) is Reach.FORBIDDEN


def _address(text: str) -> IPAddress | None:
    """The address a resolver answered, or None if it is not one (nothing to vouch for)."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def guarded_connector() -> aiohttp.TCPConnector:
    """The connector of the client's own session: aiohttp's defaults and the guarded resolver."""
    return aiohttp.TCPConnector(resolver=GuardedResolver())
