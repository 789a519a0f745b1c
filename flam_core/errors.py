"""Project exceptions. Each message says what was wrong and, where it helps, what to do."""

from __future__ import annotations


class FlamError(Exception):
    """Base class for every error the project raises on purpose."""


class ConfigError(FlamError):
    """A parameter file, profile or override is invalid."""


class AudioError(FlamError):
    """An audio file cannot be read, is empty, or holds invalid samples."""


class SilentAudioError(AudioError):
    """The audio is digital silence: there is nothing to detect in it."""


class DataError(FlamError):
    """An input table or artifact violates its contract."""


class ExternalToolError(FlamError):
    """A required external program (apt-get, fluidsynth, espeak-ng) failed or is missing."""


class AudioTooLongError(AudioError):
    """The audio lasts longer than the limit set for this call or server."""
