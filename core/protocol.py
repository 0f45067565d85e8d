"""The signaling protocol's vocabulary, shared by the server (signaling/) and the bot (bot/).

One place for what both ends must agree on: the protocol version, message types, roles, error codes,
WebSocket close codes and the teacher's control actions. docs/architecture.md describes the messages;
signaling/protocol.py validates inbound ones (the server's job) using these names.

The enums have plain values (str for codes and types, int for close codes) so they compare equal to,
hash like, format and JSON-encode as the raw values that travel on the wire: `ErrorCode.IDLE == "idle"`,
`f"{CloseCode.REPLACED}" == "4409"`. A client can therefore match on them directly.
"""
from __future__ import annotations

from enum import Enum, IntEnum

VERSION = 1   # every message carries "v": VERSION; the server refuses any other with bad_version


class _StrEnum(str, Enum):
    """A str enum whose str()/format() is its value (enum.StrEnum needs Python 3.11; we support 3.10)."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, format_spec: str) -> str:
        return str.__format__(self, format_spec)


class MessageType(_StrEnum):
    HELLO = "hello"              # client -> server, first message: role + credentials
    WELCOME = "welcome"          # server -> client: your peer id, ICE servers, video constraints...
    ERROR = "error"              # server -> client: {"code": ErrorCode, "message": text}
    PING = "ping"                # any role -> server; answered with pong
    PONG = "pong"
    SIGNAL = "signal"            # SDP offer/answer, student <-> bot only
    CONSENT = "consent"          # student -> server: analysis on/off
    CONTROL = "control"          # teacher -> server -> bot: ack, mute, unmute, threshold
    PARTICIPANT = "participant"  # server -> bot and teachers: joined | left | consent
    BOT = "bot"                  # server -> students and teachers: the bot arrived (peer id) or left (null)
    SESSION = "session"          # bot -> server -> teachers: the session the bot records into
    STATE = "state"              # bot -> server -> teachers: live class state
    ALERT = "alert"              # bot -> server -> teachers: one alert
    INVITE = "invite"            # server -> worker: join this room with this bot token
    # meetings on the SFU (welcome.media.mode == "sfu"; docs/architecture.md "Meetings on the SFU")
    PUBLISH = "publish"          # student/teacher -> server: SDP offer of own camera + microphone
    PUBLISHED = "published"      # server -> publisher: the SFU's SDP answer
    UNPUBLISH = "unpublish"      # student/teacher -> server: stop publishing
    FEEDS = "feeds"              # server -> student/teacher: the feeds this connection may watch (full list)
    SUBSCRIBE = "subscribe"      # student/teacher -> server: watch a feed
    OFFER = "offer"              # server -> subscriber: the SFU's SDP offer for that feed
    ANSWER = "answer"            # subscriber -> server: SDP answer for that feed
    UNSUBSCRIBE = "unsubscribe"  # student/teacher -> server: stop watching a feed
    MEDIA = "media"              # server -> students and teachers: {"event": "reset"} after an SFU restart
    CLASS_ENDED = "class_ended"  # server -> everyone in the room: the teacher ended the class (sockets then close 4411)


class Role(_StrEnum):
    STUDENT = "student"
    TEACHER = "teacher"
    BOT = "bot"
    WORKER = "worker"


ROLES: tuple[str, ...] = tuple(r.value for r in Role)


class ErrorCode(_StrEnum):
    """The `code` of an error message. Every one is sent by the server; a client must not expect others."""

    # from the validation of a message (signaling/protocol.py)
    TOO_LARGE = "too_large"
    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    BAD_VERSION = "bad_version"
    EXPECTED_HELLO = "expected_hello"
    BAD_FIELD = "bad_field"
    BAD_TYPE = "bad_type"
    # from the server's rules
    UNAUTHORIZED = "unauthorized"    # wrong key or token (close 4401): retrying with it is pointless
    UNKNOWN_ROOM = "unknown_room"    # close 4404
    ROOM_FULL = "room_full"          # close 4429
    SERVER_FULL = "server_full"      # close 4503
    TIMEOUT = "timeout"              # no hello in time (close 4408)
    RATE_LIMITED = "rate_limited"    # close 4429
    BAD_TARGET = "bad_target"
    NO_BOT = "no_bot"
    OPTED_OUT = "opted_out"          # a student with analysis off sent an offer
    REPLACED = "replaced"            # another bot took the room (close 4409)
    IDLE = "idle"                    # the bot was dismissed: nobody with it (close 4410)
    BUSY = "busy"                    # too many sockets waiting for hello from one address (close 1013)
    INTERNAL = "internal"
    MEDIA_UNAVAILABLE = "media_unavailable"   # the SFU is away; a media reset follows when it is back
    MEDIA_FAILED = "media_failed"             # the SFU refused a media request (e.g. a malformed SDP)


# What students and teachers send about their media in a meeting (each has its own rate budget).
MEDIA_TYPES: tuple[str, ...] = (MessageType.PUBLISH, MessageType.UNPUBLISH, MessageType.SUBSCRIBE,
                                MessageType.UNSUBSCRIBE, MessageType.ANSWER)
# The simulcast layer a watcher asks for: "low" (the 320x240 layer the bot also takes; a small tile in a
# gallery needs no more) or "high" (full size).
QUALITIES: tuple[str, ...] = ("low", "high")


class CloseCode(IntEnum):
    """WebSocket close codes. 4400..4499: do not retry with the same credentials (see retry_is_pointless)."""

    BAD_HELLO = 4400
    UNAUTHORIZED = 4401
    UNKNOWN_ROOM = 4404
    TIMEOUT = 4408
    REPLACED = 4409          # a bot replaced by a newer bot of the same room
    IDLE = 4410              # a bot dismissed after server.room_idle_seconds alone
    ENDED = 4411             # the teacher ended the class (POST /api/rooms/{room}/end): its session is over
    LIMIT = 4429             # rate limit or room full
    SERVER_FULL = 4503       # too many live rooms: retry later
    TRY_AGAIN_LATER = 1013   # busy (RFC 6455 registry); aiohttp's WSCloseCode.TRY_AGAIN_LATER
    GOING_AWAY = 1001        # server shutdown; aiohttp's WSCloseCode.GOING_AWAY
    INTERNAL_ERROR = 1011    # aiohttp's WSCloseCode.INTERNAL_ERROR

    def __str__(self) -> str:   # "4409", not "CloseCode.REPLACED", in logs (as IntEnum does from 3.11)
        return int.__repr__(self)

    def __format__(self, format_spec: str) -> str:
        return int.__format__(self, format_spec)


def retry_is_pointless(close_code: int | None) -> bool:
    """True for the 4400..4499 close codes: the server refused these credentials or this client for good."""
    return close_code is not None and 4400 <= close_code < 4500


class ControlAction(_StrEnum):
    ACK = "ack"
    MUTE = "mute"
    UNMUTE = "unmute"
    THRESHOLD = "threshold"


CONTROL_ACTIONS: tuple[str, ...] = tuple(a.value for a in ControlAction)

# What a teacher's threshold control may change (bot.alerts.AlertEngine.set_threshold).
THRESHOLD_KINDS: tuple[str, ...] = ("confusion", "boredom", "class_share")
# The kinds of alert the bot raises, per student and per class (a subset of THRESHOLD_KINDS).
ALERT_KINDS: tuple[str, ...] = ("confusion", "boredom")

SDP_TYPES: tuple[str, ...] = ("offer", "answer")
# A worker key (server.worker_key, sent in the bot's and the workers' hello) longer than this is refused.
MAX_WORKER_KEY = 256


def websocket_url(base: str, path: str) -> str:
    """The WebSocket URL of `path` on the server at `base`: http(s)://host[:port][/] -> ws(s)://host[:port]/path
    (a base that is already ws:// or wss:// is kept)."""
    base = base.rstrip("/")
    for http, ws in (("https://", "wss://"), ("http://", "ws://")):
        if base.startswith(http):
            base = ws + base[len(http):]
            break
    return base + "/" + path.lstrip("/")
