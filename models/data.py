"""Load FER2013 (challenge CSV, image-folder layout or archive.zip) and the FER+ vote relabelling.

Everything ends up as one `FerData`: 48x48 uint8 faces, a split name per row, FER2013's own label
and (when fer2013new.csv sits beside the CSV) the FER+ votes mapped onto our seven labels.
"""
from __future__ import annotations

import csv
import gzip
import io
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from core.emotions import EMOTIONS, NUM_EMOTIONS, canonical_emotion

SPLITS = ("Training", "PublicTest", "PrivateTest")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# FER+ columns after "Usage,Image name": neutral, happiness, surprise, sadness, anger, disgust, fear,
# contempt, unknown, NF. Index into those 10 columns for each of our EMOTIONS.
FERPLUS_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                   "contempt", "unknown", "NF")
_FERPLUS_TO_OURS = [FERPLUS_COLUMNS.index(c) for c in
                    ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")]
# "test" is what the image-folder layout calls its split when file names do not say which test half.
_SPLIT_ALIASES = {"training": "Training", "train": "Training", "publictest": "PublicTest",
                  "privatetest": "PrivateTest", "test": "test", "val": "PublicTest", "validation": "PublicTest"}


class DatasetError(Exception):
    """A dataset that cannot be read, with a message meant for the person who gave its path."""


@dataclass
class FerData:
    images: np.ndarray                 # (N, 48, 48) uint8 gray
    labels: np.ndarray                 # (N,) int64 FER2013 label in EMOTIONS order, -1 unknown
    splits: np.ndarray                 # (N,) str: Training | PublicTest | PrivateTest | test
    votes: np.ndarray | None = None    # (N, 10) FER+ votes in FERPLUS_COLUMNS order, or None

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, mask: np.ndarray) -> "FerData":
        return FerData(self.images[mask], self.labels[mask], self.splits[mask],
                       None if self.votes is None else self.votes[mask])

    def split(self, name: str) -> "FerData":
        """Rows of one split; "test" in image-folder data also answers PublicTest/PrivateTest requests."""
        mask = self.splits == name
        if not mask.any() and name in ("PublicTest", "PrivateTest"):
            mask = self.splits == "test"
        return self.subset(mask)

    def ferplus_soft(self) -> np.ndarray:
        """(N, 7) FER+ vote distribution over our labels (contempt/unknown/NF votes dropped)."""
        if self.votes is None:
            raise DatasetError("no FER+ votes: put fer2013new.csv beside fer2013.csv")
        seven = self.votes[:, _FERPLUS_TO_OURS].astype(np.float32)
        total = seven.sum(1, keepdims=True)
        return np.divide(seven, total, out=np.zeros_like(seven), where=total > 0)

    def ferplus_majority(self) -> np.ndarray:
        """FER+ majority label per row in EMOTIONS order; -1 where the majority over all ten columns
        is contempt, unknown or not-a-face, is tied, or the row has no votes (FER+'s test protocol)."""
        if self.votes is None:
            raise DatasetError("no FER+ votes: put fer2013new.csv beside fer2013.csv")
        votes = self.votes
        top = votes.max(1)
        winner = votes.argmax(1)
        tied = (votes == top[:, None]).sum(1) > 1
        ours = np.full(len(votes), -1, np.int64)
        for our_index, column in enumerate(_FERPLUS_TO_OURS):
            ours[winner == column] = our_index
        ours[tied | (top == 0)] = -1
        return ours

    def targets(self, labels: str) -> tuple[np.ndarray, np.ndarray]:
        """(hard labels with -1 = excluded, soft (N,7) targets) for labels 'fer2013' or 'ferplus'."""
        if labels == "fer2013":
            hard = self.labels
            soft = np.zeros((len(hard), NUM_EMOTIONS), np.float32)
            ok = hard >= 0
            soft[np.flatnonzero(ok), hard[ok]] = 1.0
            return hard, soft
        if labels == "ferplus":
            return self.ferplus_majority(), self.ferplus_soft()
        raise DatasetError(f"unknown label set {labels!r}: use fer2013 or ferplus")


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, "r", encoding="utf-8", newline="")


