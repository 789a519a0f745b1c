"""Live detection: onset and offset events of any prompts, decided as the audio arrives.

`StreamDetector` wraps a `FlamDetector`. Audio is fed in blocks of any length (mono float32 at
the model's rate; `flam stream` resamples and downmixes what it reads); text embeddings are
computed once, when the stream starts. Every `hop` frames of new audio (the hop rounded to whole
frames: 1 s is 3 frames of 0.3125 s) the detector embeds the last `window_frames` frames (10 s)
and a frame's score becomes final once it has `margin` frames of audio after it in a window
(`FlamDetector.keep[0]`: 4 frames, 1.25 s, the least right context offline detection gives a
frame). Before 10 s have arrived, the window is the first 10 s with the part not yet heard as
silence, as at the end of a file. At the end of the stream the last windows cover the rest.
Windows end at frame counts `W - k * hop` and `W + k * hop`, so with a hop equal to offline
detection's step (`FlamDetector.step`) they are offline detection's windows: every frame score
then equals `detect`'s, but for the first `margin` frames, which come from the first window
before its audio is complete. With a shorter hop each frame comes from the earliest window
that gives it `margin` frames of right context instead of the one where it is most central.

Events, per prompt, from the final scores exactly as offline segments are made
(`segments_from_frames`): the `median_frames` median filter (which waits `median_frames // 2`
frames for its right neighbours) against the detector's threshold for that prompt. An onset is
emitted when a run of frames above the threshold starts (`time`: its first frame's start, `score`:
that frame's score), an offset when it ends (`time`: the end of its last frame, `score`: the run's
highest score); an open run is closed at the end of the stream.

Latency, from the moment a sound's first frame is complete in the input to its onset line:
`margin` + `median_frames // 2` frames of look-ahead (1.56 s), plus up to one hop of waiting for
the next window, plus the time to embed it. Memory: one window of samples and `median_frames`
scores per prompt, whatever the stream's length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from flam_core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from flam_core.inference import FlamDetector


@dataclass
class _Run:
    """The decision state of one prompt."""

    threshold: float
    active: bool = False
    peak: float = 0.0


class StreamDetector:
    """Feed samples (`feed`), then `close`; both return the events they decided, in time order."""

    def __init__(
        self,
        detector: FlamDetector,
        prompts: list[str],
        hop_s: float = 1.0,
        threshold: float | None = None,
        on_scores: Callable[[int, np.ndarray], None] | None = None,
    ) -> None:
        """`on_scores(first frame, [K, t] scores)` sees every frame score as it becomes final."""
        self.detector, self.prompts, self.on_scores = detector, list(prompts), on_scores
        detector.prompt_embeddings(self.prompts)  # bad prompts fail now; embedded once
        self.frame_s, self.fs = detector.frame_hop_s, detector.frame_samples
        self.window, self.margin = detector.window_frames, detector.keep[0]
        if not (isinstance(hop_s, int | float) and math.isfinite(hop_s) and hop_s > 0):
            raise ConfigError(f"the hop must be a positive number of seconds, got {hop_s!r}")
        self.hop = max(1, round(hop_s / self.frame_s))
        if self.hop > self.window - 2 * self.margin:
            most = (self.window - 2 * self.margin) * self.frame_s
            raise ConfigError(
                f"the hop must be at most {most:g} s (a window's central frames), got {hop_s:g} s"
            )
        self.median = detector.median_frames
        self.runs = [
            _Run(float(threshold) if threshold is not None else detector.threshold_for(p))
            for p in self.prompts
        ]
        # the first window end: the smallest W - k * hop that leaves a frame with `margin` after it
        self.next_end = self.window - self.hop * ((self.window - self.margin - 1) // self.hop)
        self.buffer = np.zeros(0, dtype=np.float32)  # samples from frame `buffer_frame` on
        self.buffer_frame = 0
        self.received = 0  # samples fed
        self.final = 0  # frames whose scores are final
        self.recent = np.zeros((len(self.prompts), 0), dtype=np.float32)  # last final scores
        self.recent_first = 0  # frame index of recent[:, 0]
        self.filtered = 0  # frames whose events are decided
        self.closed = False

    # --- audio in ----------------------------------------------------------------------------
    def feed(self, samples: np.ndarray) -> list[dict[str, Any]]:
        """Mono float32 samples at the model's rate -> the events they decide."""
        if self.closed:
            raise DataError("the stream is closed")
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if not np.isfinite(samples).all():
            raise DataError("the stream holds NaN or infinite samples")
        self.buffer = np.concatenate([self.buffer, samples])
        self.received += len(samples)
        events: list[dict[str, Any]] = []
        while self.next_end * self.fs <= self.received:
            events += self._window(self.next_end, self.next_end - self.margin)
            self.next_end += self.hop
        return events

    def close(self) -> list[dict[str, Any]]:
        """The end of the stream: the remaining frames, and every run still open closed."""
        if self.closed:
            return []
        total = max(1, math.ceil(self.received / self.fs))
        events: list[dict[str, Any]] = []
        while self.final < total:
            end = self.next_end  # the last window gives every frame to the end, as offline
            events += self._window(end, total if end - self.margin >= total else end - self.margin)
            self.next_end += self.hop
        events += self._decide(total, end_of_stream=True)
        self.closed = True
        return events

    def run(self, blocks: Iterable[np.ndarray]) -> Iterator[dict[str, Any]]:
        """Every event of a stream of sample blocks, as each is decided."""
        for block in blocks:
            yield from self.feed(block)
        yield from self.close()

    # --- scoring -----------------------------------------------------------------------------
    def _window(self, end: int, upto: int) -> list[dict[str, Any]]:
        """Score the window of frames ending at `end` and make frames [final, upto) final."""
        start = max(0, end - self.window)
        lo = (start - self.buffer_frame) * self.fs
        piece = self.buffer[lo : lo + self.window * self.fs]
        window = np.zeros(self.window * self.fs, dtype=np.float32)
        window[: len(piece)] = piece
        new = []
        if upto > self.final:
            emb = self.detector.window_embeddings([window])[0]
            new = self.detector.score(emb[self.final - start : upto - start], self.prompts)  # [K, t]
            if self.on_scores is not None:
                self.on_scores(self.final, new)
            self.recent = np.concatenate([self.recent, new], axis=1)
            self.final = upto
        # keep the samples the next window needs
        keep_from = max(0, self.next_end + self.hop - self.window)
        if keep_from > self.buffer_frame:
            self.buffer = self.buffer[(keep_from - self.buffer_frame) * self.fs :]
            self.buffer_frame = keep_from
        return self._decide(self.final) if len(new) else []

    def _decide(self, known: int, end_of_stream: bool = False) -> list[dict[str, Any]]:
        """Events of the frames whose median-filtered score is known (all of them at the end)."""
        half, after = self.median // 2, self.median - 1 - self.median // 2
        upto = known if end_of_stream else known - after
        events: list[dict[str, Any]] = []
        for g in range(self.filtered, max(self.filtered, upto)):
            idx = np.clip(np.arange(g - half, g + after + 1), 0, known - 1) - self.recent_first
            frame = self.recent[:, g - self.recent_first]
            # the element of rank k // 2, edges repeated: `postprocess.median_filter_frames`
            filtered = np.partition(self.recent[:, idx], half, axis=1)[:, half]
            for k, run in enumerate(self.runs):
                above = filtered[k] > run.threshold
                if above and not run.active:
                    run.active, run.peak = True, float(frame[k])
                    events.append(self._event("onset", k, g * self.frame_s, float(frame[k])))
                elif above:
                    run.peak = max(run.peak, float(frame[k]))
                elif run.active:
                    run.active = False
                    events.append(self._event("offset", k, g * self.frame_s, run.peak))
        self.filtered = max(self.filtered, upto)
        if end_of_stream:
            duration = self.received / self.detector.sample_rate
            for k, run in enumerate(self.runs):
                if run.active:
                    run.active = False
                    events.append(self._event("offset", k, min(known * self.frame_s, duration), run.peak))
        # keep the scores the median filter still needs
        drop = max(0, self.filtered - half) - self.recent_first
        if drop > 0:
            self.recent, self.recent_first = self.recent[:, drop:], self.recent_first + drop
        return events

    def _event(self, kind: str, k: int, time: float, score: float) -> dict[str, Any]:
        return {"event": kind, "prompt": self.prompts[k], "time": round(time, 3), "score": round(score, 4)}
