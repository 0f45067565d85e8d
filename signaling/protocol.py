"""Signaling protocol v1: validation of every inbound message and builders for outbound ones.

Pure functions, no I/O. `decode(raw, max_bytes)` checks size, JSON, object, "v": 1 and a string
"type"; `parse_hello(obj)` validates a first message; `parse(raw, role, max_bytes)` validates a
message after hello for a connection of `role`. They return a new, validated dict (only the known
fields, cleaned) or raise ProtocolError(code, message); no other exception escapes for any str or
bytes input (tests/test_signaling_fuzz.py fuzzes them).

The vocabulary (version, message types, roles, error and close codes, control actions, threshold
kinds) is core/protocol.py, shared with the bot; it is re-exported here for the server's modules.
A new inbound message type is one entry in INBOUND (who may send it, how it is validated) plus its
handler in signaling/relay.py.
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any, Callable

from core.protocol import (CONTROL_ACTIONS, MAX_WORKER_KEY, MEDIA_TYPES, QUALITIES, ROLES, SDP_TYPES, THRESHOLD_KINDS, VERSION,
                           CloseCode, ErrorCode, MessageType, Role)

__all__ = ["VERSION", "ROLES", "CONTROL_ACTIONS", "THRESHOLD_KINDS", "SDP_TYPES", "MEDIA_TYPES", "QUALITIES", "CloseCode", "ErrorCode",
           "MessageType", "Role", "ProtocolError", "INBOUND", "decode", "parse", "parse_hello", "parse_hello_raw",
           "clean_name", "clean_title", "clean_text", "is_id", "message", "error", "welcome", "participant",
           "bot_presence", "signal_from", "control_from", "invite"]

ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")         # room, peer, session and alert ids
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{8,128}\Z")     # join keys, teacher and bot tokens (url-safe base64)
MAX_NAME = 60
MAX_TITLE = 120
MAX_SDP = 12_000          # characters; the message size limit applies as well
MAX_SDP_MEDIA = 4         # a student sends one video section (browsers may add audio/data ones)
MAX_SDP_CANDIDATES = 32   # each one is an address the bot will probe; browsers gather a handful


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---- field checks ----------------------------------------------------------------------------
def clean_text(value: Any, field: str, max_len: int, allow_empty: bool = False) -> str:
    """Text with control/format characters (category C: NUL, newlines, bidi overrides...) and line/paragraph
    separators removed, runs of white space collapsed to one space, trimmed."""
    if not isinstance(value, str):
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{field} must be a string")
    if len(value) > 4 * max_len:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{field} longer than {max_len} characters")
    kept = "".join(ch for ch in value if unicodedata.category(ch)[0] != "C" and unicodedata.category(ch) not in ("Zl", "Zp"))
    cleaned = " ".join(kept.split())
    if not cleaned and not allow_empty:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{field} must not be empty")
    if len(cleaned) > max_len:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{field} longer than {max_len} characters")
    return cleaned


def clean_name(value: Any) -> str:
    """A display name: text, control characters removed, trimmed, 1..60 characters."""
    return clean_text(value, "name", MAX_NAME)


def clean_title(value: Any) -> str:
    """A room title: like a name, 0..120 characters."""
    return clean_text("" if value is None else value, "title", MAX_TITLE, allow_empty=True)


def is_id(value: Any) -> bool:
    return isinstance(value, str) and ID_RE.match(value) is not None


def _id(value: Any, field: str, pattern: re.Pattern = ID_RE) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{field} is missing or malformed")
    return value


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{field} must be true or false")
    return value


def _unit(value: Any, field: str) -> float:
    # Range first: math.isfinite(10**400) raises OverflowError, and JSON ints have no size limit.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1 \
            or not math.isfinite(value):
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{field} must be a number in [0, 1]")
    return float(value)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):       # 1e999 -> inf would be re-sent as the non-JSON `Infinity`
        raise ValueError("non-finite number")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# ---- inbound ---------------------------------------------------------------------------------
def decode(raw: str | bytes, max_bytes: int) -> dict[str, Any]:
    """Size check on the raw text, JSON, object with v == 1 and a string type."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        if len(raw) > max_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"message larger than {max_bytes} bytes")
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(ErrorCode.BAD_JSON, "message is not UTF-8 text") from None
    if not isinstance(raw, str):
        raise ProtocolError(ErrorCode.BAD_JSON, "message must be text")
    if len(raw) > max_bytes or len(raw.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"message larger than {max_bytes} bytes")
    try:
        data = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_JSON, "message is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "message must be a JSON object")
    version = data.get("v")
    if isinstance(version, bool) or not isinstance(version, int) or version != VERSION:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"unsupported protocol version (expected \"v\": {VERSION})")
    if not isinstance(data.get("type"), str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "message has no type")
    return data


