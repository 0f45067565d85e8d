"""Make a live face look like a FER2013 training face: level the eyes, FER-style tight square crop,
grayscale, 48x48, in one warpAffine per face (batched over all faces of all frames)."""
from __future__ import annotations

import cv2
import numpy as np

from core.faces import Faces

# Where FER2013 puts the eyes in its 48x48 crops (measured on averaged training faces): the eye
# centre at 40 % of the height, the eyes 37.5 % of the width apart.
EYE_Y = 0.40
EYE_DISTANCE = 0.375


def face_transform(box: np.ndarray, keypoints: np.ndarray, size: int = 48) -> np.ndarray:
    """2x3 affine matrix from frame pixels to the size x size aligned crop."""
    right_eye, left_eye = keypoints[0], keypoints[1]
    centre = (right_eye + left_eye) / 2.0
    dx, dy = left_eye - right_eye
    eye_distance = float(np.hypot(dx, dy))
    angle = float(np.degrees(np.arctan2(dy, dx)))
    box_side = float(max(box[2] - box[0], box[3] - box[1]))
    # A turned head brings the eyes together: never crop tighter than the detector's box.
    side = max(eye_distance / EYE_DISTANCE, 0.9 * box_side, 8.0)
    scale = size / side
    m = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), angle, scale)
    m[0, 2] += size / 2.0 - centre[0]
    m[1, 2] += size * EYE_Y - centre[1]
    return m


def align_faces(frames: list[np.ndarray], faces: Faces, size: int = 48) -> np.ndarray:
    """(N, size, size, 1) float32 in [0, 1], one row per face, in faces order."""
    out = np.zeros((len(faces), size, size, 1), np.float32)
    grays: dict[int, np.ndarray] = {}
    for i in range(len(faces)):
        fid = int(faces.frame_ids[i])
        if fid not in grays:
            frame = frames[fid]
            grays[fid] = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        m = face_transform(faces.boxes[i], faces.keypoints[i], size)
        crop = cv2.warpAffine(grays[fid], m, (size, size), flags=cv2.INTER_AREA if m[0, 0] ** 2 + m[0, 1] ** 2 < 1
                              else cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        out[i, :, :, 0] = crop.astype(np.float32) / 255.0
    return out
