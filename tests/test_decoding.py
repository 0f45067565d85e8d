"""The bot decodes every student's video on one shared thread (bot.decoding), and hands rounds of frames to its
inference processes with the pixels out of band (bot.inference_process.send_round / recv_round)."""
import asyncio
import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Pipe

import numpy as np
import pytest
from aiortc import RTCPeerConnection, rtcpeerconnection
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from bot import decoding
from bot.analyzer import I420
from bot.inference_process import recv_round, send_round
from bot.simulate import no_face_frames
from bot.students import EncodedClip, LoopingPacketTrack

VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)


def clip(count: int = 8, fps: float = 4.0) -> EncodedClip:
    """VP8 at 320x240, a keyframe every round(fps) frames."""
    return EncodedClip(no_face_frames(320, 240, count=count), fps=fps, bitrate=200_000)


def frame(data: bytes, timestamp: int = 0) -> JitterFrame:
    return JitterFrame(data=data, timestamp=timestamp)


def manual_track(**options) -> tuple[decoding.SharedDecoder, decoding.DecodedTrack, asyncio.Queue, threading.Event]:
    """A track on a decoder without its thread (the test calls take() and process()): the decoder, the track,
    the track's output queue, and the event its receiver would turn into a PLI."""
    shared = decoding.SharedDecoder(threaded=False, **options)
    output: asyncio.Queue = asyncio.Queue()
    keyframe_wanted = threading.Event()
    return shared, shared.open(asyncio.get_running_loop(), output, keyframe_wanted), output, keyframe_wanted


async def delivered(output: asyncio.Queue) -> list:
    await asyncio.sleep(0.05)      # the decoded frames arrive through call_soon_threadsafe
    items = []
    while not output.empty():
        items.append(output.get_nowait())
    return items


async def test_every_student_track_is_decoded_on_one_thread_not_one_each(monkeypatch):
    shared = decoding.SharedDecoder()
    monkeypatch.setattr(decoding, "SHARED", shared)
    monkeypatch.setattr(rtcpeerconnection, "RTCRtpReceiver", decoding.SharedDecodingReceiver)
    encoded = clip(count=20, fps=10.0)
    received: list[list] = [[], [], []]
    ended = [asyncio.Event() for _ in received]
    senders, receivers = [], []
    for i in range(len(received)):
        sender, receiver = RTCPeerConnection(), RTCPeerConnection()
        sender.addTrack(LoopingPacketTrack(encoded))

        def on_track(track, i=i) -> None:
            async def drain() -> None:
                with contextlib.suppress(MediaStreamError):
                    while True:
                        received[i].append(await track.recv())
                ended[i].set()
            asyncio.ensure_future(drain())
        receiver.on("track", on_track)
        await sender.setLocalDescription(await sender.createOffer())
        await receiver.setRemoteDescription(sender.localDescription)
        await receiver.setLocalDescription(await receiver.createAnswer())
        await sender.setRemoteDescription(receiver.localDescription)
        senders.append(sender)
        receivers.append(receiver)
    try:
        for _ in range(100):
            if all(len(frames) >= 5 for frames in received):
                break
            await asyncio.sleep(0.1)
        assert all(len(frames) >= 5 for frames in received), [len(frames) for frames in received]
        assert all((f.width, f.height, f.format.name) == (320, 240, "yuv420p") for frames in received for f in frames)
        assert not [t for t in threading.enumerate() if t.name == "video-decoder"], "aiortc's own decoder threads ran"
        assert shared.frames_decoded >= sum(map(len, received)) and shared.frames_failed == 0
    finally:
        for pc in receivers + senders:
            await pc.close()
    # A receiver that stops ends its track: the reader sees the end, as with aiortc's own thread.
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ended)), 5)


async def test_a_track_whose_frames_pile_up_drops_them_and_resumes_at_its_next_keyframe(caplog):
    shared, track, output, keyframe_wanted = manual_track(max_pending=3)
    payloads = clip(count=8, fps=4.0).payloads           # key, 3 inter, key, 3 inter
    assert [decoding.is_keyframe("VP8", p) for p in payloads] == [True, False, False, False] * 2
    with caplog.at_level(logging.WARNING, logger="classmood.bot.decoding"):
        for i in range(4):                                 # the 4th finds 3 waiting: those are dropped
            track.put((VP8, frame(payloads[i], i)))
    assert shared.frames_shed == 3 and keyframe_wanted.is_set()
    assert len(shared._queue) == 1, "the dropped frames must leave the queue, not only be skipped later"
    assert "dropping them and waiting for a keyframe" in caplog.text
    track.put((VP8, frame(payloads[4], 4)))
    track.put((VP8, frame(payloads[5], 5)))
    shared.process(shared.take(wait=False))
    # The inter frame left over from before the keyframe cannot be decoded: it is dropped too.
    assert shared.frames_shed == 4 and shared.frames_decoded == 2
    assert [f.pts for f in await delivered(output)] == [4, 5]


