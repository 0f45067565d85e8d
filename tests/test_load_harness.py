"""The load harness's shared, already-encoded clip: what 50 simulated students send instead of running
50 encoders on the bot's machine must still be a valid VP8 stream from wherever a student starts."""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path

import aioice.ice
import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection

from bot.simulate import check_bot_settings, parse_args, sent_kbps, udp_receive_queues
from bot.students import DIRECT_KBPS, EncodedClip, LoopingPacketTrack, SimulatedStudent, load_video_frames, no_face_frames
from core.settings import BotSettings, ServerSettings
from core.simulcast import LOW_LAYER_KBPS, bot_layer_fps, bot_layer_kbps

PROJECT = Path(__file__).resolve().parent.parent
SHARED_VIDEO = PROJECT.parent / "shared" / "media" / "videos" / "short_hamilton_clip.mp4"


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


def test_meeting_students_send_the_bot_what_it_receives_of_a_chrome_students_low_simulcast_layer():
    """--via janus models the temporal layers of the low layer that the bot subscribes to (meeting.js's rid "l" cap:
    tests/test_simulcast.py), not the direct path's rate: the harness's students send no temporal layers."""
    meeting = parse_args(["--via", "janus"])
    assert (sent_kbps(meeting), meeting.fps) == (bot_layer_kbps(BotSettings.sample_hz), bot_layer_fps(BotSettings.sample_hz))
    assert (sent_kbps(meeting), meeting.fps) == (90, 2.5)   # 2 Hz: layers 0-1 of 5 fps, 60 % of 150 kbit/s
    slower = parse_args(["--via", "janus", "--sample-hz", "1"])
    assert (sent_kbps(slower), slower.fps) == (60, 1.25)    # the base layer alone
    direct = parse_args([])
    assert (sent_kbps(direct), direct.fps) == (DIRECT_KBPS, ServerSettings.video_fps)
    assert sent_kbps(parse_args(["--via", "janus", "--bitrate", "400"])) == 400
    assert parse_args(["--via", "janus", "--fps", "5"]).fps == 5
    # A higher sampling rate: the students send more, and the bot's settings (server.video_fps) still pass.
    for argv in (["--sample-hz", "5"], ["--via", "janus", "--sample-hz", "5"]):
        args = parse_args(argv)
        assert args.fps >= 5
        check_bot_settings(args)
    with pytest.raises(SystemExit):
        parse_args(["--bitrate", "0"])


@pytest.mark.parametrize("kbps, fps", sorted({(LOW_LAYER_KBPS, 5.0), (DIRECT_KBPS, float(ServerSettings.video_fps)),
                                               (bot_layer_kbps(2.0), bot_layer_fps(2.0))}))
def test_shared_clip_is_encoded_near_the_bitrate_asked_for(kbps, fps):
    frames = load_video_frames(SHARED_VIDEO, fps=fps) if SHARED_VIDEO.exists() else no_face_frames(320, 240, count=25)
    clip = EncodedClip(frames, fps=fps, bitrate=kbps * 1000)
    sent_kbps_measured = sum(map(len, clip.payloads)) * 8 / (len(clip.payloads) / clip.fps) / 1000
    assert sent_kbps_measured <= 1.3 * kbps
    if SHARED_VIDEO.exists():    # a real clip fills its budget; the synthetic one needs far less
        assert sent_kbps_measured >= 0.7 * kbps


async def connected_student(monkeypatch) -> tuple[SimulatedStudent, RTCPeerConnection]:
    """A simulated student's sending connection to a plain aiortc receiver, consent checked every 0.2 s
    (aioice's 5 s would make a lost connection take 30 s to notice)."""
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.2)
    student = SimulatedStudent("http://127.0.0.1:1", "room", "key", "Student 01", no_face_frames(count=5))
    sending = student._sending_pc()
    receiver = RTCPeerConnection()

    @receiver.on("track")
    def on_track(track) -> None:
        async def drain() -> None:
            with contextlib.suppress(Exception):
                while True:
                    await track.recv()
        asyncio.ensure_future(drain())

    await sending.setLocalDescription(await sending.createOffer())
    await receiver.setRemoteDescription(sending.localDescription)
    await receiver.setLocalDescription(await receiver.createAnswer())
    await sending.setRemoteDescription(receiver.localDescription)
    await asyncio.wait_for(student.connected.wait(), 10)
    return student, receiver


async def test_a_connection_the_other_side_drops_counts_as_lost_and_leaving_does_not(monkeypatch):
    """The harness reports connections_lost: an overloaded bot that misses ICE consent checks drops whole
    students, which a rate over each student's own span of samples cannot show."""
    student, receiver = await connected_student(monkeypatch)
    await receiver.close()
    for _ in range(150):
        if student.connections_lost:
            break
        await asyncio.sleep(0.1)
    assert student.connections_lost == 1 and not student.connected.is_set()

    student, receiver = await connected_student(monkeypatch)
    await student.leave()
    await receiver.close()
    await asyncio.sleep(2)
    assert student.connections_lost == 0


