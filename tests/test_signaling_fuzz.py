"""Fuzz the signaling parser: any input is either a valid message or a ProtocolError, never a crash."""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signaling.protocol import ProtocolError, decode, parse, parse_hello

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
                           lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
                           max_leaves=20)
VALID = [
    {"v": 1, "type": "hello", "role": "student", "room": "abc", "key": "k" * 16, "name": "Asha", "analysis": True},
    {"v": 1, "type": "signal", "to": "peer1", "data": {"type": "offer", "sdp": "v=0"}},
    {"v": 1, "type": "consent", "analysis": False},
    {"v": 1, "type": "control", "action": "threshold", "kind": "boredom", "value": 0.5},
    {"v": 1, "type": "state", "state": {"students": []}},
]


def check(raw) -> None:
    for role in ("student", "teacher", "bot"):
        try:
            out = parse(raw, role, 4096)
            assert isinstance(out, dict) and isinstance(out["type"], str)
        except ProtocolError as exc:
            assert exc.code
    try:
        parse_hello(decode(raw, 4096))
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_random_text_and_bytes(raw):
    check(raw)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_random_json(value):
    check(json.dumps(value))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(VALID), st.text(max_size=10), json_values)
def test_mutated_valid_messages(message, key, value):
    mutated = dict(message)
    mutated[key if key else "type"] = value
    check(json.dumps(mutated))
