"""Client addresses and the networks they count in: rate limits and live evidence key on networks,
since one holder of many addresses (an IPv6 /64, an IPv4 tunnelled in IPv6) must not be many
clients."""

from __future__ import annotations

import ipaddress

from flywheel_common.settings import EvidenceSettings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(host: str) -> Address | None:
    """The client's address, an IPv4 one carried inside IPv6 (mapped, 6to4, Teredo) as itself; None
    for anything that is not an address."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo and address.teredo[1])
        if embedded:
            return embedded
    return address


def peer_host(peer: str) -> str:
    """The address in a gRPC peer string ("ipv4:203.0.113.7:5000", "ipv6:[2001:db8::1]:5000");
    "" for any other transport (a Unix socket)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return ""


def network_block(address: Address, ipv4_prefix_length: int, ipv6_prefix_length: int) -> str:
    """The address block of the given prefix length around an address, in CIDR notation."""
    length = ipv4_prefix_length if address.version == 4 else ipv6_prefix_length
    return str(ipaddress.ip_network(f"{address}/{length}", strict=False))


def client_network(host: str, evidence: EvidenceSettings) -> str:
    """The network a client counts in for live evidence: its /24 or IPv6 /48 (the settings' prefix
    lengths); "" for a loopback client (the host itself: the local stack), anything that is not an
    address, or with evidence per network turned off."""
    address = parse_address(host)
    if address is None or address.is_loopback or not evidence.enabled:
        return ""
    return network_block(address, evidence.ipv4_prefix_length, evidence.ipv6_prefix_length)
