"""DNS-rebinding protection: the Host header of every request must name this server.

A web page can point a domain of its own at 127.0.0.1 (DNS rebinding); the browser then sends the page's
requests to this server and lets the page read the answers, as the same origin. Those requests carry the
page's domain in their Host header, so a server that answers only to its own names is out of the page's
reach. Accepted: localhost, loopback addresses, the host the server is bound to, and the allowed hosts
("*": any). A server bound to every address (0.0.0.0, ::) accepts any IP address: a page cannot rebind
an address, only a name. A request without Host (HTTP/1.0) comes from no browser and passes.

With a shared secret the check is off: a rebinding page cannot know the secret.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import ApiError, error_response


def normalize_host(name: str) -> str:
    """A host name as compared here: lower case, without the brackets of an IPv6 address or a final dot."""
    return name.strip().strip("[]").rstrip(".").lower()


def host_of(header: str) -> str:
    """The host of a Host header, without its port: 'Example.com:8000' -> 'example.com', '[::1]:80' -> '::1'."""
    if header.startswith("["):
        return normalize_host(header.partition("]")[0])
    return normalize_host(header.partition(":")[0])


def ip_or_none(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class HostCheck:
    """ASGI middleware refusing, with a 403, requests whose Host is not one this server answers to."""

    def __init__(self, app: ASGIApp, bound_host: str, allowed_hosts: Iterable[str] = ()) -> None:
        self.app = app
        bound = normalize_host(bound_host)
        self.names = {"localhost", bound} | {normalize_host(h) for h in allowed_hosts}
        self.bound_ip = ip_or_none(bound)

    def allows(self, host: str) -> bool:
        if "*" in self.names or host in self.names:
            return True
        ip = ip_or_none(host)
        if ip is None:
            return False
        return ip.is_loopback or ip == self.bound_ip or (self.bound_ip is not None and self.bound_ip.is_unspecified)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        header = next((v for k, v in scope["headers"] if k == b"host"), None) if scope["type"] == "http" else None
        host = None if header is None else host_of(header.decode("latin-1"))
        if host is None or self.allows(host):
            await self.app(scope, receive, send)
            return
        error = ApiError(403, f"the Host header names {host!r}, which is not this server: it answers to localhost, "
                              "its own address and the hosts it is told to allow")
        await error_response(scope["path"], error)(scope, receive, send)