def load_fer2013_csv(path: str | os.PathLike) -> FerData:
    """The challenge CSV (`emotion,pixels,Usage`, optionally gzipped); FER+ votes are attached when
    fer2013new.csv lies in the same folder and has the same number of rows."""
    path = Path(path)
    images: list[np.ndarray] = []
    labels: list[int] = []
    splits: list[str] = []
    try:
        with _open_text(path) as handle:
            reader = csv.reader(handle)
            header = [h.strip() for h in next(reader, [])]
            if header[:3] != ["emotion", "pixels", "Usage"]:
                raise DatasetError(f"{path}: expected header 'emotion,pixels,Usage', found {','.join(header)!r}")
            for line_no, row in enumerate(reader, start=2):
                if len(row) < 3:
                    raise DatasetError(f"{path}:{line_no}: expected 3 columns, found {len(row)}")
                pixels = np.array(row[1].split(), dtype=np.int64)
                if pixels.size != 48 * 48 or pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255:
                    raise DatasetError(f"{path}:{line_no}: pixels must be 2304 values in 0..255")
                label = int(row[0])
                if not 0 <= label < NUM_EMOTIONS:
                    raise DatasetError(f"{path}:{line_no}: emotion must be 0..6, found {label}")
                images.append(pixels.astype(np.uint8).reshape(48, 48))
                labels.append(label)
                splits.append(_SPLIT_ALIASES.get(row[2].strip().lower(), row[2].strip()))
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile, ValueError, OverflowError, csv.Error) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"{path}: cannot read as FER2013 CSV ({exc})") from None
    if not images:
        raise DatasetError(f"{path}: no rows")
    data = FerData(np.stack(images), np.array(labels, np.int64), np.array(splits))
    ferplus = path.with_name("fer2013new.csv")
    if ferplus.exists():
        data.votes = load_ferplus_votes(ferplus, expected_rows=len(data))
    return data


def load_ferplus_votes(path: str | os.PathLike, expected_rows: int | None = None) -> np.ndarray:
    """fer2013new.csv -> (N, 10) int votes; rows with an empty image name (not a face) get NF=10."""
    path = Path(path)
    try:
        with open(path, "r", encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            header = [h.strip() for h in next(reader, [])]
            if header[2:12] != list(FERPLUS_COLUMNS):
                raise DatasetError(f"{path}: not a FER+ label file (header {','.join(header)!r})")
            rows = []
            for line_no, row in enumerate(reader, start=2):
                if not any(cell.strip() for cell in row):
                    continue                       # blank line (editors add them at the end)
                if len(row) < 12:
                    raise DatasetError(f"{path}:{line_no}: expected 12 columns, found {len(row)}")
                try:
                    votes = [int(v or 0) for v in row[2:12]]
                except ValueError:
                    raise DatasetError(f"{path}:{line_no}: votes must be whole numbers") from None
                if min(votes) < 0:
                    raise DatasetError(f"{path}:{line_no}: votes cannot be negative")
                if not row[1].strip():
                    votes = [0] * 9 + [10]
                rows.append(votes)
    except (OSError, ValueError, UnicodeDecodeError, csv.Error) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"{path}: cannot read FER+ votes ({exc})") from None
    votes = np.array(rows, np.int64).reshape(-1, len(FERPLUS_COLUMNS))
    if expected_rows is not None and len(votes) != expected_rows:
        raise DatasetError(f"{path}: {len(votes)} rows but the FER2013 CSV has {expected_rows}")
    return votes


def read_image(source: str | os.PathLike | bytes, name: str | None = None) -> np.ndarray:
    """Any common image file (png, jpg, gif, webp, ...) or its bytes -> BGR uint8 (H, W, 3).
    Raises DatasetError with a readable message for missing, empty or corrupt files (`name` says
    which file the bytes came from)."""
    if isinstance(source, (bytes, bytearray)):
        raw, name = bytes(source), name or "<bytes>"
    else:
        name = name or str(source)
        try:
            raw = Path(source).read_bytes()
        except OSError as exc:
            raise DatasetError(f"{name}: cannot read ({exc.strerror or exc})") from None
    if not raw:
        raise DatasetError(f"{name}: empty file")
    try:
        image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:     # e.g. a header claiming more pixels than OpenCV's decoding limit
        raise DatasetError(f"{name}: image too large or malformed for the decoder") from None
    if image is None:  # OpenCV has no GIF decoder; Pillow has, and knows a few more formats
        try:
            from PIL import Image
            with Image.open(io.BytesIO(raw)) as pil:
                image = cv2.cvtColor(np.asarray(pil.convert("RGB")), cv2.COLOR_RGB2BGR)
        except Exception as exc:  # Pillow raises many types for corrupt data
            raise DatasetError(f"{name}: not a readable image ({type(exc).__name__})") from None
    if image.size == 0 or min(image.shape[:2]) < 1:
        raise DatasetError(f"{name}: image has no pixels")
    return image


