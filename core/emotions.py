"""The seven expression labels, in FER2013's order, used by every stage and column."""
from __future__ import annotations

EMOTIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
NUM_EMOTIONS = len(EMOTIONS)
EMOTION_INDEX: dict[str, int] = {name: i for i, name in enumerate(EMOTIONS)}

# Spellings people use for class folders (image-folder datasets, other tools' outputs).
EMOTION_ALIASES: dict[str, str] = {
    "angry": "angry", "anger": "angry", "mad": "angry",
    "disgust": "disgust", "disgusted": "disgust",
    "fear": "fear", "fearful": "fear", "afraid": "fear", "scared": "fear",
    "happy": "happy", "happiness": "happy", "joy": "happy",
    "sad": "sad", "sadness": "sad",
    "surprise": "surprise", "surprised": "surprise",
    "neutral": "neutral", "normal": "neutral", "calm": "neutral",
}


def canonical_emotion(name: str) -> str | None:
    """Map any common spelling ("Happiness", "surprised") to our label, or None if we do not predict it."""
    return EMOTION_ALIASES.get(name.strip().lower())
