"""The client address of a request that may have come through trusted reverse proxies (X-Forwarded-For).

Hand-written rather than aiohttp-remotes: its strict mode rejects direct requests that carry no header
(the bot worker and health checks reach the server without the proxy) and also rewrites host and scheme,
and its relaxed modes trust the header from anyone. Here a header counts only when the hop that sent it is
one of the operator's proxies, and only the address changes.
"""
from __future__ import annotations

import ipaddress
from typing import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_HOPS = 20      # a longer chain is not a real proxy path; stop walking it


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:          # "[2001:db8::1]:443"
        text = text[1:text.index("]")]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def client_address(peer: str | None, forwarded_for: Iterable[str], trusted: Sequence[Network]) -> str | None:
    """Walk X-Forwarded-For from the right while the current hop is a trusted proxy; the first address
    added by a trusted hop about an untrusted one is the client. Headers from untrusted peers are ignored,
    and a malformed entry stops the walk (the last trusted hop then stands for the client)."""
    current = _address(peer or "")
    if current is None or not trusted:
        return peer
    entries = [e for value in forwarded_for for e in value.split(",") if e.strip()]
    for entry in reversed(entries[-MAX_HOPS:]):
        if not any(current in net for net in trusted if net.version == current.version):
            break
        hop = _address(entry)
        if hop is None:
            break
        current = hop
    return str(current)


def address_block(address: str | None) -> str:
    """The unit a per-client limit counts: an IPv4 address, or the /64 of an IPv6 one (one subscriber
    usually holds a whole /64, so counting single IPv6 addresses would give them 2^64 allowances)."""
    ip = _address(address or "")
    if ip is None:
        return address or ""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