def parse_hello(data: dict[str, Any]) -> dict[str, Any]:
    """The first message of a connection (a decoded object)."""
    if not isinstance(data, dict) or data.get("type") != "hello":
        raise ProtocolError(ErrorCode.EXPECTED_HELLO, "the first message must be hello")
    role = data.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise ProtocolError(ErrorCode.BAD_FIELD, "role must be student, teacher, bot or worker")
    if role == "worker":
        out_worker = {"type": "hello", "role": role, "key": _worker_key(data.get("key"), "key is missing or malformed")}
        if data.get("worker") is not None:
            # The worker's own id, the one it renews its room leases under in the database (optional: an
            # older worker without one gets an id from the server and its rooms are leased under that).
            out_worker["worker"] = _id(data.get("worker"), "worker")
        return out_worker
    out: dict[str, Any] = {"type": "hello", "role": role, "room": _id(data.get("room"), "room")}
    if role == "student":
        out["key"] = _id(data.get("key"), "key", TOKEN_RE)
        out["name"] = clean_name(data.get("name"))
        out["analysis"] = _bool(data.get("analysis", True), "analysis")
    else:
        out["token"] = _id(data.get("token"), "token", TOKEN_RE)
    if role == "bot" and data.get("key") is not None:
        # The operator's worker key: with it, the teacher token may also seat a bot (`python -m bot join`).
        out["key"] = _worker_key(data.get("key"), "key is malformed")
    return out


def _worker_key(value: Any, message: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_WORKER_KEY:
        raise ProtocolError(ErrorCode.BAD_FIELD, message)
    return value


def parse_hello_raw(raw: str | bytes, max_bytes: int) -> dict[str, Any]:
    return parse_hello(decode(raw, max_bytes))


def _signal(data: dict[str, Any]) -> dict[str, Any]:
    payload = data.get("data")
    if not isinstance(payload, dict) or payload.get("type") not in SDP_TYPES:
        raise ProtocolError(ErrorCode.BAD_FIELD, "signal data must be an offer or an answer")
    return {"type": "signal", "to": _id(data.get("to"), "to"), "data": {"type": payload["type"],
                                                                        "sdp": _sdp(payload.get("sdp"))}}


def _sdp(sdp: Any) -> str:
    """An SDP within the size, media-section and ICE-candidate limits (every SDP a client sends)."""
    if not isinstance(sdp, str) or not 0 < len(sdp) <= MAX_SDP:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"sdp must be a string of 1 to {MAX_SDP} characters")
    lines = sdp.splitlines()
    if sum(line.startswith("m=") for line in lines) > MAX_SDP_MEDIA \
            or sum(line.startswith("a=candidate:") for line in lines) > MAX_SDP_CANDIDATES:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"sdp may carry at most {MAX_SDP_MEDIA} media sections and "
                                         f"{MAX_SDP_CANDIDATES} ICE candidates")
    return sdp


def _media(data: dict[str, Any]) -> dict[str, Any]:
    """Meeting messages of students and teachers: publish {sdp}, unpublish, (un)subscribe {feed}, answer;
    subscribe may name the simulcast layer wanted ("quality": low or high)."""
    kind = data["type"]
    if kind == MessageType.PUBLISH:
        return {"type": kind, "sdp": _sdp(data.get("sdp"))}
    if kind == MessageType.UNPUBLISH:
        return {"type": kind}
    out = {"type": kind, "feed": _id(data.get("feed"), "feed")}
    if kind == MessageType.ANSWER:
        out["sdp"] = _sdp(data.get("sdp"))
    if kind == MessageType.SUBSCRIBE and data.get("quality") is not None:
        quality = data.get("quality")
        if not isinstance(quality, str) or quality not in QUALITIES:
            raise ProtocolError(ErrorCode.BAD_FIELD, "quality must be low or high")
        out["quality"] = quality
    return out


def _control(data: dict[str, Any]) -> dict[str, Any]:
    action = data.get("action")
    if not isinstance(action, str) or action not in CONTROL_ACTIONS:
        raise ProtocolError(ErrorCode.BAD_FIELD, "control action must be ack, mute, unmute or threshold")
    out: dict[str, Any] = {"type": "control", "action": action}
    if action == "ack":
        out["alert_id"] = _id(data.get("alert_id"), "alert_id")
    elif action in ("mute", "unmute"):
        out["peer_id"] = _id(data.get("peer_id"), "peer_id")
    else:
        kind = data.get("kind")
        if not isinstance(kind, str) or kind not in THRESHOLD_KINDS:
            raise ProtocolError(ErrorCode.BAD_FIELD, "threshold kind must be confusion, boredom or class_share")
        out.update(kind=kind, value=_unit(data.get("value"), "threshold value"))
    return out


