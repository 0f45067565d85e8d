"""Degradations of a face image like those the bot's camera path adds, for `models.evaluate --degrade`.

Each takes a gray uint8 face at webcam scale (FER2013's 48x48 faces are first upscaled to WEBCAM_FACE px,
about the size of a face in a 320x240 webcam frame) and returns it degraded, same size:

    vp8:KBPS      VP8 encode/decode (libvpx through PyAV) of 320x240 frames holding the face, 5 fps, KBPS
                  (vp8@FPS:KBPS: at FPS frames/s; every frame holds another face, so what counts is KBPS / FPS)
    jpeg:Q        JPEG at quality Q (meeting-bot services send JPEG or PNG frames)
    downscale:F   down to F x the size and back (a 720p call seen at 360p)
    blur:SIGMA    Gaussian blur (focus, motion)
    dark:GAMMA    low light: intensity^GAMMA, which darkens the mid-tones
    noise:SIGMA   Gaussian sensor noise, SIGMA in gray levels
    roll:DEG      head tilted DEG degrees in the image plane (the bot levels the eyes; this path has no detector)
    occlude:F     the lower F of the face's left half covered (a hand on the chin)
    none          nothing: only the trip to webcam scale and back, the reference for the others

Levels: low / mid / high or a number. Yaw (a head turned away) cannot be made from a 2-D face, so it is not here.
"""
from __future__ import annotations

import fractions

import cv2
import numpy as np

WEBCAM_FACE = 144
LEVELS: dict[str, tuple[float, float, float]] = {      # low, mid, high
    "none": (1, 1, 1),             # only the upscale to webcam size and back: the reference row
    "vp8": (600, 300, 150),
    "jpeg": (70, 50, 30),
    "downscale": (0.75, 0.5, 0.33),
    "blur": (1.0, 2.0, 3.0),
    "dark": (1.5, 2.0, 3.0),
    "noise": (5, 10, 20),
    "roll": (5, 10, 15),
    "occlude": (0.2, 0.3, 0.4),
}
KINDS = tuple(LEVELS)


def parse(spec: str) -> tuple[str, float]:
    """'jpeg' | 'jpeg:mid' | 'jpeg:40' -> ('jpeg', 40.0); 'vp8@3:90' -> ('vp8@3', 90.0) (VP8 at 3 frames/s);
    ValueError names the kinds and levels."""
    kind, _, level = spec.partition(":")
    base, at, _ = kind.partition("@")
    if base not in LEVELS:
        raise ValueError(f"unknown degradation {base!r}: choose from {', '.join(KINDS)}")
    fps = vp8_fps(kind) if at else None
    if at and fps is None:
        raise ValueError(f"{spec}: only vp8 takes a frame rate, as vp8@FPS with FPS from 1 to 60")
    kind = f"vp8@{fps:g}" if fps is not None else base
    names = {"low": 0, "mid": 1, "high": 2, "": 1}
    if level in names:
        return kind, float(LEVELS[base][names[level]])
    try:
        value = float(level)
    except ValueError:
        raise ValueError(f"{spec}: the level must be low, mid, high or a number") from None
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{spec}: the level must be a positive number")
    return kind, value


def degrade_faces(faces: np.ndarray, kind: str, level: float) -> np.ndarray:
    """(N, 48, 48, 1) float [0, 1] faces -> the same, each degraded at webcam scale and scaled back."""
    big = [cv2.resize((face[..., 0] * 255).round().astype(np.uint8), (WEBCAM_FACE, WEBCAM_FACE),
                      interpolation=cv2.INTER_CUBIC) for face in faces]
    out = degrade_images(big, kind, level)
    small = [cv2.resize(image, (48, 48), interpolation=cv2.INTER_AREA) for image in out]
    return (np.stack(small).astype(np.float32) / 255.0)[..., None] if small else faces.copy()


def vp8_fps(kind: str) -> float | None:
    """'vp8' -> 5.0, 'vp8@3' -> 3.0; None for another kind or a frame rate outside 1-60."""
    base, at, fps = kind.partition("@")
    if base != "vp8":
        return None
    try:
        value = float(fps) if at else 5.0
    except ValueError:
        return None
    return value if 1 <= value <= 60 else None


def degrade_images(images: list[np.ndarray], kind: str, level: float) -> list[np.ndarray]:
    """Gray uint8 images of any size -> degraded copies (vp8 runs them through one encoder as a clip)."""
    fps = vp8_fps(kind)
    if fps is not None:
        return _vp8(images, int(level * 1000), fps)
    rng = np.random.default_rng(0)
    return [_one(image, kind, level, rng) for image in images]


def _one(image: np.ndarray, kind: str, level: float, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    if kind == "none":
        return image
    if kind == "jpeg":
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(level)])
        return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    if kind == "downscale":
        small = cv2.resize(image, (max(1, round(w * level)), max(1, round(h * level))), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if kind == "blur":
        return cv2.GaussianBlur(image, (0, 0), level * image.shape[0] / WEBCAM_FACE)
    if kind == "dark":
        return (255.0 * (image / 255.0) ** level).round().astype(np.uint8)
    if kind == "noise":
        return np.clip(image + rng.normal(0, level, image.shape), 0, 255).astype(np.uint8)
    if kind == "roll":
        m = cv2.getRotationMatrix2D((w / 2, h / 2), level, 1.0)
        return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if kind == "occlude":
        out = image.copy()
        out[int(h * (1 - level)):, : w // 2] = int(np.median(image))    # a flat, skin-like patch
        return out
    raise ValueError(f"unknown degradation {kind!r}")


def _vp8(images: list[np.ndarray], bitrate: int, fps: float = 5.0) -> list[np.ndarray]:
    """Each face centred in a 320x240 frame, the frames encoded as one `fps` VP8 clip at `bitrate` (one
    keyframe a second, as the bot's senders do) and decoded again; the faces cut back out."""
    import av
    if not images:
        return []
    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height, codec.pix_fmt = 320, 240, "yuv420p"
    codec.bit_rate = bitrate
    rate = fractions.Fraction(round(fps * 1000), 1000)
    codec.framerate = rate
    codec.time_base = 1 / rate
    codec.gop_size = max(1, round(fps))
    codec.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    decoder = av.CodecContext.create("vp8", "r")
    out: list[np.ndarray] = []
    boxes: list[tuple[int, int, int, int]] = []

    def drain(packets: list) -> None:
        for packet in packets:
            for frame in decoder.decode(packet):
                x, y, w, h = boxes[len(out)]
                out.append(frame.to_ndarray(format="gray")[y:y + h, x:x + w].copy())

    for i, image in enumerate(images):
        h, w = image.shape[:2]
        scale = min(1.0, 200 / max(h, w))
        face = cv2.resize(image, (round(w * scale), round(h * scale))) if scale < 1 else image
        fh, fw = face.shape[:2]
        x, y = (320 - fw) // 2, (240 - fh) // 2
        canvas = np.full((240, 320), 110, np.uint8)
        canvas[y:y + fh, x:x + fw] = face
        boxes.append((x, y, fw, fh))
        frame = av.VideoFrame.from_ndarray(cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR), format="bgr24").reformat(format="yuv420p")
        frame.pts = i
        drain(list(codec.encode(frame)))
    drain(list(codec.encode(None)))
    return [cv2.resize(face, (image.shape[1], image.shape[0])) if face.shape != image.shape else face
            for face, image in zip(out, images)]
