"""Fuzz the signaling parser: any str/bytes input is either a valid message or a ProtocolError, never a crash.

A valid result must also be safe to relay: it re-serialises as strict JSON (no NaN/Infinity).
"""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signaling.protocol import ROLES, ProtocolError, clean_name, decode, parse, parse_hello

MAX_BYTES = 4096
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30)
json_values = st.recursive(json_scalars,
                           lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4),
                           max_leaves=20)
VALID = [
    {"v": 1, "type": "hello", "role": "student", "room": "abc", "key": "k" * 16, "name": "Asha", "analysis": True},
    {"v": 1, "type": "hello", "role": "teacher", "room": "abc", "token": "t" * 32},
    {"v": 1, "type": "hello", "role": "bot", "room": "abc", "token": "b" * 32},
    {"v": 1, "type": "hello", "role": "worker", "key": "worker-key"},
    {"v": 1, "type": "ping"},
    {"v": 1, "type": "signal", "to": "peer1", "data": {"type": "offer", "sdp": "v=0"}},
    {"v": 1, "type": "signal", "to": "peer1", "data": {"type": "answer", "sdp": "v=0"}},
    {"v": 1, "type": "consent", "analysis": False},
    {"v": 1, "type": "control", "action": "threshold", "kind": "boredom", "value": 0.5},
    {"v": 1, "type": "control", "action": "ack", "alert_id": "a1"},
    {"v": 1, "type": "control", "action": "mute", "peer_id": "p1"},
    {"v": 1, "type": "session", "session_id": "s1"},
    {"v": 1, "type": "state", "state": {"students": []}},
    {"v": 1, "type": "alert", "alert": {"alert_id": "a1", "message": "m"}},
    {"v": 1, "type": "subscribe", "feed": "p1", "quality": "low"},
]


def check(raw) -> None:
    for role in ROLES:
        try:
            out = parse(raw, role, MAX_BYTES)
        except ProtocolError as exc:
            assert isinstance(exc.code, str) and exc.code and isinstance(exc.message, str)
        else:
            assert isinstance(out, dict) and isinstance(out["type"], str)
            json.dumps(out, allow_nan=False)
    try:
        hello = parse_hello(decode(raw, MAX_BYTES))
    except ProtocolError as exc:
        assert exc.code
    else:
        assert hello["role"] in ROLES
        json.dumps(hello, allow_nan=False)
        if "name" in hello:
            assert 0 < len(hello["name"]) <= 60 and hello["name"].isprintable()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_random_text_and_bytes(raw):
    check(raw)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_random_json(value):
    check(json.dumps(value))
    check(json.dumps({"v": 1, "type": "signal", "data": value}))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(VALID), st.text(max_size=10), json_values, st.booleans())
def test_mutated_valid_messages(message, key, value, nested):
    mutated = json.loads(json.dumps(message))
    target = mutated
    if nested:    # mutate inside a nested object where there is one (signal data, state, alert)
        target = next((v for v in mutated.values() if isinstance(v, dict)), mutated)
    target[key if key else "type"] = value
    check(json.dumps(mutated))
    check(json.dumps(mutated).encode())


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(VALID), st.integers(min_value=0, max_value=200), st.binary(min_size=1, max_size=8))
def test_byte_level_corruption(message, at, junk):
    raw = json.dumps(message).encode()
    at = min(at, len(raw))
    check(raw[:at] + junk + raw[at:])
    check(raw[:at])                        # truncated


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_names_are_printable_single_line_text(raw):
    try:
        name = clean_name(raw)
    except ProtocolError as exc:
        assert exc.code == "bad_field"
    else:
        assert 0 < len(name) <= 60 and name.isprintable() and name == name.strip() and "  " not in name


def test_valid_messages_parse():
    for message in VALID:
        if message["type"] == "hello":
            assert parse_hello(decode(json.dumps(message), MAX_BYTES))["role"] == message["role"]
        else:
            roles = [r for r in ROLES if _accepts(json.dumps(message), r)]
            assert roles, message


def test_size_is_checked_before_parsing():
    big = json.dumps({"v": 1, "type": "ping", "pad": "x" * MAX_BYTES})
    for raw in (big, big.encode(), "é" * (MAX_BYTES // 2 + 1)):
        try:
            parse(raw, "student", MAX_BYTES)
        except ProtocolError as exc:
            assert exc.code == "too_large"
        else:
            raise AssertionError("oversized message accepted")


def _accepts(raw: str, role: str) -> bool:
    try:
        parse(raw, role, MAX_BYTES)
        return True
    except ProtocolError:
        return False
