"""The client's address for the audit record: the TCP peer, or what trusted proxies say in front of it.

``X-Forwarded-For`` is believed only when the TCP peer is one of ``server.trusted_proxies``. Each
proxy appends the address it saw, so the list is read from the right: trusted hops are skipped and
the first untrusted address is the client. A hop that is not an IP address ends the walk at the
last trusted hop (whoever wrote it is not believed). A peer that is not trusted is the client,
whatever the headers say.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(text: str) -> Address | None:
    """An IP address from a forwarding hop: ``192.0.2.1``, ``192.0.2.1:4711``, ``[2001:db8::1]:4711``."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _trusted(address: Address, trusted: Sequence[Network]) -> bool:
    return any(address.version == net.version and address in net for net in trusted)


def client_address(peer: str | None, forwarded_for: Iterable[str], trusted: Sequence[Network]) -> str | None:
    """The client address: ``peer`` unless it is a trusted proxy, else the nearest untrusted forwarded hop."""
    if peer is None or not trusted:
        return peer
    peer_address = parse_address(peer)
    if peer_address is None or not _trusted(peer_address, trusted):
        return peer
    hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
    client = peer_address
    for hop in reversed(hops):
        address = parse_address(hop)
        if address is None:
            break
        client = address
        if not _trusted(address, trusted):
            break
    return str(client)
