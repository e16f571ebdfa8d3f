"""The client's address: the peer, or what a trusted proxy (Caddy) says it forwarded for.

``X-Forwarded-For`` is believed only when the TCP peer is one of ``server.trusted_proxies``;
then the nearest address in the header that is not itself a trusted proxy is the client
(if it is an address at all: otherwise the peer is).  Anyone else can put anything in
that header, so for them it is ignored.
"""

from __future__ import annotations

import ipaddress

from aiohttp import web

__all__ = ["TRUSTED_PROXIES", "Networks", "client_address", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Networks(tuple[Network, ...]):
    """Parsed ``server.trusted_proxies``."""

    def __contains__(self, address: object) -> bool:
        ip = _ip(address) if isinstance(address, str) else None
        return ip is not None and any(ip in network for network in iter(self))


TRUSTED_PROXIES = web.AppKey("chatmem.trusted_proxies", Networks)


def parse_networks(values: tuple[str, ...]) -> Networks:
    return Networks(ipaddress.ip_network(value, strict=False) for value in values)


def client_address(request: web.BaseRequest) -> str | None:
    peer = request.remote
    # A request the HTTP parser refused (answered 400) was never routed: it has no app to
    # ask, and aiohttp's config_dict asserts that it has (only the private field tells).
    trusted = None
    if isinstance(request, web.Request) and request._match_info is not None:
        trusted = request.config_dict.get(TRUSTED_PROXIES)
    if not trusted or peer not in trusted:
        return peer
    hops = [
        hop.strip()
        for value in request.headers.getall("X-Forwarded-For", ())
        for hop in value.split(",")
    ]
    for hop in reversed(hops):
        if hop and hop not in trusted:
            # Not an address: no proxy wrote that, so it tells nothing (and goes in no log).
            return hop if _ip(hop) is not None else peer
    return peer


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if "%" in text:  # an IPv6 scope (fe80::1%eth0) may hold any text but % and /
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
