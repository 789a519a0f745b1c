"""Audio I/O, resampling and activity detection."""

from flam_core.audio.activity import a_weighted_level_db, active_spans
from flam_core.audio.io import read_audio, resample, to_mono, write_flac

__all__ = ["a_weighted_level_db", "active_spans", "read_audio", "resample", "to_mono", "write_flac"]
