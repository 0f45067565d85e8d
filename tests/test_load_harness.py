"""The load harness's shared, already-encoded clip: what 50 simulated students send instead of running
50 encoders on the bot's machine must still be a valid VP8 stream from wherever a student starts."""
from __future__ import annotations

import av
import numpy as np
import pytest

from bot.students import EncodedClip, LoopingPacketTrack, no_face_frames


def is_vp8_keyframe(payload: bytes) -> bool:
    return (payload[0] & 1) == 0          # RFC 6386 frame tag: bit 0 clear = key frame


@pytest.fixture(scope="module")
def clip() -> EncodedClip:
    return EncodedClip(no_face_frames(320, 240, count=23), fps=5.0)


def test_clip_loops_over_whole_groups_of_pictures_each_starting_with_a_keyframe(clip):
    assert clip.gop == 5 and len(clip.payloads) == 20          # 23 frames -> 4 whole seconds
    keyframes = [i for i, p in enumerate(clip.payloads) if is_vp8_keyframe(p)]
    assert keyframes[:4] == [0, 5, 10, 15] and set(keyframes) <= set(range(0, 20, 5))


@pytest.mark.parametrize("start", [0, 5, 15])
def test_clip_decodes_from_any_start_through_the_loop_point(clip, start):
    decoder = av.CodecContext.create("vp8", "r")
    order = clip.payloads[start:] + clip.payloads
    frames = [f for p in order for f in decoder.decode(av.Packet(p))]
    assert len(frames) == len(order)
    assert (frames[-1].width, frames[-1].height) == (320, 240)
    assert np.abs(frames[-1].to_ndarray(format="gray").astype(int).mean() - 128) < 100


async def test_packet_track_starts_at_a_keyframe_and_keeps_the_frame_rate(clip):
    track = LoopingPacketTrack(clip, offset=7)
    packets = [await track.recv() for _ in range(3)]
    assert is_vp8_keyframe(bytes(packets[0]))
    assert [p.pts for p in packets] == [18000, 36000, 54000]   # 90 kHz clock at 5 fps
