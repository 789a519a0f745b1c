"""What a detection is: frame probabilities of prompts on a recording's timeline and the segments
found in them; its heatmap; and the check that refuses digital silence.

`FlamDetector.detect` (one recording), `flam_core.batch` (many) and `flam stream` (live audio)
produce these; the CLI and the served model render them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flam_core.errors import SilentAudioError

SILENCE_PEAK = 1e-6  # digital silence: nothing to detect, most likely a broken recording


@dataclass
class Detection:
    """Frame probabilities `[K, T]` on a `frame_hop_s` grid and per-prompt segments."""

    model: str
    frame_hop_s: float
    duration_s: float
    prompts: list[str]
    probs: np.ndarray  # [K, T] the detector's frame probabilities in [0, 1]
    segments: list[dict[str, Any]]  # {"prompt", "onset", "offset", "score"}, by prompt then onset

    def to_json(self, decimals: int = 4) -> dict[str, Any]:
        return {
            "model": self.model,
            "frame_hop_s": self.frame_hop_s,
            "duration_s": round(self.duration_s, 3),
            "prompts": list(self.prompts),
            "probs": np.round(self.probs.astype(np.float64), decimals).tolist(),
            "segments": [
                {
                    "prompt": s["prompt"],
                    "onset": round(s["onset"], 3),
                    "offset": round(s["offset"], 3),
                    "score": round(s["score"], decimals),
                }
                for s in self.segments
            ],
        }


def check_not_silent(name: str, peak: float) -> None:
    """Raise `SilentAudioError` for audio named `name` whose highest |sample| is `peak`, when
    that is digital silence (below `SILENCE_PEAK`)."""
    if peak < SILENCE_PEAK:
        raise SilentAudioError(f"{name} is digital silence: there is nothing to detect")


def plot_detection(detection: Detection, path: Path | str) -> Path:
    """The prompt x time score heatmap with the detected segments drawn over it (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    k, t = detection.probs.shape
    fig, ax = plt.subplots(figsize=(min(18, 3 + t * detection.frame_hop_s / 4), 1 + 0.5 * k))
    image = ax.imshow(
        detection.probs,
        aspect="auto",
        vmin=0,
        vmax=1,
        cmap="magma",
        extent=(0, t * detection.frame_hop_s, k, 0),
        interpolation="nearest",
    )
    row = {p: i for i, p in enumerate(detection.prompts)}
    for seg in detection.segments:
        y = row[seg["prompt"]]
        ax.plot([seg["onset"], seg["offset"]], [y + 0.85, y + 0.85], color="cyan", linewidth=3)
    ax.set_yticks(np.arange(k) + 0.5, detection.prompts)
    ax.set_xlabel("time (s); cyan: detected segments")
    fig.colorbar(image, ax=ax, label="frame score")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
