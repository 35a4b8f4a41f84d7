"""The outbound-address guard: which addresses a worker may connect to for a URL a request named.

A request can name a URL a worker then connects to (a webhook's ``callback_url``). Unguarded, any
submitter could make the fleet reach what only the fleet can reach: the cloud metadata service
(credentials), Redis on loopback, private admin ports. So a worker refuses loopback, private,
link-local, shared (CGNAT), multicast, reserved and unspecified addresses, and the metadata
addresses, unless ``UPLOADER_OUTBOUND_ALLOW`` (comma-separated host names and CIDRs) allows them.

The check is on the *resolved* address, at connect time, and the connection is made to the
very address checked (:func:`connect`): a name that resolves to a public address when checked
and to 127.0.0.1 when connected (DNS rebinding) cannot slip through. Redirects are not followed
(see :mod:`uploader.notify.webhook`), so no second URL escapes the check.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Metadata services reachable from instances (AWS/GCP/Azure/OpenStack; Alibaba; AWS over IPv6).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "100.100.100.200", "fd00:ec2::254", "169.254.170.2")
)


class OutboundRefused(Exception):
    """The URL's address is not one a worker may connect to; the message says why (no secrets)."""


@dataclass(frozen=True)
class OutboundPolicy:
    """The allowlist: host names (exact, case-insensitive) and networks."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str) -> OutboundPolicy:
        """From ``UPLOADER_OUTBOUND_ALLOW``: ``host,10.0.0.0/8,127.0.0.1`` (an address alone is
        its own /32 or /128)."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def refusal(self, host: str, address: IPAddress) -> str | None:
        """Why ``address`` (which ``host`` resolved to) is refused, or None if it may be reached."""
        if host.lower().rstrip(".") in self.hosts or any(address in net for net in self.networks if net.version == address.version):
            return None
        kind = address_kind(address)
        if kind is None:
            return None
        return f"{host} resolves to {address}, a {kind} address; allow it in UPLOADER_OUTBOUND_ALLOW to reach it"


def address_kind(address: IPAddress) -> str | None:
    """What makes ``address`` internal (``loopback``, ``private``...), or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address_kind(address.ipv4_mapped)
    if address in METADATA_ADDRESSES:
        return "metadata service"
    for kind, test in (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("unspecified", address.is_unspecified),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    ):
        if test:
            return kind
    if isinstance(address, ipaddress.IPv4Address) and address in ipaddress.ip_network("100.64.0.0/10"):
        return "shared (carrier-grade NAT)"
    return None


def connect(host: str, port: int, policy: OutboundPolicy, timeout: float) -> socket.socket:
    """A TCP connection to ``host``:``port`` through the first resolved address the policy
    allows. Raises :class:`OutboundRefused` when it allows none of them (naming the first
    refused one), ``OSError`` when none of the allowed ones answers."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    refused: str | None = None
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        why = policy.refusal(host, address)
        if why is not None:
            refused = refused or why
            continue
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    if error is not None:
        raise error
    raise OutboundRefused(refused or f"{host} resolves to no address")
