"""Fetching a URL on behalf of an API client without opening the cluster's network to it
(server-side request forgery).

A client's URL is fetched only where every address its host resolves to is public: not
loopback, private, link-local (which holds the cloud metadata service, 169.254.169.254),
shared, multicast, reserved or unspecified, IPv4-mapped forms included. The connection
goes to the very address that was checked (a second DNS answer cannot swap it), and each
redirect is checked the same way. `allow_hosts` in the serve config opens host names or
networks on purpose. Errors say why a URL was refused and never carry what an internal
server answered.

urllib cannot pin the checked address or check redirects before following them, so the
request is made with http.client here.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import urllib.parse
from dataclasses import dataclass

MAX_REDIRECTS = 5


class Refused(Exception):
    """A URL the server will not (403) or could not (502) fetch for a client; str() is
    safe to hand back."""

    def __init__(self, message: str, status: int = 403):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class EgressPolicy:
    #: host names (exact, case-insensitive) or networks ("10.1.0.0/16", "127.0.0.1")
    allow_hosts: tuple[str, ...] = ()
    timeout_s: float = 10.0

    def _allowed_networks(self):
        for entry in self.allow_hosts:
            try:
                yield ipaddress.ip_network(entry, strict=False)
            except ValueError:
                continue

    def host_allowed(self, host: str) -> bool:
        names = {h.lower().rstrip(".") for h in self.allow_hosts}
        return host.lower().rstrip(".") in names

    def address_allowed(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip in network for network in self._allowed_networks())


def why_not_public(address: str) -> str | None:
    """Why an address may not be fetched for a client (None: it is public)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind, flag in (("loopback", ip.is_loopback), ("unspecified", ip.is_unspecified),
                       ("link-local (cloud metadata lives there)", ip.is_link_local),
                       ("multicast", ip.is_multicast), ("reserved", ip.is_reserved),
                       ("private", ip.is_private)):
        if flag:
            return kind
    if not ip.is_global:  # shared address space (100.64/10) and the like
        return "not public"
    return None


def resolve(host: str, port: int, policy: EgressPolicy) -> str:
    """The one address to connect to: every address of `host` must be public (or allowed),
    or the URL is refused."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise Refused(f"the host {host} does not resolve") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if policy.host_allowed(host):
        return addresses[0]
    for address in addresses:
        reason = why_not_public(address)
        if reason and not policy.address_allowed(address):
            raise Refused(f"{host} resolves to a {reason} address ({address}); the API "
                          "fetches only public addresses (serve config fetch.allow_hosts "
                          "opens a host)")
    return addresses[0]


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)


def fetch(url: str, max_bytes: int, policy: EgressPolicy) -> bytes:
    """GET `url` for a client, or raise Refused (a refused destination, an HTTP error, a
    body over `max_bytes`) with a message safe to hand back."""
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Refused(f"only http(s) URLs are fetched, not {url[:200]!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = resolve(parts.hostname, port, policy)
        kind = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
        connection = kind(parts.hostname, port, address, policy.timeout_s)
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        try:
            connection.request("GET", target, headers={"User-Agent": "curate"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise Refused(f"{parts.hostname} redirected without a Location")
                url = urllib.parse.urljoin(url, location)
                continue
            if response.status != 200:
                raise Refused(f"{parts.hostname} answered HTTP {response.status}", 502)
            data = response.read(max_bytes + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise Refused(f"cannot fetch from {parts.hostname}: {type(exc).__name__}",
                          502) from None
        finally:
            connection.close()
        if len(data) > max_bytes:
            raise Refused(f"the file at {parts.hostname} is larger than {max_bytes:,} bytes",
                          413)
        return data
    raise Refused(f"more than {MAX_REDIRECTS} redirects")
