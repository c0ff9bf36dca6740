"""Where outbound webhooks may go: public addresses, and what the operator allows (``MARGIN_WEBHOOK_ALLOW``).

A budget webhook is a URL a tenant chooses, so sending to it is a request the platform makes on the tenant's behalf
from inside the cluster. By default it may not reach anything that is not public: a cluster-internal name
(``localhost``, a name without a dot, ``*.svc``, ``*.cluster.local``, ``*.internal``, ``*.local``), or an address
that is loopback, private (RFC 1918, ULA), link-local (cloud metadata, 169.254.169.254), CGNAT, multicast, reserved
or unspecified — IPv4 inside IPv6 (mapped, 6to4, NAT64, Teredo) is judged by the IPv4 address it carries.

Two checks:

- :meth:`EgressPolicy.check_url` when a webhook is set (SetBudget): the scheme, and a host that is obviously not
  allowed (an internal name, a literal address that is not public). No DNS: a name may resolve differently later.
- :meth:`EgressPolicy.post` when an alert is sent — the real guard: the name is resolved once, every address it
  resolves to is checked, and the request goes to exactly the address checked (``Host`` and TLS SNI/certificate
  still the name's), so a name that resolves to something else the second time (DNS rebinding) cannot pass.
  Redirects are not followed and no proxy is used.

The operator's allow-list names hosts (``hooks.corp.example``; ``*.corp.example`` for its subdomains), allowed
whatever they resolve to, and networks (``10.20.0.0/16``, ``127.0.0.1``), allowed for the addresses in them.
Free of gRPC: refusals are :class:`~margin.common.errors.InvalidArgument` (setting) and :class:`Refused` (sending).
"""
from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from margin.common.errors import InvalidArgument

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

SCHEMES = {"http": 80, "https": 443}
INTERNAL_SUFFIXES = (".localhost", ".svc", ".cluster.local", ".internal", ".local", ".localdomain", ".home.arpa")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
CGNAT = ipaddress.ip_network("100.64.0.0/10")
_HOST_ENTRY = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


class Refused(Exception):
    """A webhook was not sent: where it points is not allowed."""


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (TCP), as text."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def why_not_public(ip: IPAddress) -> str:
    """Why an address is not a public destination, or "" when it is."""
    inner = _embedded_ipv4(ip)
    if inner is not None:
        reason = why_not_public(inner)
        return f"{reason} (inside {ip})" if reason else ""
    for reason, matches in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                            ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                            ("CGNAT", isinstance(ip, ipaddress.IPv4Address) and ip in CGNAT),
                            ("private", ip.is_private), ("reserved", ip.is_reserved)):
        if matches:
            return f"a {reason} address"
    return "" if ip.is_global else "not a public address"


def internal_name(host: str) -> bool:
    """A name that only means something inside the cluster or on this machine."""
    host = host.lower().rstrip(".")
    return host == "localhost" or "." not in host or host.endswith(INTERNAL_SUFFIXES)


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@dataclass(frozen=True)
class Target:
    """Where a checked URL points: scheme, host (a name or an address), port and the request's path."""
    scheme: str
    host: str
    port: int
    path: str


