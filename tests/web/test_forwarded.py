from __future__ import annotations

import ipaddress

import pytest

from slurmproxy.web.forwarded import client_address, parse_address

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:1::/48"))


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "client"),
    [
        pytest.param("203.0.113.9", ["198.51.100.1"], TRUSTED, "203.0.113.9", id="untrusted-peer-ignores-header"),
        pytest.param("10.1.2.3", ["198.51.100.1"], (), "10.1.2.3", id="no-trusted-proxies-configured"),
        pytest.param("10.1.2.3", [], TRUSTED, "10.1.2.3", id="trusted-peer-without-header"),
        pytest.param("10.1.2.3", ["198.51.100.1"], TRUSTED, "198.51.100.1", id="one-trusted-hop"),
        pytest.param("10.1.2.3", ["6.6.6.6, 198.51.100.1, 10.9.9.9"], TRUSTED, "198.51.100.1", id="spoofed-left-part"),
        pytest.param("10.1.2.3", ["6.6.6.6", "198.51.100.1"], TRUSTED, "198.51.100.1", id="two-headers-in-order"),
        pytest.param("10.1.2.3", ["10.4.4.4, 10.5.5.5"], TRUSTED, "10.4.4.4", id="all-trusted-leftmost"),
        pytest.param("10.1.2.3", ["6.6.6.6, garbage"], TRUSTED, "10.1.2.3", id="garbage-hop-stops-at-peer"),
        pytest.param("10.1.2.3", ["garbage, 10.7.7.7"], TRUSTED, "10.7.7.7", id="garbage-behind-trusted-hop"),
        pytest.param("10.1.2.3", ["198.51.100.1:4711"], TRUSTED, "198.51.100.1", id="ipv4-with-port"),
        pytest.param("2001:db8:1::5", ["[2001:db8:2::7]:443"], TRUSTED, "2001:db8:2::7", id="ipv6-bracketed"),
        pytest.param("2001:db8:1::5", ["2001:db8:2::7"], TRUSTED, "2001:db8:2::7", id="ipv6-bare"),
        pytest.param("unix-socket", ["198.51.100.1"], TRUSTED, "unix-socket", id="peer-not-an-address"),
        pytest.param(None, ["198.51.100.1"], TRUSTED, None, id="no-peer"),
    ],
)
def test_client_address(
    peer: str | None,
    forwarded: list[str],
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
    client: str | None,
) -> None:
    assert client_address(peer, forwarded, trusted) == client


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        pytest.param(" 192.0.2.1 ", "192.0.2.1", id="spaces"),
        pytest.param('"[2001:db8::1]:80"', "2001:db8::1", id="quoted-bracketed"),
        pytest.param("[2001:db8::1", None, id="unclosed-bracket"),
        pytest.param("unknown", None, id="rfc7239-unknown"),
        pytest.param("_hidden", None, id="obfuscated"),
    ],
)
def test_parse_address(text: str, parsed: str | None) -> None:
    address = parse_address(text)
    assert (str(address) if address else None) == parsed
