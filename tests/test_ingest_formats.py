"""The meeting-bot services' message shapes, the image checks and the binary frame format: pure functions,
no server (tests/test_ingest.py runs them through the real server and bot)."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from bot import ingest_replay
from bot.analyzer import Analyzer, PendingFrame, to_bgr
from bot.mailbox import FrameMailbox
from core import frames, images
from core.faces import Faces
from signaling.ingest import IngestError, parse_attendee, parse_recall, student_id

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ingest"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def png(width: int = 64, height: int = 36) -> bytes:
    return cv2.imencode(".png", np.full((height, width, 3), 128, np.uint8))[1].tobytes()


def jpeg(width: int = 64, height: int = 36) -> bytes:
    return cv2.imencode(".jpg", np.full((height, width, 3), 128, np.uint8))[1].tobytes()


def shape(value):
    """The keys of nested objects (what a service's documentation fixes), not the values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    return type(value).__name__ if value is not None else "null"


# ---- Recall.ai ---------------------------------------------------------------------------------------------
def test_a_recall_png_frame_fixture_parses_into_a_webcam_frame_of_that_participant():
    event = parse_recall(fixture("recall_video_separate_png.json"))
    assert event is not None and event.kind == "frame" and event.source == "webcam"
    assert (event.who.id, event.who.name, event.who.is_host) == ("100", "Asha Rao", False)
    assert images.sniff(event.image)[0] == "png"
    assert event.t == pytest.approx(1796029212.5)


def test_recall_participant_events_parse_and_unknown_events_are_none():
    assert parse_recall(fixture("recall_join.json")).kind == "join"
    assert parse_recall(fixture("recall_leave.json")).kind == "leave"
    update = parse_recall(fixture("recall_update.json"))
    assert update.kind == "update" and update.who.name == "Asha Rao [no-analysis]"
    assert parse_recall(fixture("recall_unknown_event.json")) is None


def test_the_replay_sends_recall_messages_of_the_fixtures_shape():
    person = ingest_replay.recall_participant(100, "Asha Rao")
    frame = json.loads(ingest_replay.recall_frame(person, "AAAA", 1796029212.5, 1796029200.0))
    assert shape(frame) == shape(fixture("recall_video_separate_png.json"))
    join = json.loads(ingest_replay.recall_event("participant_events.join", person, 1796029212.5, 1796029200.0))
    assert shape(join) == shape(fixture("recall_join.json"))


@pytest.mark.parametrize("mutate, reason", [
    (lambda m: m.update(event=7), "bad_message"),
    (lambda m: m.update(data=[]), "bad_message"),
    (lambda m: m["data"]["data"]["participant"].update(id=[1]), "bad_message"),
    (lambda m: m["data"]["data"]["participant"].update(id=True), "bad_message"),
    (lambda m: m["data"]["data"]["participant"].update(name=5), "bad_message"),
    (lambda m: m["data"]["data"]["participant"].update(is_host="yes"), "bad_message"),
    (lambda m: m["data"]["data"].update(buffer=12), "bad_message"),
    (lambda m: m["data"]["data"].update(buffer="not base64!"), "bad_image"),
    (lambda m: m["data"]["data"].update(type="camera"), "bad_message"),
])
def test_recall_messages_of_the_wrong_types_are_refused_with_a_reason(mutate, reason):
    message = fixture("recall_video_separate_png.json")
    mutate(message)
    with pytest.raises(IngestError) as refused:
        parse_recall(message)
    assert refused.value.reason == reason


# ---- Attendee ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["attendee_video_frame.json", "attendee_video_frame_nested.json"])
def test_attendee_frames_parse_in_the_flat_and_the_nested_shape(name):
    event = parse_attendee(fixture(name))
    assert event.kind == "frame" and event.source == "webcam" and event.bot_id == "bot_3hfkaXiVyD"
    assert (event.who.id, event.who.name, event.who.is_host) == ("f3b1c2d4", "Lee Chen", False)
    assert images.sniff(event.image)[0] == "jpeg"
    assert event.t == pytest.approx(1796029212.5)


def test_attendee_frames_in_the_shape_of_its_docs_parse_without_a_name_or_host_flag():
    event = parse_attendee(fixture("attendee_per_participant.json"))
    assert event.kind == "frame" and event.source == "webcam" and event.bot_id == "bot_12345abcdef"
    assert (event.who.id, event.who.name, event.who.is_host) == ("participant_abc123", "Guest", False)
    assert images.sniff(event.image)[0] == "jpeg"
    assert event.t is None        # no timestamp in that shape: the server stamps the frame on arrival
    screen = fixture("attendee_per_participant.json")
    screen["data"]["source"] = "screenshare"
    assert parse_attendee(screen).source == "screenshare"


def test_the_replay_sends_attendee_frames_of_the_fixtures_shape_and_unknown_triggers_are_none():
    frame = json.loads(ingest_replay.attendee_frame("bot_3hfkaXiVyD", "f3b1c2d4", "Lee Chen", "AAAA", 1796029212.5))
    assert shape(frame) == shape(fixture("attendee_video_frame.json"))
    documented = json.loads(ingest_replay.attendee_documented_frame("bot_12345abcdef", "participant_abc123", "AAAA"))
    assert shape(documented) == shape(fixture("attendee_per_participant.json"))     # the replay's default
    assert parse_attendee({"bot_id": "b", "trigger": "transcript.update", "data": {}}) is None
    with pytest.raises(IngestError):
        parse_attendee({"bot_id": "b", "trigger": "realtime_video.frame", "data": {"participant_id": {"x": 1}}})


def test_student_ids_follow_the_protocols_id_pattern():
    assert student_id("recall", "42") == "rc-42"
    assert student_id("attendee", "f3b1c2d4") == "at-f3b1c2d4"
    odd = student_id("attendee", "spaces and / slashes " * 5)
    assert odd.startswith("at-") and len(odd) <= 64 and odd.replace("-", "").isalnum()


# ---- images: from the header, before any decode -----------------------------------------------------------
def test_image_headers_give_the_kind_and_size():
    assert images.sniff(png(64, 36)) == ("png", 64, 36)
    assert images.sniff(jpeg(640, 360)) == ("jpeg", 640, 360)


@pytest.mark.parametrize("data, words", [
    (b"GIF89a" + b"\x00" * 40, "not a PNG or JPEG"),
    (png()[:-20], "truncated PNG"),
    (png()[:20], "truncated PNG header"),
    (jpeg()[:-10], "truncated JPEG"),
    (jpeg()[:4], "JPEG"),
    (b"", "not a PNG or JPEG"),
])
def test_non_images_and_truncated_images_are_refused(data, words):
    with pytest.raises(images.BadImage, match=words):
        images.sniff(data)


def test_images_larger_than_the_limit_are_refused_from_their_header():
    big = png(2000, 1200)
    with pytest.raises(images.BadImage, match="larger than 1920x1080"):
        images.check(big, 1920, 1080)
    assert images.check(png(1080, 1920), 1920, 1080)[1:] == (1080, 1920)   # portrait is fine


# ---- the binary frame: server -> bot -------------------------------------------------------------------------
def test_binary_frames_round_trip_and_malformed_ones_are_refused():
    data = frames.pack("rc-42", 1796029212.5, b"\x89PNG...")
    assert frames.unpack(data) == ("rc-42", 1796029212.5, b"\x89PNG...")
    for bad in (b"", b"CMF1", b"XXXX\x05rc-42" + b"\x00" * 9, data[:12], b"CMF1\x05rc 42" + b"\x00" * 9):
        with pytest.raises(ValueError):
            frames.unpack(bad)
    with pytest.raises(ValueError):
        frames.pack("not an id!", 0.0, b"")


# ---- the inference thread decodes encoded frames; bad ones are a frame error ----------------------------------
def test_encoded_frames_decode_in_the_worker_and_bad_ones_are_errors_not_crashes():
    assert to_bgr(png(64, 36)).shape == (36, 64, 3)
    assert to_bgr(jpeg(64, 36)).shape == (36, 64, 3)
    seen: list[int] = []

    def analyse(batch: list[np.ndarray], keys: list[tuple[str, str]]) -> Faces:
        assert keys == [("r", "good")]   # whose frame each is, for following faces between samples
        seen.append(len(batch))
        return Faces.empty()

    analyzer = Analyzer(analyse, FrameMailbox(), lambda results: None)
    batch = [(("r", "good"), PendingFrame(png(), 0.0, 0.0)),
             (("r", "garbage"), PendingFrame(b"not an image at all", 0.0, 0.0)),
             (("r", "truncated"), PendingFrame(jpeg()[:-30], 0.0, 0.0))]
    results = analyzer.process(batch)
    assert [r.error is None for r in results] == [True, False, False]
    assert "not a PNG or JPEG" in results[1].error and "truncated JPEG" in results[2].error
    assert seen == [1]
