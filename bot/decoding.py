"""One thread decodes the video of every track the bot receives, instead of aiortc's thread per track.

Why: aiortc starts a decoder thread for each incoming track, and each of them wakes for every frame and
hands it to the event loop as a coroutine of its own. At 100 students that is 100 threads taking turns at
the GIL with the event loop: a py-spy profile of the bot via Janus had its decoder threads waiting for the
GIL on 36 % of all samples and the event loop waiting for it after every SRTP call (docs/performance.md).
Here one thread decodes every track's frames in arrival order (decoding releases the GIL) and hands each
batch of decoded frames to the event loop in one call. Its queue is bounded per track: a track whose
frames pile up (the machine cannot keep up) loses what waits and resumes at its next keyframe, for which
the receiver asks the sender (PLI), rather than falling further behind.

`install()` makes every aiortc receiver created afterwards in this process use it; a receiver of an aiortc
whose internals differ from what this module knows keeps aiortc's own thread (logged once).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Any

from aiortc import rtcpeerconnection
from aiortc.codecs import get_decoder
from aiortc.rtcrtpreceiver import RTCRtpReceiver

log = logging.getLogger("classmood.bot.decoding")

MAX_PENDING_PER_TRACK = 30   # encoded frames: ~10 s of a 3 fps student; more means decoding cannot keep up
MAX_BATCH = 16               # frames decoded before the decoded ones are handed to the event loop


def is_keyframe(codec_name: str, data: bytes) -> bool:
    """Whether an encoded frame can be decoded without the frames before it (unknown codecs: assume so)."""
    if not data:
        return False
    name = codec_name.upper()
    if name == "VP8":
        return not data[0] & 0x01          # RFC 6386 9.1: the frame tag's first bit is 0 for a key frame
    if name == "H264":
        # Annex B as aiortc's depayloader writes it: an IDR slice (5) or a sequence parameter set (7).
        start = 0
        while True:
            start = data.find(b"\x00\x00\x01", start)
            if start < 0 or start + 3 >= len(data):
                return False
            if data[start + 3] & 0x1F in (5, 7):
                return True
            start += 3
    return True


class DecodedTrack:
    """One receiver's decoding state. It stands in for the queue and the thread aiortc's receiver expects:
    the receiver calls put((codec, encoded_frame)), put(None) when the track ends, and join()."""

    def __init__(self, owner: SharedDecoder, loop: asyncio.AbstractEventLoop, output: asyncio.Queue,
                 decode_error: threading.Event) -> None:
        self.owner = owner
        self.loop = loop
        self.output = output               # the track's queue: decoded frames, then None at the end
        self.decode_error = decode_error   # set: the receiver asks the sender for a keyframe (PLI)
        self.decoder: Any = None
        self.codec_name: str | None = None
        self.asked_keyframe = False        # a new track asked its sender for its first keyframe (PLI)
        self.pending = 0                   # frames queued for this track (guarded by the owner's lock)
        self.generation = 0                # bumped (under the owner's lock) when its queued frames are shed
        # The decoder thread's: frames of another generation wait for a keyframe. -1: a new track starts at one
        # (a subscription joins a stream mid-way; the frames before its first keyframe cannot be decoded).
        self.decoded_generation = -1

    def put(self, task: tuple[Any, Any] | None) -> None:
        self.owner.submit(self, task)

    def join(self, timeout: float | None = None) -> None:
        """aiortc joins its decoder thread when a track stops; the shared one goes on for the others."""


class SharedDecoder:
    def __init__(self, max_pending: int = MAX_PENDING_PER_TRACK, threaded: bool = True) -> None:
        self.max_pending = max_pending
        self.threaded = threaded           # False: nothing decodes until take() and process() are called (tests)
        self._cond = threading.Condition()
        self._queue: deque[tuple[DecodedTrack, int, tuple[Any, Any] | None]] = deque()
        self._thread: threading.Thread | None = None
        self.frames_decoded = 0
        self.frames_failed = 0
        self.frames_shed = 0
        self.frames_before_keyframe = 0    # a new track's frames before its first keyframe (not decodable)

    def open(self, loop: asyncio.AbstractEventLoop, output: asyncio.Queue,
             decode_error: threading.Event) -> DecodedTrack:
        with self._cond:
            if self.threaded and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._run, name="classmood-decoder", daemon=True)
                self._thread.start()
        return DecodedTrack(self, loop, output, decode_error)

    def submit(self, track: DecodedTrack, task: tuple[Any, Any] | None) -> None:
        """Called on the event loop by the track's receiver; never blocks on decoding."""
        with self._cond:
            if task is not None and track.pending >= self.max_pending:
                # Decoding has fallen this far behind for this track: what waits is stale. Drop it, and
                # resume at a keyframe (the receiver sends a PLI for it on its next packet).
                self.frames_shed += track.pending
                log.warning("decoding is %d frames behind for a track; dropping them and waiting for a keyframe",
                            track.pending)
                track.pending = 0
                track.generation += 1
                track.decode_error.set()
                # Out of the queue too (rare, O(queue)), so that memory stays bounded while decoding lags.
                self._queue = deque(item for item in self._queue if item[0] is not track or item[2] is None)
            if task is not None:
                track.pending += 1
            self._queue.append((track, track.generation, task))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            batch = self.take()
            try:
                self.process(batch)
            except Exception:       # never let one bad batch stop every student's video
                log.exception("decoding a batch of frames failed; going on with the next")

    def take(self, wait: bool = True) -> list[tuple[DecodedTrack, int, tuple[Any, Any] | None]]:
        """The next frames to decode (up to MAX_BATCH, oldest first). Frames shed while they waited have left the
        queue already (submit); a batch taken before a shed keeps its generation and is decoded as it was."""
        with self._cond:
            while wait and not self._queue:
                self._cond.wait()
            batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
            for track, _, task in batch:
                if task is not None:
                    track.pending -= 1
            return batch

    def process(self, batch: list[tuple[DecodedTrack, int, tuple[Any, Any] | None]]) -> None:
        """Decode a batch and hand the frames to their tracks' event loops, one call per loop."""
        decoded: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for track, generation, task in batch:
            if task is None:
                track.decoder = None            # the track ended: free its decoder, end its stream
                decoded.setdefault(track.loop, []).append((track.output, None))
            else:
                for frame in self._decode(track, generation, *task):
                    decoded.setdefault(track.loop, []).append((track.output, frame))
        for loop, frames in decoded.items():
            try:
                loop.call_soon_threadsafe(_deliver, frames)
            except RuntimeError:      # that event loop has closed: nobody is reading its tracks any more
                pass

    def _decode(self, track: DecodedTrack, generation: int, codec: Any, encoded_frame: Any) -> list[Any]:
        try:
            if generation != track.decoded_generation:
                # A new track, or frames were shed before this one: what it refers to is missing, so wait for
                # a keyframe (and ask for one, once).
                if not is_keyframe(codec.name, encoded_frame.data):
                    if track.decoded_generation < 0 and generation == 0:
                        self.frames_before_keyframe += 1
                        if not track.asked_keyframe:
                            track.asked_keyframe = True
                            track.decode_error.set()
                    else:
                        self.frames_shed += 1
                    return []
                track.decoded_generation = generation
            if codec.name != track.codec_name:
                track.decoder = get_decoder(codec)
                track.codec_name = codec.name
            frames = list(track.decoder.decode(encoded_frame))
            self.frames_decoded += len(frames)
            return frames
        except Exception as exc:          # a corrupt frame: keep the decoder, ask for a keyframe, go on
            self.frames_failed += 1
            log.warning("could not decode a %s frame (%s); asking for a keyframe", codec.name,
                        str(exc) or type(exc).__name__)
            track.decode_error.set()
            return []

    def stats(self) -> dict[str, int]:
        return {"frames_decoded": self.frames_decoded, "frames_failed": self.frames_failed,
                "frames_before_keyframe": self.frames_before_keyframe,
                "frames_shed": self.frames_shed}


