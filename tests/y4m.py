"""Write a real video as a .y4m file, the format Chromium's fake camera plays (--use-file-for-fake-video-capture)."""
from __future__ import annotations

from pathlib import Path

import cv2

from bot.students import load_video_frames


def video_to_y4m(video: Path, out: Path, width: int = 320, height: int = 240, fps: int = 10,
                 max_seconds: float = 15.0) -> Path:
    frames = load_video_frames(video, width, height, fps, max_seconds)
    with open(out, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            f.write(b"FRAME\n")
            f.write(cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420).tobytes())
    return out
