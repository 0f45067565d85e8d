"""Which temporal layer of a student's low simulcast layer the bot subscribes to, for a sampling rate.

Browsers encode each VP8 simulcast layer with three temporal layers (Chrome's default, L1T3): layer 0 holds
every 4th frame, layers 0-1 every 2nd, layers 0-2 all of them. The meeting page caps the low layer at
LOW_LAYER_FPS and LOW_LAYER_KBPS (rid "l" in signaling/static/meeting.js; a test keeps them equal), so temporal layer 0 alone
is 1.25 frames/s: a bot subscribed to it could never sample 2 Hz. A stream without temporal layers (aiortc,
Firefox) is forwarded whole whatever the layer asked for.
"""
from __future__ import annotations

import math

LOW_LAYER_FPS = 5.0     # maxFramerate of the meeting page's low simulcast layer
LOW_LAYER_KBPS = 150    # its maxBitrate, in kbit/s: what a meeting student sends the bot (the load harness copies it)
TEMPORAL_LAYERS = 3     # L1T3: layer t carries LOW_LAYER_FPS / 2 ** (2 - t) frames/s together with those below it
HEADROOM = 1.2          # a browser short of CPU or light runs a little under its cap
# The share of a layer's bitrate that temporal layers 0..t carry together: libwebrtc's allocation for three VP8
# temporal layers (kLayerRateAllocation in simulcast_rate_allocator.cc: 40 %, 20 %, 40 %).
TEMPORAL_RATE_SHARE = (0.4, 0.6, 1.0)


def temporal_layer_for(sample_hz: float, layer_fps: float = LOW_LAYER_FPS) -> int:
    """The lowest temporal layer whose frame rate is at least sample_hz (with headroom): 2 Hz -> 1 (2.5 fps)."""
    for layer in range(TEMPORAL_LAYERS):
        if layer_fps / 2 ** (TEMPORAL_LAYERS - 1 - layer) >= sample_hz * HEADROOM:
            return layer
    return TEMPORAL_LAYERS - 1


def min_video_fps(sample_hz: float) -> int:
    """The fewest whole frames/s a camera track may send for the bot to sample it at sample_hz: 2 Hz -> 3."""
    return math.ceil(HEADROOM * sample_hz)


def bot_layer_fps(sample_hz: float) -> float:
    """Frames/s the bot receives from a Chrome student's low layer at sample_hz: 2 Hz -> 2.5."""
    return LOW_LAYER_FPS / 2 ** (TEMPORAL_LAYERS - 1 - temporal_layer_for(sample_hz))


def bot_layer_kbps(sample_hz: float) -> int:
    """kbit/s the bot receives from a Chrome student's low layer at sample_hz (its capped rate): 2 Hz -> 90."""
    return round(LOW_LAYER_KBPS * TEMPORAL_RATE_SHARE[temporal_layer_for(sample_hz)])
