"""Which ICE candidates of a student's offer the bot will send connectivity checks to.

A candidate is an address and port the remote side asks us to send STUN packets to. Left unchecked, a
student could point the bot at hosts it should never talk to: the machine's own services on loopback,
link-local addresses (cloud metadata at 169.254.169.254), multicast or broadcast. Private LAN ranges stay
allowed (a school network, Docker); loopback only when the bot itself talks to a loopback server (a
development machine, where browser and bot share the host).
"""
from __future__ import annotations

import ipaddress
import logging

log = logging.getLogger("classmood.bot.ice")


def is_loopback_host(host: str) -> bool:
    """localhost or a loopback IP (the bot's server, from its URL)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _allowed(address: str, allow_loopback: bool) -> bool:
    if address.lower().endswith(".local"):     # mDNS names: what browsers put in place of host addresses
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False                           # another DNS name could resolve to anything
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return allow_loopback
    return not (ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved
                or ip == ipaddress.IPv4Address("255.255.255.255"))


def filter_candidates(sdp: str, allow_loopback: bool) -> tuple[str, int]:
    """The SDP without candidate lines whose address the bot must not contact; and how many were dropped."""
    kept, dropped = [], 0
    for line in sdp.splitlines(keepends=True):
        if line.startswith("a=candidate:"):
            fields = line.split()
            if len(fields) < 8 or not _allowed(fields[4], allow_loopback):
                dropped += 1
                continue
        kept.append(line)
    return "".join(kept), dropped


# RTP header extensions the bot declines in its answer. With abs-send-time, aiortc runs a receive-side
# bandwidth estimator on every packet and sends REMB feedback (~10 % of the bot's CPU at 100 students,
# issue 24); a 2 Hz analyser has no use for a bandwidth estimate, and senders then keep their start rate.
DECLINED_EXTENSIONS = ("http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",)


def decline_extensions(sdp: str, uris: tuple[str, ...] = DECLINED_EXTENSIONS) -> str:
    """The offer without those a=extmap lines, so that the answer does not accept them and the sender
    (browser, Janus, aiortc) stops adding them (RFC 8285: only extensions in the answer are used)."""
    def declined(line: str) -> bool:
        fields = line.split()
        return line.startswith("a=extmap:") and len(fields) > 1 and fields[1] in uris
    return "".join(line for line in sdp.splitlines(keepends=True) if not declined(line))