@dataclass(frozen=True)
class EgressPolicy:
    """Which webhook destinations are allowed (see the module docstring). ``resolve`` is the name lookup (the
    system's; a test may give its own to play a name that changes its address)."""
    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()
    resolve: Resolver = field(default=resolve, compare=False)

    @classmethod
    def parse(cls, allow: str, resolver: Resolver = resolve) -> EgressPolicy:
        """The policy of an allow-list (``MARGIN_WEBHOOK_ALLOW``): comma-separated hosts and CIDRs. A malformed
        entry is a :class:`ValueError` saying which."""
        hosts, networks = set(), []
        for raw in allow.split(","):
            entry = raw.strip().lower().rstrip(".")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if not _HOST_ENTRY.fullmatch(entry):
                raise ValueError(f"webhook allow-list entry {raw.strip()!r} is neither a host name (or *.domain) "
                                 "nor an address or CIDR")
            hosts.add(entry)
        return cls(frozenset(hosts), tuple(networks), resolver)

    # -- the rules ----------------------------------------------------------------------------------------------
    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return host in self.hosts or any(h.startswith("*.") and host.endswith(h[1:]) for h in self.hosts)

    def address_refusal(self, ip: IPAddress) -> str:
        """Why the address may not be reached, or "" when it may (public, or in an allowed network)."""
        if any(ip.version == net.version and ip in net for net in self.networks):
            return ""
        inner = _embedded_ipv4(ip)
        if inner is not None and any(net.version == 4 and inner in net for net in self.networks):
            return ""
        return why_not_public(ip)

    def check_url(self, url: str, what: str = "webhook_url") -> Target:
        """The static check when a webhook is set: an http(s) URL whose host is not obviously disallowed (an
        internal name, a literal address that is not public); :class:`InvalidArgument` naming ``what``."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as err:
            raise InvalidArgument(f"{what}: not a URL ({err})") from None
        if parts.scheme not in SCHEMES:
            raise InvalidArgument(f"{what} must be an http(s) URL")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise InvalidArgument(f"{what} has no host")
        if parts.username is not None or parts.password is not None:
            raise InvalidArgument(f"{what} must not carry credentials (alerts are signed with webhook_secret)")
        if not self.host_allowed(host):
            ip = _literal(host)
            if ip is not None:
                reason = self.address_refusal(ip)
                if reason:
                    raise InvalidArgument(f"{what}: {host} is {reason}; webhooks go to public addresses only "
                                          "(an operator may allow it: MARGIN_WEBHOOK_ALLOW)")
            elif internal_name(host):
                raise InvalidArgument(f"{what}: {host} is a cluster-internal name; webhooks go to public addresses "
                                      "only (an operator may allow it: MARGIN_WEBHOOK_ALLOW)")
        path = parts.path or "/"
        return Target(parts.scheme, host, port or SCHEMES[parts.scheme], f"{path}?{parts.query}" if parts.query
                      else path)

    def pin(self, url: str) -> tuple[Target, str]:
        """Resolve the URL's host once and check every address: the target and the one address to connect to;
        :class:`Refused` saying why not."""
        try:
            target = self.check_url(url)
        except InvalidArgument as err:
            raise Refused(str(err)) from None
        literal = _literal(target.host)
        if literal is not None:
            addresses = [str(literal)]
        else:
            try:
                addresses = self.resolve(target.host, target.port)
            except OSError as err:
                raise Refused(f"{target.host} does not resolve: {err}") from None
        if not addresses:
            raise Refused(f"{target.host} resolves to no address")
        if not self.host_allowed(target.host):
            for address in addresses:
                reason = self.address_refusal(ipaddress.ip_address(address.split("%", 1)[0]))
                if reason:
                    raise Refused(f"{target.host} resolves to {address}, {reason}")
        return target, addresses[0]

    # -- sending ------------------------------------------------------------------------------------------------
    def post(self, url: str, body: bytes, headers: dict[str, str], timeout_s: float = 5.0) -> int:
        """POST ``body`` to ``url`` at the address :meth:`pin` checked; the reply's status. :class:`Refused` when
        the destination is not allowed; :class:`OSError` / :class:`http.client.HTTPException` when it fails."""
        target, address = self.pin(url)
        conn = _connection(target, address, timeout_s)
        try:
            conn.request("POST", target.path, body=body, headers=headers)
            return conn.getresponse().status
        finally:
            conn.close()


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to the name's one checked address (``Host`` stays the name)."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """An HTTPS connection to the name's one checked address; SNI and the certificate check are the name's."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _connection(target: Target, address: str, timeout_s: float) -> http.client.HTTPConnection:
    kind = _PinnedHTTPS if target.scheme == "https" else _PinnedHTTP
    return kind(target.host, target.port, address, timeout_s)
