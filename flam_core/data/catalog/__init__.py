"""Catalog builders: each turns one family of real recordings into `RawClip`s.

- `debian`: Debian sound packages, labelled through the reviewed files in `mappings/`.
- `midi`: General MIDI renders (fluidsynth + FluidR3_GM): instruments, drums, effects.
- `speech`: espeak-ng speech in several languages and voices.
- `procedural`: coloured-noise, hum and room-tone backgrounds.
- `folder`: a user's folder of audio + CSV (`filename,label[,caption]`).
"""

from flam_core.data.catalog.base import BuildReport, RawClip

__all__ = ["BuildReport", "RawClip"]
