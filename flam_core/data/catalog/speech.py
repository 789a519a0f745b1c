"""Synthetic speech from espeak-ng: several languages, male and female voice variants.

espeak-ng is a formant synthesiser, so its speech is labelled as a synthesized voice (not as
"a person speaking", which the real recordings of the Debian packages provide): the two must
not be confused when one is a negative for the other.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from flam_core.audio.io import read_audio
from flam_core.config import SpeechParams
from flam_core.data.catalog.base import RawClip
from flam_core.utils import run_tool, stable_seed

PACKAGE = "espeak-ng"
LICENCE = "GPL-3.0-or-later"
MALE_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7")
FEMALE_VARIANTS = ("f1", "f2", "f3", "f4", "f5")

# language code -> (language name, sentences in that language)
SENTENCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "en": (
        "english",
        (
            "The train to the city leaves in ten minutes.",
            "Please remember to close the window before you go.",
            "We walked along the river until the sun went down.",
            "Could you tell me where the nearest library is?",
            "The weather will be cold and windy tomorrow morning.",
            "She bought fresh bread and cheese at the market.",
            "Turn left at the second traffic light.",
            "Thank you all for coming to the meeting today.",
        ),
    ),
    "de": (
        "german",
        (
            "Der Zug in die Stadt fährt in zehn Minuten ab.",
            "Bitte schließen Sie das Fenster, bevor Sie gehen.",
            "Wir sind am Fluss entlang spaziert, bis es dunkel wurde.",
            "Können Sie mir sagen, wo die nächste Bibliothek ist?",
            "Morgen wird es kalt und windig sein.",
            "Vielen Dank, dass Sie heute gekommen sind.",
        ),
    ),
    "fr": (
        "french",
        (
            "Le train pour la ville part dans dix minutes.",
            "Merci de fermer la fenêtre avant de partir.",
            "Nous avons marché le long de la rivière jusqu'au soir.",
            "Pouvez-vous me dire où se trouve la bibliothèque?",
            "Il fera froid et venteux demain matin.",
            "Merci à tous d'être venus aujourd'hui.",
        ),
    ),
    "es": (
        "spanish",
        (
            "El tren a la ciudad sale en diez minutos.",
            "Por favor, cierra la ventana antes de salir.",
            "Caminamos junto al río hasta que se puso el sol.",
            "¿Puede decirme dónde está la biblioteca más cercana?",
            "Mañana por la mañana hará frío y viento.",
            "Gracias a todos por venir hoy.",
        ),
    ),
    "it": (
        "italian",
        (
            "Il treno per la città parte tra dieci minuti.",
            "Per favore, chiudi la finestra prima di uscire.",
            "Abbiamo camminato lungo il fiume fino al tramonto.",
            "Mi sa dire dove si trova la biblioteca più vicina?",
            "Domani mattina farà freddo e ci sarà vento.",
            "Grazie a tutti per essere venuti oggi.",
        ),
    ),
}


def _labels() -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(label, language code, gender, captions) for every speech class."""
    classes = []
    for code, (language, _) in SENTENCES.items():
        for gender, noun in (("male", "man"), ("female", "woman")):
            label = f"a synthesized {gender} voice speaking {language}"
            captions = (
                f"a computer voice speaking {language}",
                f"text to speech in {language}",
                f"a robotic {noun}'s voice talking in {language}",
            )
            classes.append((label, code, gender, captions))
    return classes


def speak(text: str, voice: str, speed_wpm: int, pitch: int, sample_rate: int) -> np.ndarray:
    """Synthesise `text` with espeak-ng and return mono float32 at `sample_rate`."""
    with tempfile.TemporaryDirectory(prefix="flam-speech-") as tmp:
        wav = Path(tmp) / "speech.wav"
        run_tool(
            ["espeak-ng", "-v", voice, "-s", str(speed_wpm), "-p", str(pitch), "-w", str(wav), text],
            hint="Install it with `make deps` (Debian package espeak-ng).",
        )
        samples, _ = read_audio(wav, sample_rate=sample_rate)
    return samples


def speech_clips(params: SpeechParams, sample_rate: int, seed: int) -> list[RawClip]:
    clips = []
    for label, code, gender, captions in _labels():
        sentences = SENTENCES[code][1]
        variants = MALE_VARIANTS if gender == "male" else FEMALE_VARIANTS
        for index in range(params.clips_per_label):
            rng = np.random.default_rng(stable_seed(seed, "speech", label, index))
            sentence = sentences[int(rng.integers(len(sentences)))]
            variant = variants[int(rng.integers(len(variants)))]
            speed, pitch = int(rng.integers(130, 191)), int(rng.integers(30, 71))
            voice = f"{code}+{variant}"
            clips.append(
                RawClip(
                    source_package=PACKAGE,
                    origin=f"voice={voice}:speed={speed}:pitch={pitch}:{sentence}",
                    label=label,
                    kind="event",
                    licence=LICENCE,
                    samples=speak(sentence, voice, speed, pitch, sample_rate),
                    sample_rate=sample_rate,
                    captions=captions,
                )
            )
    return clips
