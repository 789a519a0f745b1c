"""A sound event on a recording's timeline: what the mixer places, what ground truth files hold
and what the metrics compare detections with."""

from __future__ import annotations

from typing import NamedTuple


class Event(NamedTuple):
    """`(onset, offset, label)`: seconds from the start of the recording, exact (not on the frame
    grid). A tuple, so sed_scores_eval and DCASE tables take it as they take their own events."""

    onset: float
    offset: float
    label: str