async def test_a_track_joined_mid_stream_waits_for_its_first_keyframe_and_asks_for_it(caplog):
    """A Janus subscription starts wherever the publisher's stream is: inter frames first."""
    shared, track, output, keyframe_wanted = manual_track()
    payloads = clip(count=8, fps=4.0).payloads
    with caplog.at_level(logging.WARNING, logger="classmood.bot.decoding"):
        for i in (1, 2, 3, 4, 5):
            track.put((VP8, frame(payloads[i], i)))
        shared.process(shared.take(wait=False))
    assert shared.frames_before_keyframe == 3 and keyframe_wanted.is_set()
    assert shared.frames_failed == 0 and shared.frames_shed == 0 and not caplog.text   # expected, not an error
    assert [f.pts for f in await delivered(output)] == [4, 5]


async def test_a_corrupt_frame_is_logged_and_the_track_goes_on(caplog):
    shared, track, output, keyframe_wanted = manual_track()
    payloads = clip(count=4, fps=4.0).payloads
    with caplog.at_level(logging.WARNING, logger="classmood.bot.decoding"):
        for i, data in enumerate([b"\x00" * 10, payloads[0], payloads[1]]):
            track.put((VP8, frame(data, i)))
        shared.process(shared.take(wait=False))
    assert shared.frames_failed == 1 and keyframe_wanted.is_set()   # the receiver asks for a keyframe (PLI)
    assert "could not decode a VP8 frame" in caplog.text
    assert [f.pts for f in await delivered(output)] == [1, 2]
    track.put(None)                                         # the receiver stopped
    shared.process(shared.take(wait=False))
    assert await delivered(output) == [None] and track.decoder is None


def test_keyframes_are_recognised_for_vp8_and_h264():
    assert decoding.is_keyframe("VP8", b"\x10\x02\x00\x9d\x01\x2a") and not decoding.is_keyframe("VP8", b"\x11\x02")
    idr = b"\x00\x00\x00\x01\x67\x42" + b"\x00\x00\x00\x01\x65\x88"       # SPS, then an IDR slice
    assert decoding.is_keyframe("H264", idr) and decoding.is_keyframe("h264", b"\x00\x00\x01\x65\x88")
    assert not decoding.is_keyframe("H264", b"\x00\x00\x00\x01\x41\x9a")   # a non-IDR slice
    assert not decoding.is_keyframe("VP8", b"") and not decoding.is_keyframe("H264", b"\x00\x00\x01")


@pytest.mark.parametrize("frames", [
    [I420(np.arange(360 * 320, dtype=np.uint8).reshape(360, 320)),
     np.random.default_rng(1).integers(0, 255, (240, 320, 3), dtype=np.uint8),
     np.random.default_rng(2).integers(0, 255, (240, 640, 3), dtype=np.uint8)[:, ::2],   # not contiguous
     np.zeros((0, 0, 3), np.uint8)],
    [],
])
def test_a_round_crosses_the_pipe_whole_and_its_frames_can_be_written(frames):
    parent, child = Pipe()
    keys = [("room", f"student-{i}") for i in range(len(frames))]
    with ThreadPoolExecutor(1) as reader:           # a pipe holds 64 KB: the other end must read meanwhile
        received = reader.submit(recv_round, child)
        send_round(parent, (frames, keys))
        got_frames, got_keys = received.result(timeout=10)
    assert got_keys == keys and len(got_frames) == len(frames)
    for sent, got in zip(frames, got_frames):
        sent, got = (sent.planes, got.planes) if isinstance(sent, I420) else (sent, got)
        assert got.shape == sent.shape and got.dtype == sent.dtype and np.array_equal(got, sent)
        assert got.flags.writeable
    send_round(parent, None)
    assert recv_round(child) is None
