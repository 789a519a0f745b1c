"""Procedural backgrounds: coloured noise, mains hum and room tone, seeded.

Real ambiences come from the Debian packages; these add steady, well-defined noise floors
that a detector must learn to ignore. Noise colours are shaped in the frequency domain
(power ~ f^-k: white k=0, pink k=1, brown k=2).
"""

from __future__ import annotations

import numpy as np

from flam_core.config import ProceduralParams
from flam_core.data.catalog.base import RawClip
from flam_core.utils import stable_seed

PACKAGE = "procedural"
LICENCE = "CC0-1.0"


def coloured_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Gaussian noise with power spectral density ~ f^-exponent, peak-normalised, float32."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n)
    freqs[0] = freqs[1]
    spectrum *= freqs ** (-exponent / 2)
    noise = np.fft.irfft(spectrum, n)
    return (noise / np.max(np.abs(noise))).astype(np.float32)


def mains_hum(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    """50 or 60 Hz hum with decaying odd/even harmonics over a faint noise floor."""
    t = np.arange(n) / sample_rate
    base = float(rng.choice([50.0, 60.0]))
    hum = sum((0.6**k) * np.sin(2 * np.pi * base * (k + 1) * t + rng.uniform(0, 2 * np.pi)) for k in range(6))
    hum = hum + 0.02 * rng.standard_normal(n)
    return (hum / np.max(np.abs(hum))).astype(np.float32)


def room_tone(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    """Quiet, dark air noise (between pink and brown) with a slow level drift."""
    noise = coloured_noise(rng, n, float(rng.uniform(1.3, 1.8)))
    drift = 1.0 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.05, 0.2) * np.arange(n) / sample_rate)
    out = noise * drift
    return (out / np.max(np.abs(out))).astype(np.float32)


GENERATORS = {
    "white noise": (lambda rng, n, sr: coloured_noise(rng, n, 0.0), ("static hiss", "broadband hiss")),
    "pink noise": (lambda rng, n, sr: coloured_noise(rng, n, 1.0), ("soft rushing noise",)),
    "brown noise": (lambda rng, n, sr: coloured_noise(rng, n, 2.0), ("deep rumbling noise",)),
    "electrical hum": (mains_hum, ("mains hum", "a buzzing transformer", "a low electric buzz")),
    "room tone": (room_tone, ("the quiet air of an empty room", "silent room ambience")),
}


def procedural_clips(params: ProceduralParams, sample_rate: int, seed: int) -> list[RawClip]:
    n = int(round(params.duration_s * sample_rate))
    clips = []
    for label, (generate, captions) in GENERATORS.items():
        for index in range(params.clips_per_label):
            rng = np.random.default_rng(stable_seed(seed, "procedural", label, index))
            clips.append(
                RawClip(
                    source_package=PACKAGE,
                    origin=f"{label}:{index}",
                    label=label,
                    kind="background",
                    licence=LICENCE,
                    samples=generate(rng, n, sample_rate),
                    sample_rate=sample_rate,
                    captions=captions,
                )
            )
    return clips
