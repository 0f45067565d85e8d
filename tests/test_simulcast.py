"""How much of a student's low simulcast layer the bot asks Janus for: enough frames for bot.sample_hz, no more."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.simulcast import LOW_LAYER_FPS, LOW_LAYER_KBPS, temporal_layer_for

MEETING_JS = Path(__file__).resolve().parent.parent / "signaling" / "static" / "meeting.js"


@pytest.mark.parametrize("sample_hz, layer, frames_per_second", [
    (0.5, 0, 1.25),     # the base layer: every 4th frame of 5 fps
    (1.0, 0, 1.25),
    (2.0, 1, 2.5),      # the default: layers 0-1, every 2nd frame (the base layer alone cannot give 2 Hz)
    (3.0, 2, 5.0),
    (10.0, 2, 5.0),     # more than the layer carries: all of it
])
def test_the_bot_gets_the_lowest_temporal_layer_that_carries_its_sampling_rate(sample_hz, layer, frames_per_second):
    assert temporal_layer_for(sample_hz) == layer
    assert LOW_LAYER_FPS / 2 ** (2 - layer) == frames_per_second


def test_the_frame_rate_and_bitrate_assumed_are_the_meeting_pages_low_layer_caps():
    low = re.search(r'\{\s*rid:\s*"l"[^}]*\}', MEETING_JS.read_text())
    assert low is not None, "meeting.js no longer names a low simulcast layer"
    caps = dict(re.findall(r'(maxFramerate|maxBitrate):\s*([\d.]+)', low.group(0)))
    assert set(caps) == {"maxFramerate", "maxBitrate"}, f"the low layer lost a cap: {low.group(0)}"
    assert float(caps["maxFramerate"]) == LOW_LAYER_FPS
    assert int(caps["maxBitrate"]) == 1000 * LOW_LAYER_KBPS
