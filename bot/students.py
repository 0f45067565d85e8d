"""Simulated students: real aiortc peers that join through signaling and stream a real video file.

Used by `python -m bot.simulate` and by the tests. A student behaves like the browser page does:
direct rooms: hello -> (bot present and analysis on) -> vanilla-ICE offer to the bot -> answer;
meetings (welcome.media.mode == "sfu"): hello -> publish the camera to the SFU (whatever the consent:
the class sees them; the server decides what the bot receives) -> publish again after a media reset.
"""
from __future__ import annotations

import asyncio
import fractions
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import av
import cv2
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack

from bot.peer import rtc_configuration, ws_url
from core.settings import ServerSettings

log = logging.getLogger("classmood.students")


def harness_arg_problem(video: str | Path, students: int, seconds: float) -> str | None:
    """What is wrong with a load harness's common arguments (bot.simulate, bot.ingest_replay), or None."""
    if not Path(video).exists():
        return f"video {video} not found"
    if students < 1 or seconds <= 0:
        return "--students must be >= 1 and --seconds > 0"
    return None


def load_video_frames(path: str | Path, width: int = 320, height: int = 240, fps: float = 5.0,
                      max_seconds: float = 30.0) -> list[np.ndarray]:
    """Decode a video once into BGR frames at the size and rate a browser would be asked for."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise FileNotFoundError(f"cannot open video {path}")
    source_fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    step = max(1.0, source_fps / fps)
    frames: list[np.ndarray] = []
    index, next_keep = 0, 0.0
    while len(frames) < max_seconds * fps:
        ok, frame = capture.read()
        if not ok:
            break
        if index >= next_keep:
            frames.append(cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA))
            next_keep += step
        index += 1
    capture.release()
    if not frames:
        raise ValueError(f"no frames decoded from {path}")
    return frames


def no_face_frames(width: int = 320, height: int = 240, count: int = 10) -> list[np.ndarray]:
    """A synthetic track with no face: moving gradients and noise (exercises the 'no face' path)."""
    rng = np.random.default_rng(7)
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    frames = []
    for i in range(count):
        base = np.broadcast_to((x + i * 20) % 255, (height, width, 3))
        frames.append(np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8))
    return frames


VIDEO_CLOCK_HZ = 90_000                            # RTP's video clock
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_HZ)


class PacedTrack(VideoStreamTrack):
    """A video track that hands out its next item every 1/fps seconds of wall time, stamped on the
    90 kHz clock; subclasses say what the item is."""

    def __init__(self, fps: float) -> None:
        super().__init__()
        self.fps = fps
        self.count = 0
        self.start: float | None = None

    async def next_pts(self) -> int:
        """Wait for the next slot; returns its presentation time in VIDEO_TIME_BASE units."""
        if self.start is None:
            self.start = time.monotonic()
        self.count += 1
        delay = self.start + self.count / self.fps - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        return int(self.count * VIDEO_CLOCK_HZ / self.fps)


class LoopingVideoTrack(PacedTrack):
    """Plays preloaded frames in a loop at a fixed rate (shared frame list: cheap for 50 students)."""

    def __init__(self, frames: list[np.ndarray], fps: float = 5.0, offset: int = 0) -> None:
        super().__init__(fps)
        self.frames = frames
        self.offset = offset

    async def recv(self) -> av.VideoFrame:
        pts = await self.next_pts()
        frame = av.VideoFrame.from_ndarray(self.frames[(self.offset + self.count) % len(self.frames)], format="bgr24")
        frame.pts, frame.time_base = pts, VIDEO_TIME_BASE
        return frame


# What a student's browser sends the bot directly, in kbit/s: the join page caps its camera track at the
# server's video_kbps (welcome.video.kbps). In a Janus meeting the bot gets the low simulcast layer:
# core.simulcast.LOW_LAYER_KBPS.
DIRECT_KBPS = ServerSettings.video_kbps


class EncodedClip:
    """A clip encoded to VP8 once, with a keyframe every second, that many students can send.

    A real student's encoder runs on the student's own computer. When 50 simulated students run on the
    bot's machine, 50 live encoders would take as much CPU as the bot itself; sending this shared,
    already-encoded clip keeps the load test about the bot. Receivers see ordinary VP8 over RTP."""

    def __init__(self, frames: list[np.ndarray], fps: float = 5.0, bitrate: int = 300_000) -> None:
        if not frames:
            raise ValueError("no frames to encode")
        self.fps = fps
        self.gop = max(1, round(fps))
        height, width = frames[0].shape[:2]
        codec = av.CodecContext.create("libvpx", "w")
        codec.width, codec.height, codec.pix_fmt = width - width % 2, height - height % 2, "yuv420p"
        codec.time_base = VIDEO_TIME_BASE
        codec.framerate = fractions.Fraction(round(fps * 1000), 1000)
        codec.bit_rate = bitrate
        codec.gop_size = self.gop
        codec.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "error-resilient": "1"}
        self.payloads: list[bytes] = []
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image[:codec.height, :codec.width], format="bgr24")
            frame.pts, frame.time_base = int(i * VIDEO_CLOCK_HZ / fps), VIDEO_TIME_BASE
            if i % self.gop == 0:
                frame.pict_type = av.video.frame.PictureType.I
            self.payloads += [bytes(packet) for packet in codec.encode(frame)]
        self.payloads += [bytes(packet) for packet in codec.encode(None)]
        # Loop only over whole groups of pictures, so that every wrap starts at a keyframe.
        whole = len(self.payloads) - len(self.payloads) % self.gop
        self.payloads = self.payloads[:whole or len(self.payloads)]


class LoopingPacketTrack(PacedTrack):
    """Sends an EncodedClip in a loop at its frame rate, starting at a keyframe near `offset`."""

    def __init__(self, clip: EncodedClip, offset: int = 0) -> None:
        super().__init__(clip.fps)
        self.clip = clip
        self.index = (offset // clip.gop * clip.gop) % len(clip.payloads)

    async def recv(self) -> av.Packet:  # type: ignore[override]  # aiortc sends encoded packets as they are
        pts = await self.next_pts()
        packet = av.Packet(self.clip.payloads[self.index])
        self.index = (self.index + 1) % len(self.clip.payloads)
        packet.pts, packet.time_base = pts, VIDEO_TIME_BASE
        return packet


class SimulatedStudent:
    """A student as the browser page behaves; streams `frames` (encoded live by aiortc) or an
    EncodedClip (shared, already encoded)."""

    RECONNECT_SECONDS = 2.0     # the first wait before connecting again after a lost media connection

    def __init__(self, server: str, room: str, key: str, name: str, frames: list[np.ndarray] | EncodedClip,
                 fps: float = 5.0, analysis: bool = True, offset: int = 0) -> None:
        self.server, self.room, self.key, self.name = server, room, key, name
        self.frames, self.fps, self.analysis, self.offset = frames, fps, analysis, offset
        self.peer_id: str | None = None
        self.bot_id: str | None = None
        self.ice_servers: list[dict[str, Any]] = []
        self.pc: RTCPeerConnection | None = None
        self.received: list[dict[str, Any]] = []     # every message the server sent this student
        self.connected = asyncio.Event()             # media connection to the bot (or the SFU) established
        self.sfu = False                             # the room is a meeting: publish to the SFU
        self.publishes = 0                           # publish requests sent (one more after each media reset)
        self.connections_lost = 0                    # media connections that failed or were closed by the other side
        self.welcomed = asyncio.Event()
        self._ws: aiohttp.ClientWebSocketResponse[bool] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._reader: asyncio.Task | None = None

    async def join(self) -> None:
        self._http = aiohttp.ClientSession()
        self._ws = ws = await self._http.ws_connect(ws_url(self.server), heartbeat=20)
        await ws.send_json({"v": 1, "type": "hello", "role": "student", "room": self.room, "key": self.key,
                                  "name": self.name, "analysis": self.analysis})
        self._reader = asyncio.ensure_future(self._read())
        await asyncio.wait_for(self.welcomed.wait(), 10)

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                data = json.loads(msg.data)
                self.received.append(data)
                kind = data.get("type")
                if kind == "welcome":
                    self.peer_id = data.get("peer_id")
                    self.ice_servers = data.get("ice_servers") or []
                    self.bot_id = data.get("bot")
                    self.sfu = (data.get("media") or {}).get("mode") == "sfu"
                    self.welcomed.set()
                    await (self._publish() if self.sfu else self._connect_to_bot())
                elif kind == "bot" and not self.sfu:
                    self.bot_id = data.get("peer_id")
                    await self._connect_to_bot()
                elif kind == "signal" and (data.get("data") or {}).get("type") == "answer" and self.pc:
                    await self.pc.setRemoteDescription(RTCSessionDescription(sdp=data["data"]["sdp"], type="answer"))
                elif kind == "published" and self.pc and isinstance(data.get("sdp"), str):
                    await self.pc.setRemoteDescription(RTCSessionDescription(sdp=data["sdp"], type="answer"))
                elif kind == "media" and data.get("event") == "reset":
                    await self._publish()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("simulated student %s: %s", self.peer_id or "(not joined)", exc)

    async def _connect_to_bot(self) -> None:
        await self._close_pc()
        if not self.bot_id or not self.analysis:
            return
        pc = self._sending_pc()
        await pc.setLocalDescription(await pc.createOffer())
        await self.send({"type": "signal", "to": self.bot_id, "data": {"type": "offer", "sdp": pc.localDescription.sdp}})

    async def _publish(self) -> None:
        """Meeting: the camera goes to the SFU; consent only decides what the bot gets (server-side)."""
        await self._close_pc()
        pc = self._sending_pc()
        await pc.setLocalDescription(await pc.createOffer())
        self.publishes += 1
        await self.send({"type": "publish", "sdp": pc.localDescription.sdp})

    def _sending_pc(self) -> RTCPeerConnection:
        pc = RTCPeerConnection(rtc_configuration(self.ice_servers))
        self.pc = pc

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "connected":
                self.connected.set()
            elif pc.connectionState in ("failed", "closed") and self.pc is pc:   # not our own _close_pc
                self.connections_lost += 1
                self.connected.clear()
                self.pc = None
                await pc.close()
                # As the pages do: connect again, waiting longer after each loss (join.js, meeting.js).
                await asyncio.sleep(min(30.0, self.RECONNECT_SECONDS * 2 ** (self.connections_lost - 1)))
                if self.pc is None and self._ws is not None and not self._ws.closed:
                    await (self._publish() if self.sfu else self._connect_to_bot())

        track = LoopingPacketTrack(self.frames, self.offset) if isinstance(self.frames, EncodedClip) \
            else LoopingVideoTrack(self.frames, self.fps, self.offset)
        pc.addTransceiver(track, direction="sendonly")
        return pc

    async def send(self, message: dict[str, Any]) -> None:
        if self._ws is not None and not self._ws.closed:
            await self._ws.send_json({"v": 1, **message})

    async def set_analysis(self, analysis: bool) -> None:
        """The opt-out switch: off closes the media connection to the bot at once."""
        self.analysis = analysis
        await self.send({"type": "consent", "analysis": analysis})
        if self.sfu:
            return          # still in class: the teacher keeps seeing them, the server stops the bot's copy
        if analysis:
            await self._connect_to_bot()
        else:
            await self._close_pc()

    async def _close_pc(self) -> None:
        pc, self.pc = self.pc, None
        self.connected.clear()
        if pc is not None:
            await pc.close()

    async def leave(self) -> None:
        await self._close_pc()
        if self._reader:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()

    def message_types(self) -> set[str]:
        return {str(m.get("type")) for m in self.received}
