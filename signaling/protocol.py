"""Signaling protocol v1: validation of every inbound message and builders for outbound ones.

Pure functions, no I/O: `parse(raw, role, max_bytes)` returns a validated dict or raises
ProtocolError; no other exception escapes for any input (it is fuzzed in the tests).
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any

VERSION = 1
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{8,128}$")
MAX_NAME = 60
MAX_SDP = 12_000
ROLES = ("student", "teacher", "bot", "worker")
CONTROL_ACTIONS = ("ack", "mute", "unmute", "threshold")
THRESHOLD_KINDS = ("confusion", "boredom", "class_share")


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def clean_name(value: Any) -> str:
    """A display name: text, control characters removed, trimmed, 1..60 characters."""
    if not isinstance(value, str):
        raise ProtocolError("bad_field", "name must be a string")
    cleaned = "".join(ch for ch in value if unicodedata.category(ch)[0] != "C").strip()
    if not cleaned:
        raise ProtocolError("bad_field", "name must not be empty")
    if len(cleaned) > MAX_NAME:
        raise ProtocolError("bad_field", f"name longer than {MAX_NAME} characters")
    return cleaned


def _id(value: Any, field: str, pattern: re.Pattern = ID_RE) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise ProtocolError("bad_field", f"{field} is missing or malformed")
    return value


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError("bad_field", f"{field} must be true or false")
    return value


def decode(raw: str | bytes, max_bytes: int) -> dict[str, Any]:
    """Size check on the raw text, JSON, object with v == 1 and a string type."""
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) > max_bytes:
            raise ProtocolError("too_large", f"message larger than {max_bytes} bytes")
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("bad_json", "message is not UTF-8 text") from None
    if not isinstance(raw, str):
        raise ProtocolError("bad_json", "message must be text")
    if len(raw) > max_bytes or len(raw.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ProtocolError("too_large", f"message larger than {max_bytes} bytes")
    try:
        data = json.loads(raw, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except (ValueError, RecursionError):
        raise ProtocolError("bad_json", "message is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_message", "message must be a JSON object")
    if data.get("v") != VERSION or isinstance(data.get("v"), bool):
        raise ProtocolError("bad_version", f"unsupported protocol version (expected \"v\": {VERSION})")
    if not isinstance(data.get("type"), str):
        raise ProtocolError("bad_message", "message has no type")
    return data


def parse_hello(data: dict[str, Any]) -> dict[str, Any]:
    if data.get("type") != "hello":
        raise ProtocolError("expected_hello", "the first message must be hello")
    role = data.get("role")
    if role not in ROLES:
        raise ProtocolError("bad_field", "role must be student, teacher, bot or worker")
    if role == "worker":
        key = data.get("key")
        if not isinstance(key, str) or not 1 <= len(key) <= 256:
            raise ProtocolError("bad_field", "key is missing or malformed")
        return {"type": "hello", "role": role, "key": key}
    out: dict[str, Any] = {"type": "hello", "role": role, "room": _id(data.get("room"), "room")}
    if role == "student":
        out["key"] = _id(data.get("key"), "key", TOKEN_RE)
        out["name"] = clean_name(data.get("name"))
        out["analysis"] = _bool(data.get("analysis", True), "analysis")
    else:
        out["token"] = _id(data.get("token"), "token", TOKEN_RE)
    return out


def parse(raw: str | bytes, role: str, max_bytes: int) -> dict[str, Any]:
    """Validate a message after hello, for a connection of `role`."""
    data = decode(raw, max_bytes)
    kind = data["type"]
    if kind == "ping":
        return {"type": "ping"}
    if kind == "signal" and role in ("student", "bot"):
        payload = data.get("data")
        if not isinstance(payload, dict) or payload.get("type") not in ("offer", "answer"):
            raise ProtocolError("bad_field", "signal data must be an offer or an answer")
        sdp = payload.get("sdp")
        if not isinstance(sdp, str) or not 0 < len(sdp) <= MAX_SDP:
            raise ProtocolError("bad_field", f"sdp must be a string of at most {MAX_SDP} characters")
        return {"type": "signal", "to": _id(data.get("to"), "to"), "data": {"type": payload["type"], "sdp": sdp}}
    if kind == "consent" and role == "student":
        return {"type": "consent", "analysis": _bool(data.get("analysis"), "analysis")}
    if kind == "control" and role == "teacher":
        action = data.get("action")
        if action not in CONTROL_ACTIONS:
            raise ProtocolError("bad_field", "unknown control action")
        out: dict[str, Any] = {"type": "control", "action": action}
        if action == "ack":
            out["alert_id"] = _id(data.get("alert_id"), "alert_id")
        elif action in ("mute", "unmute"):
            out["peer_id"] = _id(data.get("peer_id"), "peer_id")
        else:
            value = data.get("value")
            if data.get("kind") not in THRESHOLD_KINDS:
                raise ProtocolError("bad_field", "threshold kind must be confusion, boredom or class_share")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0.0 <= value <= 1.0:
                raise ProtocolError("bad_field", "threshold value must be a number in [0, 1]")
            out.update(kind=data["kind"], value=float(value))
        return out
    if role == "bot":
        if kind == "session":
            return {"type": "session", "session_id": _id(data.get("session_id"), "session_id")}
        if kind == "state" and isinstance(data.get("state"), dict):
            return {"type": "state", "state": data["state"]}
        if kind == "alert" and isinstance(data.get("alert"), dict):
            return {"type": "alert", "alert": data["alert"]}
    raise ProtocolError("bad_type", f"message type {kind[:40]!r} is not allowed for a {role}")


def error(code: str, message: str) -> dict[str, Any]:
    return {"v": VERSION, "type": "error", "code": code, "message": message}


def message(message_type: str, /, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "type": message_type, **fields}
