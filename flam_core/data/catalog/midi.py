"""General MIDI renders: instruments, drum-kit hits and GM sound-effect programs.

All clips of a build are laid out one after another in a single MIDI file (one slot per
clip, each on its own channel with an all-sound-off at the slot's end, so no tail bleeds
into the next slot) and rendered by one `fluidsynth` call with the FluidR3_GM soundfont.
Notes, phrase lengths and velocities are drawn from a seeded generator, so a build is
reproducible. Reverb and chorus are off: the library holds dry sources.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mido
import numpy as np

from flam_core.audio.io import read_audio
from flam_core.config import MidiParams
from flam_core.data.catalog.base import ClipKind, RawClip
from flam_core.data.catalog.debian import fetch_package
from flam_core.utils import run_tool, stable_seed

PACKAGE = "fluid-soundfont-gm"
LICENCE = "MIT"
SOUNDFONT = "usr/share/sounds/sf2/FluidR3_GM.sf2"
DRUM_CHANNEL = 9
TICKS_PER_BEAT = 480
TEMPO_US = 500_000  # 120 bpm: one beat = 0.5 s
RELEASE_S = 1.5  # silence after the last note-off of a slot, for the instrument's release


@dataclass(frozen=True)
class GmSound:
    """One label rendered from GM: a melodic program or a drum key on channel 10."""

    label: str
    program: int | None = None  # 0-based GM program; None for drum-kit sounds
    drum_key: int | None = None
    pitch_range: tuple[int, int] = (48, 72)
    kind: ClipKind = "event"
    phrase: tuple[int, int] = (1, 4)  # number of notes or hits
    captions: tuple[str, ...] = ()


def _instrument(label: str, program: int, lo: int = 48, hi: int = 72, *captions: str) -> GmSound:
    return GmSound(
        label,
        program=program,
        pitch_range=(lo, hi),
        captions=(f"a {label} playing", f"someone playing the {label}", f"{label} notes", *captions),
    )


def _drum(label: str, key: int, *captions: str) -> GmSound:
    return GmSound(
        label, drum_key=key, phrase=(1, 6), captions=(f"{label} hits", f"a {label} being struck", *captions)
    )


GM_SOUNDS: tuple[GmSound, ...] = (
    _instrument("piano", 0, 40, 84, "piano keys being played"),
    _instrument("harpsichord", 6, 48, 79),
    _instrument("glockenspiel", 9, 72, 96),
    _instrument("music box", 10, 67, 91, "a tinkling music box melody"),
    _instrument("vibraphone", 11, 53, 84),
    _instrument("marimba", 12, 48, 84),
    _instrument("xylophone", 13, 65, 96),
    _instrument("tubular bells", 14, 60, 77, "chimes ringing"),
    _instrument("church organ", 19, 36, 72, "an organ playing in a church"),
    _instrument("accordion", 21, 53, 77),
    _instrument("harmonica", 22, 60, 84),
    _instrument("guitar", 24, 40, 76, "an acoustic guitar", "guitar strings plucked"),
    _instrument("electric guitar", 27, 40, 76),
    _instrument("distorted electric guitar", 30, 40, 69, "a heavy rock guitar"),
    _instrument("double bass", 32, 28, 52),
    _instrument("violin", 40, 55, 88, "a fiddle playing"),
    _instrument("cello", 42, 36, 67),
    _instrument("pizzicato strings", 45, 43, 79, "plucked violin strings"),
    _instrument("harp", 46, 36, 84),
    _instrument("timpani", 47, 40, 55, "kettle drums rolling"),
    _instrument("choir", 52, 48, 74, "a choir singing", "voices singing aah"),
    _instrument("trumpet", 56, 55, 82),
    _instrument("trombone", 57, 40, 70),
    _instrument("tuba", 58, 28, 52),
    _instrument("french horn", 60, 41, 72),
    _instrument("saxophone", 65, 49, 80, "a sax playing"),
    _instrument("oboe", 68, 58, 86),
    _instrument("bassoon", 70, 34, 65),
    _instrument("clarinet", 71, 50, 84),
    _instrument("flute", 73, 60, 93),
    _instrument("pan flute", 75, 60, 86),
    _instrument("sitar", 104, 48, 77),
    _instrument("banjo", 105, 48, 77),
    _instrument("bagpipes", 109, 55, 77),
    _instrument("steel drums", 114, 52, 76),
    GmSound("whistling", program=78, pitch_range=(67, 91), captions=("someone whistling a tune",)),
    GmSound(
        "bird chirping",
        program=123,
        pitch_range=(60, 84),
        phrase=(2, 6),
        captions=("a bird tweeting", "small birds singing"),
    ),
    GmSound(
        "telephone ringing",
        program=124,
        pitch_range=(60, 72),
        phrase=(1, 3),
        captions=("an old phone ringing", "a telephone bell"),
    ),
    GmSound(
        "helicopter flying",
        program=125,
        pitch_range=(48, 60),
        phrase=(1, 1),
        captions=("a helicopter flying overhead", "helicopter rotor noise"),
    ),
    GmSound(
        "applause",
        program=126,
        pitch_range=(55, 65),
        phrase=(1, 1),
        captions=("an audience applauding", "people clapping"),
    ),
    GmSound(
        "gunshot",
        program=127,
        pitch_range=(48, 72),
        phrase=(1, 3),
        captions=("a gun firing", "shots being fired"),
    ),
    GmSound(
        "waves on a shore",
        program=122,
        pitch_range=(55, 65),
        kind="background",
        phrase=(1, 1),
        captions=("sea waves washing on a beach", "the ocean surf"),
    ),
    _drum("bass drum", 36, "a kick drum"),
    _drum("snare drum", 38),
    _drum("hi-hat", 42, "a closed hi-hat cymbal"),
    _drum("crash cymbal", 49),
    _drum("tambourine", 54),
    _drum("cowbell", 56),
    _drum("tom drum", 45, "a tom-tom drum"),
    _drum("bongo drums", 60),
    _drum("conga drums", 63),
    _drum("maracas", 70, "shakers rattling"),
    _drum("triangle", 81, "a triangle ringing"),
    _drum("hand clapping", 39, "someone clapping hands"),
)


@dataclass(frozen=True)
class _Slot:
    sound: GmSound
    index: int
    start_s: float
    length_s: float
    notes: tuple[tuple[float, float, int, int], ...]  # (onset_s, duration_s, key, velocity)
    channel: int


def plan_slots(params: MidiParams, seed: int) -> list[_Slot]:
    """Seeded note plans for every (sound, variant) slot, laid out back to back."""
    slots: list[_Slot] = []
    start_s = 0.5
    melodic_channels = [c for c in range(16) if c != DRUM_CHANNEL]
    for sound_index, sound in enumerate(GM_SOUNDS):
        for variant in range(params.clips_per_label):
            rng = np.random.default_rng(stable_seed(seed, "midi", sound.label, variant))
            n_notes = int(rng.integers(sound.phrase[0], sound.phrase[1] + 1))
            velocity = int(rng.integers(70, 121))
            if sound.kind == "background":
                notes = ((0.0, 10.0, int(rng.integers(*sound.pitch_range)), velocity),)
            elif sound.drum_key is not None:
                step = float(rng.uniform(0.12, 0.5))
                notes = tuple(
                    (i * step, 0.1, sound.drum_key, int(np.clip(velocity + rng.integers(-15, 16), 1, 127)))
                    for i in range(n_notes)
                )
            else:
                total = float(rng.uniform(params.min_note_s, params.max_note_s))
                note_len = total / n_notes
                lo, hi = sound.pitch_range
                keys = rng.integers(lo, hi + 1, size=n_notes)
                notes = tuple((i * note_len, note_len * 0.95, int(k), velocity) for i, k in enumerate(keys))
            end_s = max(onset + dur for onset, dur, _, _ in notes)
            channel = (
                DRUM_CHANNEL
                if sound.drum_key is not None
                else melodic_channels[
                    (sound_index * params.clips_per_label + variant) % len(melodic_channels)
                ]
            )
            slot = _Slot(sound, variant, start_s, end_s + RELEASE_S, notes, channel)
            slots.append(slot)
            start_s += slot.length_s + 0.25
    return slots


def _write_midi(slots: list[_Slot], path: Path) -> None:
    """One track, absolute event times converted to delta ticks."""
    events: list[tuple[float, int, mido.Message]] = []  # (time_s, order, message)
    for slot in slots:
        if slot.sound.program is not None:
            events.append(
                (
                    slot.start_s,
                    0,
                    mido.Message("program_change", channel=slot.channel, program=slot.sound.program),
                )
            )
        for onset, duration, key, velocity in slot.notes:
            t0 = slot.start_s + onset
            events.append((t0, 2, mido.Message("note_on", channel=slot.channel, note=key, velocity=velocity)))
            events.append((t0 + duration, 1, mido.Message("note_off", channel=slot.channel, note=key)))
        # All sound off (CC 120) at the slot's end: nothing leaks into the next slot.
        events.append(
            (
                slot.start_s + slot.length_s,
                1,
                mido.Message("control_change", channel=slot.channel, control=120),
            )
        )
    events.sort(key=lambda e: (e[0], e[1]))
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=TEMPO_US, time=0)])
    ticks_per_s = TICKS_PER_BEAT * 1_000_000 / TEMPO_US
    previous = 0
    for time_s, _, message in events:
        tick = int(round(time_s * ticks_per_s))
        track.append(message.copy(time=tick - previous))
        previous = tick
    midi = mido.MidiFile(ticks_per_beat=TICKS_PER_BEAT)
    midi.tracks.append(track)
    midi.save(str(path))


def render_midi(midi_path: Path, soundfont: Path, sample_rate: int, gain: float) -> np.ndarray:
    """Render a MIDI file to mono float32 at `sample_rate` with fluidsynth (dry, no reverb)."""
    wav_path = midi_path.with_suffix(".wav")
    run_tool(
        [
            "fluidsynth",
            "-ni",
            "-q",
            "-R",
            "0",
            "-C",
            "0",
            "-g",
            str(gain),
            "-r",
            str(sample_rate),
            "-F",
            str(wav_path),
            str(soundfont),
            str(midi_path),
        ],
        hint="Install it with `make deps` (Debian package fluidsynth).",
    )
    samples, _ = read_audio(wav_path)
    return samples


def midi_clips(params: MidiParams, sample_rate: int, cache_dir: Path, seed: int) -> list[RawClip]:
    """Render every GM sound `clips_per_label` times and cut the render into clips."""
    soundfont = fetch_package(PACKAGE, cache_dir) / SOUNDFONT
    slots = plan_slots(params, seed)
    with tempfile.TemporaryDirectory(prefix="flam-midi-") as tmp:
        midi_path = Path(tmp) / "library.mid"
        _write_midi(slots, midi_path)
        render = render_midi(midi_path, soundfont, sample_rate, params.gain)
    clips = []
    for slot in slots:
        first = int(round(slot.start_s * sample_rate))
        last = min(int(round((slot.start_s + slot.length_s) * sample_rate)), len(render))
        sound = slot.sound
        source = f"program={sound.program}" if sound.program is not None else f"drum_key={sound.drum_key}"
        clips.append(
            RawClip(
                source_package=PACKAGE,
                origin=f"gm:{source}:variant={slot.index}",
                label=sound.label,
                kind=sound.kind,
                licence=LICENCE,
                samples=render[first:last].copy(),
                sample_rate=sample_rate,
                captions=sound.captions,
            )
        )
    return clips
