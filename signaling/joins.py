"""How fast students may join: per client address (IPv6: its /64) and per room, token buckets.

One holder of a student link once filled all 200 seats of a room in 0.4 s from one address, so a real
student got room_full (issue 23). The bursts let a whole class behind one school NAT join at once (50 in
about two seconds, measured in tests/test_hardening.py); beyond them joins come at the sustained rates.
A refused join gets error rate_limited and close 4429 before it is seated, so nothing is announced or written.
"""
from __future__ import annotations

from core.settings import ServerSettings
from signaling.forwarded import address_block
from signaling.rooms import RateLimit

MAX_BUCKETS = 10_000     # bounded memory: beyond, buckets that have refilled are forgotten


class JoinLimits:
    def __init__(self, cfg: ServerSettings) -> None:
        self.cfg = cfg
        self.by_address: dict[str, RateLimit] = {}
        self.by_room: dict[str, RateLimit] = {}

    def allow(self, address: str, room_id: str) -> bool:
        """Take one join from both budgets, or from neither (a join refused by the room's budget does not
        cost its address one)."""
        cfg = self.cfg
        mine = _bucket(self.by_address, address_block(address), cfg.joins_per_second_per_address,
                       cfg.join_burst_per_address)
        room = _bucket(self.by_room, room_id, cfg.joins_per_second_per_room, cfg.join_burst_per_room)
        if not mine.allow():
            return False
        if not room.allow():
            mine.refund()
            return False
        return True


def _bucket(buckets: dict[str, RateLimit], key: str, per_second: float, burst: int) -> RateLimit:
    if len(buckets) > MAX_BUCKETS and key not in buckets:
        for old in [k for k, b in buckets.items() if b.full()]:
            del buckets[old]
    return buckets.setdefault(key, RateLimit(per_second, burst))
