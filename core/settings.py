"""The one typed settings object. Defaults work on loopback; override by env var or CLI flag.

Every field `section.name` is read from env `CLASSMOOD_SECTION_NAME` and from the CLI flag
`--section-name` (flags win over env, env wins over defaults). Example: `server.port` is
`CLASSMOOD_SERVER_PORT=8080` or `--server-port 8080`.
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from core.protocol import MAX_WORKER_KEY
from core.simulcast import HEADROOM as SAMPLING_HEADROOM, min_video_fps

DEV_WORKER_KEY = "dev-worker-key-change-me"   # server.worker_key's public default (loopback only)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DETECTORS = ("auto", "short", "full")     # models.runtime.detector.make_detector's choices


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    # Base URL put in printed/shared links; empty = http://host:port (the server's API then uses the
    # address the request came to, so links work behind port 0 or 0.0.0.0)
    public_url: str = ""
    # JSON list of RTCIceServer dicts for browsers and the bot; empty on loopback (ICE stalls otherwise).
    ice_servers: str = "[]"
    max_message_bytes: int = 16_384        # one signaling WebSocket message (an SDP offer is ~3-6 KB)
    max_bot_message_bytes: int = 262_144   # the bot's live state for a 50-student class is ~20-40 KB
    max_rooms: int = 1000
    max_participants_per_room: int = 200  # students per room
    max_teachers_per_room: int = 10       # teacher connections (tabs, devices) per room, seated apart from students
    # Shared secret that bot workers present to receive room assignments.
    # `python -m bot run` makes up a random one per process when none is given (scripts/run.sh keeps one in
    # .classmood-worker-key beside the database); this public development value is refused off loopback.
    worker_key: str = DEV_WORKER_KEY
    # A bot worker holds each of its rooms under a lease in the database (room_assignments) and renews it
    # every fifth of this; a worker that stops renewing (killed, frozen, cut off) loses its rooms to another
    # worker once the lease runs out, and the server looks for such rooms every second. Shorter: faster
    # failover; too short: a worker starved of CPU for that long loses its rooms for nothing.
    worker_lease_seconds: float = 5.0
    # Capture constraints the server asks student browsers for: what analysis needs, no more.
    video_width: int = 320
    video_height: int = 240
    # Frames/s a student's camera track sends the bot (its maxFramerate). The track is for analysis only, so it
    # sends what bot.sample_hz needs: at least 1.2 x it (the bot samples 5 % fast and a camera's frames are not
    # evenly spaced); every frame costs the bot packets and a decode whether it is analysed or not (issue 24).
    video_fps: int = 3
    # The most a student's camera track may send the bot, in kbit/s (the browser's sender cap): 30 kbit a frame at
    # video_fps, as the meeting's low simulcast layer (150 at 5 fps, core.simulcast); faces through VP8 at that
    # budget score as clean ones (models.evaluate --degrade vp8@3:90 and vp8:150). Uncapped, a browser that gets
    # no bandwidth feedback from the bot sends ~300: at 100 students the bot's socket buffers overflowed and whole
    # connections were lost (issue 24).
    video_kbps: int = 90
    # --- per-connection limits of the signaling server ---
    hello_timeout_seconds: float = 10.0    # a /ws socket that sends no hello within this is closed
    # Sockets one client address (IPv6: its /64) may have open before their hello; beyond, new ones are
    # closed at once with 1013 (try again later), so one host cannot use up the server's file descriptors.
    max_pending_hellos_per_address: int = 128   # generous: behind NAT a whole class shares one address
    heartbeat_seconds: float = 20.0        # WebSocket ping interval; a peer that misses the pong is dropped
    messages_per_second: float = 20.0      # sustained message rate per student/teacher socket (the bot gets 10x)
    message_burst: int = 50                # messages accepted at once; beyond the rate: error + close
    room_idle_seconds: float = 600.0       # a room nobody is connected to is unloaded from memory (kept in the store)
    # POST /api/rooms needs no account: each client address may create this many rooms at once, then one
    # per 60/N seconds (429 beyond), so one script cannot fill max_rooms and lock teachers out.
    rooms_per_minute_per_address: float = 10.0
    # Reverse proxies in front of the server: comma-separated IPs or networks (e.g. "172.16.0.0/12").
    # Only a request from one of them has its client address (rate limit, logs) taken from
    # X-Forwarded-For; anyone else's header is ignored. Empty = no proxy trusted.
    trusted_proxies: str = ""
    # --- limits on every connection (signaling/guard.py) ---
    header_timeout_seconds: float = 10.0   # a new connection must send a complete request head within this
    body_timeout_seconds: float = 10.0     # a request body (POST /api/rooms) must arrive within this
    idle_timeout_seconds: float = 30.0     # a kept-alive connection with no new request is closed after this
    # Open connections (HTTP and WebSocket) per client address (IPv6: its /64); beyond, new ones are cut at
    # once. Generous: behind a school NAT a class of 200 shares one address (one socket + page loads each).
    max_connections_per_address: int = 512
    # Student joins: each address (IPv6: /64) may join `join_burst_per_address` students at once, then
    # `joins_per_second_per_address`; each room `join_burst_per_room`, then `joins_per_second_per_room`.
    # Beyond: error rate_limited, close 4429, nothing written. A class of 50 behind one NAT joins at once.
    joins_per_second_per_address: float = 2.0
    join_burst_per_address: int = 60
    joins_per_second_per_room: float = 5.0
    join_burst_per_room: int = 100
    # TURN relays with coturn's REST-API credentials (use-auth-secret): the server mints a username
    # "<expiry>:<peer id>" and credential base64(HMAC-SHA1(turn_secret, username)) per connection for
    # these comma-separated turn:/turns: URLs, valid for turn_ttl_seconds. Empty = none (only ice_servers).
    turn_urls: str = ""
    turn_secret: str = ""
    turn_ttl_seconds: float = 14_400.0     # longer than a class: coturn refuses to refresh an expired one
    # --- meetings on the SFU (janus.mode != off) ---
    students_see_students: bool = False   # students watch each other too (the teacher always sees everyone)
    meeting_video_width: int = 640        # camera constraints in a meeting: for people; the bot subscribes
    meeting_video_height: int = 480       # to the lowest simulcast layer, which is all 2 Hz analysis needs
    meeting_video_fps: int = 15
    # A page watching this many feeds or more gets its small tiles (<= 400 device px wide) as the low simulcast
    # layer (half size, 5 frames/s, ~150 kbit/s instead of ~600): a teacher's gallery of a large class. 0 = never.
    meeting_gallery_low_from: int = 7


JANUS_MODES = ("embedded", "external", "off")


@dataclass(frozen=True)
class JanusSettings:
    # embedded: `python -m bot run` starts Debian's Janus as a child process on loopback (secrets made up
    # per run); external: use the Janus at `url` with these secrets; off: no meeting, students send video
    # to the bot directly.
    mode: str = "embedded"
    url: str = ""                          # ws://host:8188/ of an external Janus (WebSocket transport)
    api_secret: str = ""                   # Janus's general.api_secret
    admin_key: str = ""                    # the VideoRoom plugin's admin_key (room creation)
    port: int = 0                          # embedded: WebSocket API port on 127.0.0.1 (0 = any free port)
    rtp_ports: str = "20000-40000"         # embedded: UDP ports for media
    connect_timeout_seconds: float = 5.0


@dataclass(frozen=True)
class BotSettings:
    sample_hz: float = 2.0                 # analysed frames per student per second (at least; see bot/peer.py)
    queue_frames: int = 1                  # per-student pending frames; older ones are dropped
    stall_seconds: float = 10.0            # no frame for this long -> student shown as not connected until video resumes
    inference_threads: int = 1             # TFLite interpreter threads
    # Run detection and classification in a child process (bot/inference_process.py), so that inference
    # never waits for the event loop's GIL; false = a thread of the bot's own process.
    inference_process: bool = True
    # How many such processes, each analysing its share of the students (bot/inference_process.py
    # InferencePool): one process uses one core at most. 0 = one per CPU core the bot may use, at most 4.
    inference_processes: int = 0
    max_batch: int = 64                    # frames per detector/classifier batch
    min_face_score: float = 0.5
    # Run the face detector on every Nth sample of a student and follow the face by template matching in
    # between (models/runtime/tracking.py); 1 = detect every sample. docs/performance.md has the cost.
    redetect_every: int = 4
    # With model.flip_average: classify each student's face and its mirror image on alternate samples (one
    # classifier pass per sample; the signals average the two over time) instead of both every sample.
    alternate_mirror: bool = True
    state_push_hz: float = 1.0             # live-state pushes to the teacher per second
    # Nice increment of the inference processes: when the machine is short of CPU, the meeting (Janus), the
    # bot's connections and the server go first, and analysis takes what is left, dropping stale frames
    # rather than starving the connections (at 100 students via Janus on 2 cores, unniced inference
    # processes starved the event loop until 22 media connections failed). 0 = the same priority as the bot.
    inference_nice: int = 5


@dataclass(frozen=True)
class ModelSettings:
    model: str = "ferplus"                 # ferplus | fer2013 | path to a .tflite file
    detector: str = "auto"                 # auto (short, full range where it found nobody, then close-up) | short | full
    flip_average: bool = True              # average each face with its mirror image (+0.5 pt, 2x classifier cost)
    calibrated: bool = True                # apply the temperature shipped in the model's .json (models.calibrate)


@dataclass(frozen=True)
class StorageSettings:
    url: str = "sqlite:///classmood.sqlite"
    flush_seconds: float = 0.25            # batched writes: at most this much delay before a commit (4 a second)
    max_pending_rows: int = 100_000        # rows kept in memory while the database is unavailable
    # Sessions are erased this many days after they end (checked hourly by the server); 0 = keep until
    # the teacher deletes them. Storage limitation: expression data should not outlive its use.
    retention_days: float = 90.0


@dataclass(frozen=True)
class SignalSettings:
    window_seconds: float = 30.0           # sliding window for per-student confusion/boredom
    # Thresholds on the score relative to the student's own baseline (docs/signals.md, "Choosing the
    # defaults", measured with `python -m bot.signals_bench`).
    confusion_threshold: float = 0.25
    boredom_threshold: float = 0.5
    hysteresis: float = 0.1                # a raised condition clears only below threshold - hysteresis
    student_min_seconds: float = 10.0      # a student's condition must hold this long before an alert
    class_share_threshold: float = 0.4     # share of analysed students above threshold for a class alert
    class_min_seconds: float = 10.0
    cooldown_seconds: float = 120.0        # no repeat of the same alert within this time
    # Scored students a class needs for a class alert: 2, so that one opt-out in a class of three does not
    # switch class alerts off (issue 20); with min_students_above_for_class_alert a class alert still needs
    # two students at once, so in a pair it never just repeats one student's alert.
    min_students_for_class_alert: int = 2
    min_students_above_for_class_alert: int = 2
    # --- per-student baselines (docs/signals.md, "Baselines"): alerts compare each student with their own
    # usual face, because the classifier reads some resting faces as sad or angry ---
    baseline_seconds: float = 300.0        # the baseline is the median of the student's scores over this span; 0 = off
    baseline_warmup_seconds: float = 60.0  # until a student has this much history, their raw score is used
    baseline_reference_confusion: float = 0.1   # adjusted = clip(score - baseline + reference): a student at
    baseline_reference_boredom: float = 0.3     # their usual reads as a typical resting face does (measured)
    # During the warm-up the raw score must clear the threshold by this margin (0.25 + 0.25 = the old absolute
    # 0.5): a face that reads sad or angry at rest would otherwise alert once in every class's first minute.
    baseline_warmup_margin: float = 0.25
    # --- bot.signals: formulas and their weights (see docs/signals.md) ---
    min_samples: int = 6                   # window samples (with a face, for confusion) before a score is given
    confusion_w_angry: float = 1.0         # per-sample confusion: AU4 brow lowerer + AU7 lid tightener
    confusion_w_fear: float = 0.8          # AU4 + AU7 with raised upper lids
    confusion_w_sad: float = 0.7           # AU4 with inner-brow raise (AU1)
    confusion_w_disgust: float = 0.6       # nose wrinkle, often with lowered brows
    confusion_w_surprise: float = 0.3      # the smaller surprise/confusion co-occurrence component
    confusion_w_happy: float = 1.0         # subtracted: a smile (AU12) counts against confusion
    low_arousal_w_neutral: float = 1.0     # per-sample low arousal = w_neutral * neutral + w_sad * sad
    low_arousal_w_sad: float = 0.5
    stillness_full_scale: float = 0.25     # mean distance from the window's mean expression at which stillness = 0
    boredom_w_low_arousal: float = 0.2     # boredom = weighted sum of these four window terms (sum 1)
    boredom_w_stillness: float = 0.1
    boredom_w_away: float = 0.35           # share of window samples with the face turned away
    boredom_w_absent: float = 0.35         # share of window samples with no face found
    yaw_nose_weight: float = 0.6           # yaw = w_nose * nose offset term + w_ear * ear asymmetry term
    yaw_ear_weight: float = 0.4
    yaw_nose_full_scale: float = 0.5       # nose offset (in inter-ocular distances) that counts as a full turn
    yaw_attentive: float = 0.25            # |yaw| up to this counts as facing the screen
    yaw_away: float = 0.5                  # |yaw| from this counts as looking away (linear in between)
    state_max_age_seconds: float = 10.0    # class signals ignore a student state older than this
    history_step_seconds: float = 1.0      # one class history point per this many seconds
    history_seconds: float = 600.0         # class history kept for the teacher's sparkline
    history_max_points: int = 60           # points sent per live state (downsampled; keeps messages small)


@dataclass(frozen=True)
class IngestSettings:
    # Video from a meeting-bot service (Recall.ai, Attendee) in Zoom/Meet/Teams: signaling/ingest.py
    max_message_bytes: int = 4_194_304     # one JSON message from the service (a base64 PNG of 640x360 is ~0.5 MB)
    max_width: int = 1920                  # frames larger than this (from their header) are skipped, never decoded
    max_height: int = 1080
    max_fps: float = 2.5                   # per participant; the excess is dropped and counted (the services send 2)
    # Attendee's chat API (off while empty): the consent notice at start, a greeting for newcomers, and each
    # alert as a DIRECT message to the meeting's host (never to everyone; not at all without private chat)
    attendee_api_url: str = ""             # e.g. https://attendee.example.org (POST .../api/v1/bots/{id}/send_chat_message)
    attendee_api_key: str = ""             # sent as `Authorization: Token <key>`
    attendee_platform: str = ""            # zoom | teams | google_meet ("" = unknown: no private alerts)


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    bot: BotSettings = field(default_factory=BotSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    signals: SignalSettings = field(default_factory=SignalSettings)
    janus: JanusSettings = field(default_factory=JanusSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)

    def base_url(self) -> str:
        return self.server.public_url.rstrip("/") or f"http://{self.server.host}:{self.server.port}"

    def ice_servers(self) -> list[dict[str, Any]]:
        value = json.loads(self.server.ice_servers or "[]")
        if not isinstance(value, list) or not all(isinstance(v, dict) and "urls" in v for v in value):
            raise ValueError("server.ice_servers must be a JSON list of {\"urls\": ...} objects")
        return value

    def trusted_proxy_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """server.trusted_proxies as networks; a bad entry raises ValueError naming it."""
        networks = []
        for item in (part.strip() for part in self.server.trusted_proxies.split(",")):
            if item:
                try:
                    networks.append(ipaddress.ip_network(item, strict=False))
                except ValueError:
                    raise ValueError(f"server.trusted_proxies: not an IP address or network: {item!r}") from None
        return networks

    def validate(self) -> "Settings":
        """Raise ValueError naming the first setting the program would refuse or trip over later.

        Every entry point runs this at start-up (through load()), before it creates anything: a bad value
        must be one clear line and exit 2, not a failure inside a running bot (e.g. a threshold below the
        hysteresis used to be refused only in the bot's welcome, after a session row was created, and the
        bot then retried for ever, opening a new session each time)."""
        for problem in _problems(self):
            raise ValueError(problem)
        return self

    def replace(self, **sections: Any) -> "Settings":
        """Settings.replace(bot={"sample_hz": 4}) -> a copy with those fields changed."""
        changed = {name: dataclasses.replace(getattr(self, name), **values) for name, values in sections.items()}
        return dataclasses.replace(self, **changed)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host in LOOPBACK_HOSTS


def _problems(settings: Settings) -> Iterator[str]:
    """Each setting that is out of its range, as 'setting section.name: what is wrong (got value)'."""
    for section, _ in _sections():
        for f in dataclasses.fields(getattr(settings, section)):
            value = getattr(getattr(settings, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                yield f"setting {section}.{f.name}: must be a finite number (got {value!r})"

    def check(section: str, name: str, ok: bool, need: str) -> Iterator[str]:
        if not ok:
            yield f"setting {section}.{name}: {need} (got {getattr(getattr(settings, section), name)!r})"

    def at_least(section: str, names: str, low: float) -> Iterator[str]:
        for name in names.split():
            yield from check(section, name, getattr(getattr(settings, section), name) >= low, f"must be at least {low:g}")

    def positive(section: str, names: str) -> Iterator[str]:
        for name in names.split():
            yield from check(section, name, getattr(getattr(settings, section), name) > 0, "must be above 0")

    def unit(section: str, names: str) -> Iterator[str]:
        for name in names.split():
            yield from check(section, name, 0 <= getattr(getattr(settings, section), name) <= 1, "must be in [0, 1]")

    server, model, storage, sig = settings.server, settings.model, settings.storage, settings.signals
    # --- server ---
    yield from check("server", "host", bool(server.host.strip()), "must not be empty")
    yield from check("server", "port", 0 <= server.port <= 65535, "must be a TCP port in [0, 65535] (0: any free port)")
    yield from check("server", "public_url", not server.public_url or server.public_url.startswith(("http://", "https://")),
                     "must be empty or start with http:// or https:// (it prefixes every shared link)")
    try:
        settings.ice_servers()
    except ValueError:             # also invalid JSON, whose own message names no setting
        yield (f"setting server.ice_servers: must be a JSON list of {{\"urls\": ...}} objects "
               f"(got {server.ice_servers!r})")
    try:
        settings.trusted_proxy_networks()
    except ValueError as exc:      # names the bad entry
        yield f"setting {exc}"
    yield from check("server", "worker_key", 1 <= len(server.worker_key) <= MAX_WORKER_KEY,
                     f"must be 1 to {MAX_WORKER_KEY} characters (the server refuses a longer key in hello)")
    yield from check("server", "worker_key", server.worker_key != DEV_WORKER_KEY or is_loopback(server.host),
                     "is the public development key, and server.host is not loopback: anyone could present it "
                     "and take the bot's seat; set your own (e.g. CLASSMOOD_SERVER_WORKER_KEY=$(openssl rand "
                     "-hex 32))")
    turn_urls = [u.strip() for u in server.turn_urls.split(",") if u.strip()]
    yield from check("server", "turn_urls", all(u.startswith(("turn:", "turns:")) for u in turn_urls),
                     "must be comma-separated turn: or turns: URLs")
    yield from check("server", "turn_secret", bool(server.turn_secret) or not turn_urls,
                     "must be set when server.turn_urls is (coturn's static-auth-secret)")
    yield from positive("server", "header_timeout_seconds body_timeout_seconds idle_timeout_seconds "
                                  "joins_per_second_per_address joins_per_second_per_room turn_ttl_seconds")
    yield from at_least("server", "max_connections_per_address join_burst_per_address join_burst_per_room", 1)
    yield from at_least("server", "max_message_bytes max_bot_message_bytes", 1024)   # a hello with its token fits
    yield from at_least("server", "max_rooms max_participants_per_room max_teachers_per_room "
                                  "video_width video_height video_fps video_kbps max_pending_hellos_per_address message_burst", 1)
    yield from positive("server", "hello_timeout_seconds messages_per_second room_idle_seconds")
    yield from at_least("server", "worker_lease_seconds", 1)   # renewals are 1/5 of it apart: not a busy loop
    yield from at_least("server", "heartbeat_seconds rooms_per_minute_per_address", 0)   # 0: off / no limit
    yield from check("server", "video_fps", server.video_fps >= min_video_fps(settings.bot.sample_hz),
                     f"must be at least {SAMPLING_HEADROOM:g} x bot.sample_hz ({settings.bot.sample_hz:g}): the student "
                     "pages send this many frames a second and the bot could not sample them as often as asked")
    # --- bot ---
    yield from positive("bot", "sample_hz stall_seconds state_push_hz")
    yield from at_least("bot", "queue_frames inference_threads max_batch redetect_every", 1)
    yield from unit("bot", "min_face_score")
    yield from check("bot", "inference_processes", 0 <= settings.bot.inference_processes <= 64,
                     "must be 0 (one per CPU core, at most 4) to 64")
    yield from check("bot", "inference_nice", 0 <= settings.bot.inference_nice <= 19, "must be 0 to 19 (a nice increment)")
    # --- model ---
    name = model.model.strip()
    yield from check("model", "model", bool(name) and name != "scripted:",
                     "must be ferplus, fer2013, scripted:<pattern> or the path to a .tflite file")
    if name and (name.endswith(".tflite") or "/" in name or "\\" in name) and not name.startswith("scripted:"):
        yield from check("model", "model", Path(name).is_file(), "no such model file")
    yield from check("model", "detector", model.detector in DETECTORS, f"must be one of {', '.join(DETECTORS)}")
    # --- janus (the meeting's media server) ---
    janus = settings.janus
    yield from check("janus", "mode", janus.mode in JANUS_MODES, f"must be one of {', '.join(JANUS_MODES)}")
    if janus.mode == "external":
        yield from check("janus", "url", janus.url.startswith(("ws://", "wss://")),
                         "must be the ws:// or wss:// URL of Janus's WebSocket API when janus.mode is external")
    yield from check("janus", "port", 0 <= janus.port <= 65535, "must be a port number (0 = any free port)")
    low, _, high = janus.rtp_ports.partition("-")
    yield from check("janus", "rtp_ports", low.isdigit() and high.isdigit() and 0 < int(low) < int(high) <= 65535,
                     "must be a UDP port range LOW-HIGH")
    yield from positive("janus", "connect_timeout_seconds")
    # --- ingest (meeting-bot services) ---
    yield from at_least("ingest", "max_message_bytes", 1024)
    yield from at_least("ingest", "max_width max_height", 8)
    yield from positive("ingest", "max_fps")
    ingest = settings.ingest
    yield from check("ingest", "attendee_api_url",
                     not ingest.attendee_api_url or ingest.attendee_api_url.startswith(("http://", "https://")),
                     "must be empty or an http:// or https:// URL")
    yield from check("ingest", "attendee_platform", ingest.attendee_platform in ("", "zoom", "teams", "google_meet"),
                     "must be empty, zoom, teams or google_meet")
    # --- storage ---
    try:
        from sqlalchemy.engine import make_url
    except ImportError:          # the signaling server alone runs without SQLAlchemy (in-memory store)
        pass
    else:
        try:
            make_url(storage.url)
        except Exception:         # ArgumentError, or ValueError for a bad port
            yield f"setting storage.url: not a database URL such as sqlite:///classmood.sqlite (got {storage.url!r})"
    yield from positive("storage", "flush_seconds")
    yield from at_least("storage", "max_pending_rows", 1)
    yield from at_least("storage", "retention_days", 0)                    # 0: keep until deleted
    # --- signals: the ranges bot.alerts.AlertEngine and bot.signals rely on ---
    yield from check("signals", "hysteresis", 0 <= sig.hysteresis < 1, "must be in [0, 1)")
    for name in ("confusion_threshold", "boredom_threshold", "class_share_threshold"):
        yield from check("signals", name, sig.hysteresis < getattr(sig, name) <= 1,
                         f"must be in ({sig.hysteresis:g}, 1]: above signals.hysteresis, which a raised alert must "
                         f"drop below the threshold by to clear")
    yield from positive("signals", "window_seconds stillness_full_scale yaw_nose_full_scale state_max_age_seconds "
                                   "history_step_seconds history_seconds")
    yield from at_least("signals", "student_min_seconds class_min_seconds cooldown_seconds", 0)
    yield from at_least("signals", "min_students_for_class_alert min_students_above_for_class_alert min_samples "
                                   "history_max_points", 1)
    yield from at_least("signals", "baseline_seconds baseline_warmup_seconds", 0)    # baseline_seconds 0: off
    yield from check("signals", "baseline_warmup_seconds",
                     sig.baseline_seconds == 0 or sig.baseline_warmup_seconds <= sig.baseline_seconds,
                     f"must be at most signals.baseline_seconds ({sig.baseline_seconds:g}): the baseline's "
                     f"history never grows longer than that, so a longer warm-up would never end")
    yield from unit("signals", "baseline_reference_confusion baseline_reference_boredom baseline_warmup_margin")
    yield from unit("signals", "confusion_w_angry confusion_w_fear confusion_w_sad confusion_w_disgust "
                               "confusion_w_surprise confusion_w_happy low_arousal_w_neutral low_arousal_w_sad "
                               "boredom_w_low_arousal boredom_w_stillness boredom_w_away boredom_w_absent "
                               "yaw_nose_weight yaw_ear_weight yaw_attentive yaw_away")
    yield from check("signals", "yaw_away", sig.yaw_attentive < sig.yaw_away,
                     f"must be above signals.yaw_attentive ({sig.yaw_attentive:g})")


def _sections() -> list[tuple[str, type]]:
    hints = typing.get_type_hints(Settings)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(Settings)]


def _convert(kind: type, raw: str) -> Any:
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    return kind(raw)


def add_arguments(parser: argparse.ArgumentParser, sections: Sequence[str] | None = None) -> None:
    """Add one --section-field flag per setting (default None = not given); `sections` limits the flags to
    those sections (a tool that only reads the database should not list the server's ~60 flags). The
    environment (CLASSMOOD_SECTION_FIELD) still sets every section."""
    group = parser.add_argument_group("settings (also env CLASSMOOD_SECTION_FIELD)")
    for section, cls in _sections():
        if sections is not None and section not in sections:
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            group.add_argument(f"--{section}-{f.name}".replace("_", "-"), dest=f"cm__{section}__{f.name}",
                               default=None, metavar=hints[f.name].__name__.upper(),
                               help=f"default: {f.default!r}")


def load(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from defaults, then environment, then parsed CLI flags, and validate them.
    A bad value raises ValueError with one line naming the setting."""
    env = os.environ if env is None else env
    sections: dict[str, Any] = {}
    for section, cls in _sections():
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"CLASSMOOD_{section}_{f.name}".upper())
            if args is not None and getattr(args, f"cm__{section}__{f.name}", None) is not None:
                raw = getattr(args, f"cm__{section}__{f.name}")
            if raw is not None:
                try:
                    values[f.name] = _convert(hints[f.name], str(raw))
                except ValueError as exc:
                    raise ValueError(f"setting {section}.{f.name}: {exc}") from None
        sections[section] = cls(**values)
    return Settings(**sections).validate()


def parse(argv: Sequence[str] | None = None, description: str = "") -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser)
    ns = parser.parse_args(argv)
    return ns, load(ns)
