"""Detect less: follow each student's face from sample to sample with one template match, and run the
face detector only every `redetect_every` samples, when the match fails, or when the frame changed size.

A webcam student moves little in half a second. Matching the face last found by the detector against the
new frame (normalised cross-correlation of a ~32 px gray patch over a search window 1.5x the face, about
0.1 ms at 320x240) replaces a BlazeFace pass (~2 ms; ~13 ms when the auto detector finds nobody and falls
back to full range and a close-up pass). Positions are always measured against the last *detected* face
(the anchor), so errors cannot accumulate, and the detector re-anchors every few samples, which also
follows a student who leans in or out (the match is translation only).

A student whose last face was close to the camera is detected without the far-face (full-range) pass, ~8 ms
of the ~13: a student at their webcam does not move to the back of the room in half a second.

A student whose last detection found nobody gets the quick pass (short range only), and the whole chain
every `miss_backoff`-th sample: an empty chair costs ~2 ms, not ~13 ms, per sample. Until 2026-12-01 the
quick pass took over after two misses, the second one running the whole chain; it is nearly always wasted
at a webcam (a student who looked down or away is not found by the far-face pass either), and on the load
harness's clip (cuts from close-ups to shots without a face) it was 0.6 ms of ~4.2 a sample. Its cost: a
face only the far-face pass finds, right after a miss, is found up to miss_backoff samples later
(`models.bench --tracking`, docs/performance.md).

A face the detector is unsure of (score < min_anchor_score) is not followed: detected again.

The thresholds come from `python -m models.bench --tracking` (every shared video, five students each, against
detecting every sample): a match of 0.6 and an anchor score of 0.5 follow 61 % of samples with the same top
expression agreement (93.6 %) as the stricter 0.7 / 0.75 (51 %, 93.3 %). A face turning or changing expression
scores 0.4-0.8 against its anchor while staying in place (box IoU 0.7-0.9 with the detector's), and a cut to
another shot 0.25-0.43: the threshold sits between. On the load harness's Hamilton clip, the detector ran on
66 % instead of 88 % of samples: 4.3 instead of 5.2 ms a sample.

Keys are opaque (the bot passes (room, participant)); without keys every frame is detected, as before.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Hashable, Protocol, Sequence

import cv2
import numpy as np

from core.faces import Faces
from models.runtime.preprocess import to_gray

TEMPLATE_SIDE = 32          # the face patch is matched at this size (px on its longer side)
SEARCH_MARGIN = 0.5         # the search window extends this share of the face size on every side
NEAR_SHARE = 0.25           # a face this share of the frame's shorter side or more is "close to the camera"


class Detector(Protocol):
    def detect(self, frames: list[np.ndarray]) -> Faces: ...


@dataclass
class Track:
    """One student's anchor: the last detected face, and how to find it again."""
    box: np.ndarray            # (4,) x1, y1, x2, y2 at the anchor
    keypoints: np.ndarray      # (6, 2)
    score: float
    template: np.ndarray       # gray face patch, scaled by `scale`
    origin: tuple[int, int]    # frame px of the template's top-left corner
    scale: float               # template px per frame px
    shape: tuple[int, int]     # frame (height, width) at the anchor
    since_detect: int = 0      # samples tracked since the anchor was detected
    seen: float = 0.0          # monotonic time of the last sample


@dataclass
class TrackerStats:
    detected: int = 0          # frames handed to the detector
    quick: int = 0             # of which: quick pass only (a student with no face last time)
    tracked: int = 0           # frames whose face came from the template match
    lost: int = 0              # matches below min_match (then detected)