def to_face48(image: np.ndarray) -> np.ndarray:
    """A face crop in any size/colour -> 48x48 uint8 gray, as FER2013 stores faces."""
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    interpolation = cv2.INTER_AREA if min(gray.shape[:2]) >= 48 else cv2.INTER_LINEAR
    return cv2.resize(gray, (48, 48), interpolation=interpolation)


def iter_class_folders(root: Path) -> Iterator[tuple[str, str | None, Path]]:
    """(folder name, our label or None if we do not predict it, folder path) for each sub-folder."""
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        yield child.name, canonical_emotion(child.name), child


def _split_of(split_folder: str, filename: str) -> str:
    match = re.match(r"(Training|PublicTest|PrivateTest)_", filename)
    if match:
        return match.group(1)
    return _SPLIT_ALIASES.get(split_folder.lower(), split_folder)


def _image_folder_rows(entries: Iterable[tuple[str, str, str, bytes, str]]) -> FerData:
    """entries: (split folder, class folder, file name, bytes, where it came from) flattened to FerData."""
    images, labels, splits = [], [], []
    for split_folder, class_folder, filename, raw, where in entries:
        label = canonical_emotion(class_folder)
        if label is None:
            continue
        images.append(to_face48(read_image(raw, name=where)))
        labels.append(EMOTIONS.index(label))
        splits.append(_split_of(split_folder, filename))
    if not images:
        raise DatasetError("no images found in class folders (expected train/<class>/*.jpg, test/<class>/*.jpg)")
    return FerData(np.stack(images), np.array(labels, np.int64), np.array(splits))


def load_image_folders(root: str | os.PathLike) -> FerData:
    """The layout people download: root/{train,test}/<class>/*.jpg, or the same inside archive.zip."""
    root = Path(root)
    if root.is_file() and zipfile.is_zipfile(root):
        return _load_zip(root)

    def entries() -> Iterator[tuple[str, str, str, bytes, str]]:
        for split_dir, class_dir, file in image_folder_files(root):
            try:
                raw = file.read_bytes()
            except OSError as exc:
                raise DatasetError(f"{file}: cannot read ({exc.strerror or exc})") from None
            yield split_dir.name, class_dir.name, file.name, raw, str(file)
    return _image_folder_rows(entries())


def image_folder_files(root: Path) -> Iterator[tuple[Path, Path, Path]]:
    """(split folder, class folder, image file) for every image of an image-folder tree, sorted."""
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for _, _, class_dir in iter_class_folders(split_dir):
            for file in sorted(class_dir.iterdir()):
                if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
                    yield split_dir, class_dir, file


def _load_zip(path: Path) -> FerData:
    def entries() -> Iterator[tuple[str, str, str, bytes, str]]:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                parts = [p for p in info.filename.split("/") if p]
                if info.is_dir() or len(parts) < 3 or Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                try:
                    raw = archive.read(info)
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
                    raise DatasetError(f"{path}: {info.filename}: corrupt entry ({type(exc).__name__}: {exc})") from None
                yield parts[-3], parts[-2], parts[-1], raw, f"{path}:{info.filename}"
    try:
        return _image_folder_rows(entries())
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{path}: corrupt zip ({exc})") from None


def load_dataset(path: str | os.PathLike) -> FerData:
    """Whatever the user points at: a folder holding fer2013.csv(.gz), the CSV itself, an image-folder
    tree, or archive.zip. Raises DatasetError with a clear message otherwise."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    if path.is_dir():
        for name in ("fer2013.csv", "fer2013.csv.gz"):
            if (path / name).exists():
                return load_fer2013_csv(path / name)
        if (path / "archive.zip").exists():
            return _load_zip(path / "archive.zip")
        if any(p.is_dir() for p in path.iterdir()):
            return load_image_folders(path)
        raise DatasetError(f"{path}: empty folder (expected fer2013.csv(.gz), archive.zip or train/<class>/ images)")
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    return load_fer2013_csv(path)