@pytest.mark.skipif(not Path("/proc/net/udp").exists(), reason="reads Linux's /proc/net/udp")
def test_unread_datagrams_show_as_the_process_udp_backlog():
    """bot_udp_backlog_kb_max: what waits in a socket unread is seen (what the frame->row latency cannot)."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        receiver.bind(("127.0.0.1", 0))
        assert max(udp_receive_queues(os.getpid()), default=0) < 3000
        for _ in range(3):
            sender.sendto(b"x" * 1200, receiver.getsockname())
        assert max(udp_receive_queues(os.getpid())) >= 3 * 1200
    finally:
        receiver.close()
        sender.close()


def test_a_run_that_misses_the_lecture_target_says_by_how_much():
    from bot.simulate import short_of_target
    assert short_of_target({"samples_per_student_per_s": 2.08, "p95_frame_to_row_s": 0.72}) is None
    assert short_of_target({"samples_per_student_per_s": 1.591, "p95_frame_to_row_s": 1.421}) == \
        {"samples_per_student_per_s": 0.409, "p95_frame_to_row_s": 0.421}
    assert short_of_target({"samples_per_student_per_s": 2.1, "p95_frame_to_row_s": 1.2}) == \
        {"samples_per_student_per_s": 0.0, "p95_frame_to_row_s": 0.2}


class _Machine:
    """A window's CPU readings, as bot.simulate.MachineMonitor reports them."""
    def __init__(self, busy: float, steal: float, cores: int = 2) -> None:
        self.busy, self.steal, self.cores = busy, steal, cores

    def busy_percent(self) -> float:
        return self.busy

    def percent(self, field: str) -> float:
        return self.steal if field == "steal" else 0.0

    def harness_percent(self) -> float:
        return 30.0


def test_the_time_breakdown_names_a_saturated_inference_process_or_machine_as_the_bottleneck():
    from bot.simulate import time_breakdown
    summary = {"students": 100, "samples_in_window": 9464, "bot_cpu_percent": 138.3, "janus_cpu_percent": None}
    stats = {"frames_analysed": 9945, "inference_child_cpu_s": 47.482}
    slow = time_breakdown(summary, stats, _Machine(170.0, 1.0), 60.0)
    assert slow["inference_child_ms_per_frame"] == 4.77
    assert slow["inference_child_cpu_percent"] == round(4.77 * 9464 / 60 / 10, 1)
    assert slow["bot_main_process_cpu_percent"] == round(138.3 - slow["inference_child_cpu_percent"], 1)
    # 4.77 ms x 100 students x 2 Hz is 95 % of the child's one core: it cannot keep up, whatever else is idle.
    assert slow["inference_child_cpu_percent_at_target"] == 95.4
    assert slow["bottleneck"].startswith("the inference process")
    fast_child = {"frames_analysed": 9945, "inference_child_cpu_s": 38.8}        # 3.9 ms a frame
    machine_bound = time_breakdown(summary, fast_child, _Machine(193.0, 2.0), 60.0)
    assert machine_bound["bottleneck"].startswith("the machine's CPU")
    assert time_breakdown(summary, fast_child, _Machine(150.0, 0.0), 60.0)["bottleneck"] is None
    no_child = time_breakdown(summary, {}, _Machine(80.0, 0.0), 60.0)
    assert no_child["inference_child_ms_per_frame"] is None and no_child["bot_main_process_cpu_percent"] is None
    assert no_child["bottleneck"] is None
    # Two inference processes share the same work over two cores: 95 % of one core is not their limit.
    two = time_breakdown(summary, {**stats, "inference_processes": 2}, _Machine(170.0, 1.0), 60.0)
    assert two["inference_processes"] == 2 and two["inference_child_cpu_percent_at_target"] == 95.4
    assert two["bottleneck"] is None
    saturated = {"frames_analysed": 9945, "inference_child_cpu_s": 99.5}         # 10 ms a frame: 200 % needed
    assert time_breakdown(summary, {**saturated, "inference_processes": 2}, _Machine(170.0, 1.0), 60.0)["bottleneck"] \
        .startswith("the inference processes: 10.01 ms")


def test_the_machine_is_measured_busy_even_where_proc_stat_counts_more_cpus_than_the_process_may_use():
    # CI's container: 2 usable cores but /proc/stat sums 8 CPUs' idle time. "cores x 100 minus idle" came out
    # as 0 % busy there; the busy fields are what the machine worked whatever the count.
    from collections import namedtuple
    from bot.simulate import MachineMonitor
    Times = namedtuple("Times", "user nice system idle iowait irq softirq steal")
    machine = MachineMonitor()
    machine.cores = 2
    machine.t_start, machine.t_end = 100.0, 110.0
    machine.start = Times(1000.0, 0.0, 100.0, 5000.0, 0.0, 0.0, 10.0, 0.0)
    machine.end = Times(1012.0, 0.0, 103.0, 5070.0, 0.0, 0.0, 11.0, 0.5)   # 16 s worked, 70 s idle in 10 s
    assert machine.busy_percent() == pytest.approx(160.0)
    assert machine.percent("steal") == pytest.approx(5.0)