def _session(data: dict[str, Any]) -> dict[str, Any]:
    return {"type": "session", "session_id": _id(data.get("session_id"), "session_id")}


def _state(data: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(data.get("state"), dict):
        raise ProtocolError(ErrorCode.BAD_FIELD, "state must be an object")
    return {"type": "state", "state": data["state"]}


def _alert(data: dict[str, Any]) -> dict[str, Any]:
    alert = data.get("alert")
    if not isinstance(alert, dict):
        raise ProtocolError(ErrorCode.BAD_FIELD, "alert must be an object")
    _id(alert.get("alert_id"), "alert.alert_id")
    return {"type": "alert", "alert": alert}


# Every message type a connection may send after hello: the roles allowed to send it and its validator
# (decoded dict -> the clean dict the server acts on). Any other (type, role) is `bad_type`.
INBOUND: dict[str, tuple[frozenset[str], Callable[[dict[str, Any]], dict[str, Any]]]] = {
    MessageType.PING: (frozenset(ROLES), lambda _data: {"type": "ping"}),
    MessageType.SIGNAL: (frozenset({Role.STUDENT, Role.BOT}), _signal),
    MessageType.CONSENT: (frozenset({Role.STUDENT}),
                          lambda data: {"type": "consent", "analysis": _bool(data.get("analysis"), "analysis")}),
    MessageType.CONTROL: (frozenset({Role.TEACHER}), _control),
    MessageType.SESSION: (frozenset({Role.BOT}), _session),
    MessageType.STATE: (frozenset({Role.BOT}), _state),
    MessageType.ALERT: (frozenset({Role.BOT}), _alert),
    **{kind: (frozenset({Role.STUDENT, Role.TEACHER}), _media) for kind in MEDIA_TYPES},
    # In a meeting the bot sends subscribe {feed} only to have a feed it lost offered again (signaling/meeting.py).
    MessageType.SUBSCRIBE: (frozenset({Role.STUDENT, Role.TEACHER, Role.BOT}), _media),
}


def parse(raw: str | bytes, role: str, max_bytes: int) -> dict[str, Any]:
    """Validate a message after hello, for a connection of `role` (student, teacher, bot, worker)."""
    data = decode(raw, max_bytes)
    kind = data["type"]
    entry = INBOUND.get(kind)
    if entry is not None and role in entry[0]:
        return entry[1](data)
    raise ProtocolError(ErrorCode.BAD_TYPE, f"message type {kind[:40]!r} is not allowed for a {role}")


# ---- outbound --------------------------------------------------------------------------------
def message(message_type: str, /, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "type": message_type, **fields}


def error(code: str, text: str) -> dict[str, Any]:
    return message("error", code=code, message=text)


def welcome(peer_id: str, role: str, *, ice_servers: list[dict[str, Any]] | None = None,
            video: dict[str, int] | None = None, bot: str | None = None, session_id: str | None = None,
            participants: list[dict[str, Any]] | None = None, media: dict[str, Any] | None = None) -> dict[str, Any]:
    """Students get no participant list (pass None); teachers and the bot get one. `media`: how the room's
    audio/video flows ({"mode": "sfu", ...} in a meeting; straight to the bot when absent)."""
    out = message("welcome", peer_id=peer_id, role=role)
    if role != "worker":
        out.update(ice_servers=ice_servers or [], video=video or {}, bot=bot, session_id=session_id,
                   media=media or {"mode": "direct"})
    if participants is not None and role in ("teacher", "bot"):
        out["participants"] = participants
    return out


def participant(event: str, peer_id: str, name: str, analysis: bool) -> dict[str, Any]:
    """Presence for the bot and teachers: event joined | left | consent."""
    return message("participant", event=event, peer_id=peer_id, name=name, analysis=analysis)


def bot_presence(peer_id: str | None) -> dict[str, Any]:
    return message("bot", peer_id=peer_id)


def signal_from(sender: str, data: dict[str, Any]) -> dict[str, Any]:
    return message("signal", **{"from": sender}, data=data)


def control_from(teacher: str, control: dict[str, Any]) -> dict[str, Any]:
    return message("control", **{"from": teacher}, **{k: v for k, v in control.items() if k != "type"})


def invite(room_id: str, token: str) -> dict[str, Any]:
    return message("invite", room=room_id, token=token)