def _deliver(frames: list[tuple[asyncio.Queue, Any]]) -> None:
    for output, frame in frames:
        output.put_nowait(frame)


SHARED = SharedDecoder()
_P = "_RTCRtpReceiver__"      # aiortc's private attributes, name-mangled
_NEEDS = ("started", "codecs", "rtx_ssrc", "decoder_queue", "decoder_thread", "decoder_error", "transport",
          "rtcp_task")
_warned = False


class SharedDecodingReceiver(RTCRtpReceiver):
    """aiortc's receiver, with its frames decoded on the shared thread. receive() is aiortc's (1.9-1.16),
    with the decoder thread replaced; everything else (jitter buffer, NACK, PLI, RTCP) is aiortc's own."""

    async def receive(self, parameters: Any) -> None:
        global _warned
        state = vars(self)
        if not all(_P + name in state for name in _NEEDS) or not hasattr(state.get("_track"), "_queue"):
            if not _warned:
                _warned = True
                log.warning("this aiortc's receiver is not the one bot.decoding knows; each track keeps its own "
                            "decoder thread")
            await super().receive(parameters)
            return
        if state[_P + "started"]:
            return
        for codec in parameters.codecs:
            state[_P + "codecs"][codec.payloadType] = codec
        for encoding in parameters.encodings:
            if encoding.rtx:
                state[_P + "rtx_ssrc"][encoding.rtx.ssrc] = encoding.ssrc
        track = SHARED.open(asyncio.get_running_loop(), state["_track"]._queue, state[_P + "decoder_error"])
        state[_P + "decoder_queue"] = track
        state[_P + "decoder_thread"] = track
        state[_P + "transport"]._register_rtp_receiver(self, parameters)
        state[_P + "rtcp_task"] = asyncio.ensure_future(self._run_rtcp())
        state[_P + "started"] = True


def install() -> None:
    """Every RTCPeerConnection created in this process from now on decodes on the shared thread."""
    rtcpeerconnection.RTCRtpReceiver = SharedDecodingReceiver   # type: ignore[misc]