class FaceTracker:
    """`detect(frames, keys) -> Faces`, at most one face per frame (the largest, as the bot keeps)."""

    def __init__(self, detector: Detector, quick: Detector | None = None, redetect_every: int = 4,
                 min_match: float = 0.6, miss_backoff: int = 4, min_anchor_score: float = 0.5,
                 ttl_seconds: float = 120.0, max_tracks: int = 10_000, near: Detector | None = None,
                 quick_after: int = 1) -> None:
        """redetect_every: samples per detector run while a face is followed (1 = detect every frame).
        quick_after: consecutive detections that found nobody before the quick pass takes over (except every
        miss_backoff-th sample, which gets the whole chain again).
        quick: the detector for a student whose last detections found nobody (default: `detector`).
        near: the detector for a student whose last face was close to the camera (default: `detector`)."""
        if redetect_every < 1 or miss_backoff < 1 or quick_after < 1:
            raise ValueError("redetect_every, miss_backoff and quick_after must be >= 1")
        self.detector = detector
        self.quick = quick or detector
        self.near = near or detector
        self.redetect_every = redetect_every
        self.min_match = min_match
        self.miss_backoff = miss_backoff
        self.quick_after = quick_after
        self.min_anchor_score = min_anchor_score
        self.ttl_seconds = ttl_seconds
        self.max_tracks = max_tracks
        self.tracks: dict[Hashable, Track] = {}
        self.misses: dict[Hashable, int] = {}    # consecutive detections that found nobody
        self.was_near: dict[Hashable, bool] = {}  # the last face found filled >= NEAR_SHARE of the frame
        self.stats = TrackerStats()
        self._lock = threading.Lock()

    def detect(self, frames: list[np.ndarray], keys: Sequence[Hashable] | None = None) -> Faces:
        if keys is None or self.redetect_every == 1 and self.miss_backoff == 1:
            return self.detector.detect(frames).largest_per_frame()
        if len(keys) != len(frames):
            raise ValueError(f"{len(frames)} frames but {len(keys)} keys")
        with self._lock:
            return self._detect(frames, keys)

    def _detect(self, frames: list[np.ndarray], keys: Sequence[Hashable]) -> Faces:
        now = time.monotonic()
        self._expire(now)
        found: list[Faces] = []
        full: list[int] = []
        quick: list[int] = []
        near: list[int] = []
        for i, (frame, key) in enumerate(zip(frames, keys)):
            track = self.tracks.get(key)
            face = self._follow(track, frame, i) if track is not None else None
            if face is not None:
                found.append(face)
                self.stats.tracked += 1
                continue
            # A face just seen close up: no far-face pass. After a miss (which ran the whole chain, or that
            # close-up chain) mostly the quick pass (an empty chair, a cut), the whole chain every miss_backoff-th.
            misses = self.misses.get(key, 0)
            if misses == 0 and self.was_near.get(key, False):
                near.append(i)
            else:
                (quick if misses >= self.quick_after and misses % self.miss_backoff else full).append(i)
        for indices, detector in ((full, self.detector), (quick, self.quick), (near, self.near)):
            if not indices:
                continue
            self.stats.detected += len(indices)
            if detector is self.quick and detector is not self.detector:
                self.stats.quick += len(indices)
            faces = detector.detect([frames[i] for i in indices]).largest_per_frame()
            faces = Faces(faces.boxes, faces.scores, faces.keypoints,
                          np.asarray(indices, np.int32)[faces.frame_ids], faces.probs)
            with_face = {int(f) for f in faces.frame_ids}
            for i in indices:
                if i not in with_face:
                    self.tracks.pop(keys[i], None)
                    self.misses[keys[i]] = self.misses.get(keys[i], 0) + 1
            for j in range(len(faces)):
                i = int(faces.frame_ids[j])
                self.misses.pop(keys[i], None)
                side = float(max(faces.boxes[j, 2] - faces.boxes[j, 0], faces.boxes[j, 3] - faces.boxes[j, 1]))
                self.was_near[keys[i]] = side >= NEAR_SHARE * min(frames[i].shape[:2])
                self._anchor(keys[i], frames[i], faces.boxes[j], faces.keypoints[j], float(faces.scores[j]), now)
            found.append(faces)
        for key in keys:
            if key in self.tracks:
                self.tracks[key].seen = now
        faces = Faces.concat(found)
        return faces[np.argsort(faces.frame_ids, kind="stable")] if len(faces) else faces

    def _anchor(self, key: Hashable, frame: np.ndarray, box: np.ndarray, keypoints: np.ndarray,
                score: float, now: float) -> None:
        """Remember a detected face as this key's anchor (no anchor for a face too small to match)."""
        self.tracks.pop(key, None)
        h, w = frame.shape[:2]
        x1, y1 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
        x2, y2 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
        side = max(x2 - x1, y2 - y1)
        if side < 12 or x2 - x1 < 8 or y2 - y1 < 8:
            return
        scale = min(1.0, TEMPLATE_SIDE / side)
        patch = to_gray(frame[y1:y2, x1:x2])
        size = (max(4, round((x2 - x1) * scale)), max(4, round((y2 - y1) * scale)))
        template = cv2.resize(patch, size, interpolation=cv2.INTER_AREA)
        if float(template.std()) < 2.0 or score < self.min_anchor_score:
            return    # a flat patch matches anything; a doubtful face is detected again next sample
        self.tracks[key] = Track(box.astype(np.float32).copy(), keypoints.astype(np.float32).copy(), score,
                                 template, (x1, y1), scale, (h, w), 0, now)

    def _follow(self, track: Track, frame: np.ndarray, frame_id: int) -> Faces | None:
        """The anchor's face found again in `frame` (one face, shifted), or None: detect instead."""
        if track.since_detect + 1 >= self.redetect_every or frame.shape[:2] != track.shape:
            return None
        h, w = track.shape
        th, tw = track.template.shape
        fw, fh = tw / track.scale, th / track.scale
        mx, my = SEARCH_MARGIN * fw, SEARCH_MARGIN * fh
        sx1, sy1 = max(0, int(track.origin[0] - mx)), max(0, int(track.origin[1] - my))
        sx2, sy2 = min(w, int(np.ceil(track.origin[0] + fw + mx))), min(h, int(np.ceil(track.origin[1] + fh + my)))
        size = (round((sx2 - sx1) * track.scale), round((sy2 - sy1) * track.scale))
        if size[0] < tw + 2 or size[1] < th + 2:
            return None
        region = to_gray(frame[sy1:sy2, sx1:sx2])
        search = cv2.resize(region, size, interpolation=cv2.INTER_AREA)
        scores = cv2.matchTemplate(search, track.template, cv2.TM_CCOEFF_NORMED)
        _, best, _, (bx, by) = cv2.minMaxLoc(scores)
        if not np.isfinite(best) or best < self.min_match:
            self.stats.lost += 1
            return None
        dx = sx1 + bx / track.scale - track.origin[0]
        dy = sy1 + by / track.scale - track.origin[1]
        shift = np.array([dx, dy], np.float32)
        box = track.box + np.tile(shift, 2)
        box[[0, 2]] = box[[0, 2]].clip(0, w)
        box[[1, 3]] = box[[1, 3]].clip(0, h)
        track.since_detect += 1
        return Faces(box[None], np.array([track.score], np.float32), (track.keypoints + shift)[None],
                     np.array([frame_id], np.int32))

    def _expire(self, now: float) -> None:
        """Forget students not seen for ttl_seconds, and the oldest beyond max_tracks."""
        stale = [key for key, track in self.tracks.items() if now - track.seen > self.ttl_seconds]
        for key in stale:
            del self.tracks[key]
        if len(self.misses) > self.max_tracks:
            self.misses.clear()
        if len(self.was_near) > self.max_tracks:
            self.was_near.clear()
        if len(self.tracks) > self.max_tracks:
            for key in sorted(self.tracks, key=lambda k: self.tracks[k].seen)[:len(self.tracks) - self.max_tracks]:
                del self.tracks[key]
