"""Drift monitoring of production audio (and model scores) against a reference batch.

Per-clip statistics (`audio_statistics`, `statistics_table`, `statistics_from_files`):

    duration_s            length in seconds
    loudness_lufs         ITU-R BS.1770 integrated loudness (`torchaudio.functional.loudness`);
                          LOUDNESS_FLOOR_LUFS for clips shorter than one 400 ms gating block, for
                          silence, and as a lower bound
    rms_dbfs, peak_dbfs   20*log10 of the RMS / absolute peak (full scale = 1.0), floored at DBFS_FLOOR
    spectral_centroid_hz  plain (unweighted) mean of `torchaudio.transforms.SpectralCentroid` over the
                          non-silent analysis frames; 0.0 when every frame is silent
    silence_share         share of analysis frames whose RMS is below SILENCE_DBFS

Analysis frames are 25 ms Hann windows every 10 ms, centred as torch.stft does (`center=True`,
reflect padding), so the silence mask and the centroid frames are the same frames.

torchaudio's K-weighting biquads clamp their output to [-1, 1]; a clip that peaks near full
scale is therefore attenuated to a peak of LOUDNESS_HEADROOM_DB below full scale before the
measurement and the gain added back afterwards (BS.1770 loudness scales exactly with gain, apart
from the absolute -70 LUFS gate, which then applies LOUDNESS_HEADROOM_DB higher at most; that can
only matter for clips whose whole loudness is below about -50 LUFS while peaking near 0 dBFS).

Model scores (`score_columns`): `score_max:<prompt>` and `score_mean:<prompt>` per clip.

`drift_report(reference, current, out_dir)` runs evidently's DataDriftPreset on the numeric
columns, which picks a test per column (for up to 1000 reference rows: two-sample
Kolmogorov-Smirnov on columns with more than 5 distinct values, chi-square with 3-5 and a
two-proportion Z-test with at most 2, each drifting at p < 0.05; above 1000 reference rows:
normed Wasserstein distance, or Jensen-Shannon distance for at most 5 values, drifting at >= 0.1).
It writes `drift.html` and `drift.json` (evidently's JSON plus our `summary` block) into out_dir
atomically: out_dir is built in a temporary sibling and renamed, replacing any previous report.

evidently takes about 15 s to import, so it is imported inside `drift_report`.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torchaudio.functional import loudness as bs1770_loudness
from torchaudio.transforms import SpectralCentroid

from flam_core.audio.io import read_audio
from flam_core.errors import AudioError, ConfigError, DataError, FlamError
from flam_core.utils import atomic_dir

LOUDNESS_FLOOR_LUFS = -70.0  # BS.1770's absolute gate
LOUDNESS_HEADROOM_DB = 12.0  # K-weighting's L1 gain is < 3.4 at rates up to 48 kHz
DBFS_FLOOR = -120.0
SILENCE_DBFS = -60.0
FRAME_S = 0.025
HOP_S = 0.010
GATE_BLOCK_S = 0.4
CLIP_COLUMN = "clip"
STAT_COLUMNS = (
    "duration_s",
    "loudness_lufs",
    "rms_dbfs",
    "peak_dbfs",
    "spectral_centroid_hz",
    "silence_share",
)
SCORE_MAX = "score_max:"
SCORE_MEAN = "score_mean:"
REPORT_HTML = "drift.html"
REPORT_JSON = "drift.json"


class DriftExceeded(FlamError):
    """The share of drifted columns is above the allowed maximum."""

    def __init__(self, result: DriftResult) -> None:
        self.result = result
        super().__init__(
            f"data drift: {len(result.drifted_columns)} of {result.n_columns} columns drifted "
            f"(share {result.drift_share:.3f} > max_drift_share {result.max_drift_share:.3f}): "
            f"{', '.join(result.drifted_columns)}; see {result.html_path}"
        )


@dataclass(frozen=True)
class ColumnDrift:
    """evidently's verdict on one column: the test it chose, its threshold and score."""

    method: str
    threshold: float
    score: float
    drifted: bool


@dataclass(frozen=True)
class DriftResult:
    drift_share: float  # drifted columns / n_columns, as evidently's DriftedColumnsCount reports it
    drifted_columns: list[str]
    n_columns: int
    passed: bool  # drift_share <= max_drift_share
    max_drift_share: float
    html_path: Path
    json_path: Path
    columns: dict[str, ColumnDrift] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "drift_share": self.drift_share,
            "drifted_columns": list(self.drifted_columns),
            "n_columns": self.n_columns,
            "passed": self.passed,
            "max_drift_share": self.max_drift_share,
            "columns": {name: asdict(col) for name, col in self.columns.items()},
        }


# ---------------------------------------------------------------------------------------------
# Audio statistics


def _dbfs(value: float) -> float:
    return 20.0 * math.log10(value) if value > 10 ** (DBFS_FLOOR / 20) else DBFS_FLOOR


@functools.lru_cache(maxsize=8)
def _centroid_transform(sample_rate: int) -> SpectralCentroid:
    n_fft = round(FRAME_S * sample_rate)
    return SpectralCentroid(sample_rate, n_fft=n_fft, hop_length=round(HOP_S * sample_rate))


def _loudness(wave: torch.Tensor, sample_rate: int, peak: float) -> float:
    if wave.numel() < round(GATE_BLOCK_S * sample_rate) or peak == 0.0:
        return LOUDNESS_FLOOR_LUFS
    gain = min(1.0, 10 ** (-LOUDNESS_HEADROOM_DB / 20) / peak)
    value = float(bs1770_loudness((wave * gain).unsqueeze(0), sample_rate)) - 20.0 * math.log10(gain)
    return max(value, LOUDNESS_FLOOR_LUFS) if math.isfinite(value) else LOUDNESS_FLOOR_LUFS


def audio_statistics(audio: np.ndarray, sample_rate: int) -> dict[str, float]:
    """The statistics of one mono waveform (see the module docstring for their definitions)."""
    audio = np.asarray(audio)
    if audio.ndim != 1 or audio.size == 0:
        raise DataError(f"audio_statistics needs a non-empty mono waveform, got shape {audio.shape}")
    if not np.issubdtype(audio.dtype, np.floating):
        raise DataError(f"audio_statistics needs float samples in [-1, 1], got {audio.dtype}")
    if not np.isfinite(audio).all():
        raise DataError("audio_statistics: the waveform holds NaN or infinite samples")
    if int(sample_rate) <= 0:
        raise DataError(f"audio_statistics: invalid sample rate {sample_rate}")
    sample_rate = int(sample_rate)
    wave = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    peak = float(wave.abs().max())
    rms = float(wave.double().square().mean().sqrt())

    transform = _centroid_transform(sample_rate)
    n_fft, hop = transform.n_fft, transform.hop_length
    framed = F.pad(wave, (0, n_fft - wave.numel())) if wave.numel() < n_fft else wave
    padded = F.pad(framed[None, None], (n_fft // 2, n_fft // 2), mode="reflect")[0, 0]
    frame_rms = padded.unfold(0, n_fft, hop).double().square().mean(dim=1).sqrt()
    silent = frame_rms < 10 ** (SILENCE_DBFS / 20)
    centroid = transform(framed).double()
    audible = centroid[~silent & centroid.isfinite()]
    return {
        "duration_s": audio.size / sample_rate,
        "loudness_lufs": _loudness(wave, sample_rate, peak),
        "rms_dbfs": _dbfs(rms),
        "peak_dbfs": _dbfs(peak),
        "spectral_centroid_hz": float(audible.mean()) if audible.numel() else 0.0,
        "silence_share": float(silent.double().mean()),
    }


def statistics_table(items: Iterable[tuple[str, np.ndarray, int]]) -> pd.DataFrame:
    """One row per `(clip_id, mono waveform, sample_rate)`: the `clip` column, then STAT_COLUMNS."""
    rows = []
    for clip, audio, sample_rate in items:
        try:
            stats = audio_statistics(audio, sample_rate)
        except DataError as exc:
            raise DataError(f"clip {clip}: {exc}") from exc
        rows.append({CLIP_COLUMN: str(clip), **stats})
    return pd.DataFrame(rows, columns=[CLIP_COLUMN, *STAT_COLUMNS])


def statistics_from_files(paths: Iterable[str | Path]) -> pd.DataFrame:
    """`statistics_table` of audio files (downmixed to mono, at their own rate); `clip` is the path."""

    def items() -> Iterable[tuple[str, np.ndarray, int]]:
        for path in paths:
            try:
                audio, rate = read_audio(path, mono=True)
            except AudioError as exc:
                raise DataError(f"cannot read audio file {path}: {exc}") from exc
            yield str(path), audio, rate

    return statistics_table(items())


# ---------------------------------------------------------------------------------------------
# Score distributions


def score_columns(scores: dict[str, np.ndarray], clips: Sequence[str] | None = None) -> pd.DataFrame:
    """Per clip and prompt: `score_max:<prompt>` and `score_mean:<prompt>` of `[n_clips, n_frames]`
    frame probabilities. With `clips`, a leading `clip` column holds their ids."""
    if not scores:
        raise DataError("score_columns: no prompts given")
    columns: dict[str, np.ndarray] = {}
    n_clips = None
    for prompt, values in scores.items():
        array = np.asarray(values, dtype=np.float64)
        if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
            raise DataError(
                f"scores for {prompt!r}: need a non-empty [n_clips, n_frames] array, got {array.shape}"
            )
        if not np.isfinite(array).all() or (array < 0).any() or (array > 1).any():
            raise DataError(f"scores for {prompt!r}: frame probabilities must be finite and in [0, 1]")
        if n_clips is not None and array.shape[0] != n_clips:
            raise DataError(f"scores for {prompt!r} cover {array.shape[0]} clips, other prompts {n_clips}")
        n_clips = array.shape[0]
        columns[SCORE_MAX + prompt] = array.max(axis=1)
        columns[SCORE_MEAN + prompt] = array.mean(axis=1)
    table = pd.DataFrame(columns)
    if clips is not None:
        if len(clips) != n_clips:
            raise DataError(f"score_columns: {len(clips)} clip ids for {n_clips} clips")
        table.insert(0, CLIP_COLUMN, [str(c) for c in clips])
    return table


# ---------------------------------------------------------------------------------------------
# Drift report


def _check_tables(reference: pd.DataFrame, current: pd.DataFrame, columns: Sequence[str] | None) -> list[str]:
    for name, table in (("reference", reference), ("current", current)):
        if not isinstance(table, pd.DataFrame):
            raise DataError(f"drift_report: {name} must be a pandas DataFrame, got {type(table).__name__}")
        if len(table) == 0:
            raise DataError(f"drift_report: the {name} table is empty (no rows)")
    if columns is None:
        columns = [
            c for c in reference.columns if c != CLIP_COLUMN and pd.api.types.is_numeric_dtype(reference[c])
        ]
        if not columns:
            raise DataError("drift_report: the reference table has no numeric columns to compare")
    columns = list(dict.fromkeys(columns))
    if not columns:
        raise DataError("drift_report: `columns` is empty")
    for name, table in (("reference", reference), ("current", current)):
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise DataError(f"drift_report: the {name} table lacks column(s) {missing}")
    for name, table in (("reference", reference), ("current", current)):
        bad_type = [c for c in columns if not pd.api.types.is_numeric_dtype(table[c])]
        if bad_type:
            raise DataError(f"drift_report: column(s) {bad_type} of the {name} table are not numeric")
        values = table[columns].to_numpy(dtype=np.float64)
        bad = [c for c, ok in zip(columns, np.isfinite(values).all(axis=0), strict=True) if not ok]
        if bad:
            raise DataError(f"drift_report: column(s) {bad} of the {name} table hold NaN or infinite values")
    return columns


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Enum):
        return value.value
    return str(value)


def _parse_snapshot(payload: dict[str, Any], columns: list[str]) -> tuple[float, dict[str, ColumnDrift]]:
    """Drift share and per-column verdicts from evidently's snapshot dict.

    `metrics` holds one `DriftedColumnsCount` (value `{count, share}`) and one `ValueDrift` per
    column (config `column`, `method`, `threshold`; value = the test's score); with
    `include_tests`, `tests` holds per `ValueDrift` metric id a test whose status is FAIL when
    evidently judged the column drifted (it knows whether a low p-value or a high distance means
    drift).
    """
    share = None
    by_metric: dict[str, dict[str, Any]] = {}
    for metric in payload["metrics"]:
        kind = metric["config"]["type"]
        if kind.endswith(":DriftedColumnsCount"):
            share = float(metric["value"]["share"])
        elif kind.endswith(":ValueDrift"):
            by_metric[metric["id"]] = metric
    status: dict[str, str] = {}
    for test in payload["tests"]:
        metric = by_metric.get(test["metric_config"]["metric_id"])
        if metric is not None:
            status[metric["config"]["column"]] = str(getattr(test["status"], "value", test["status"]))
    verdicts = {}
    for metric in by_metric.values():
        config = metric["config"]
        verdicts[config["column"]] = ColumnDrift(
            method=str(config["method"]),
            threshold=float(config["threshold"]),
            score=float(metric["value"]),
            drifted=status.get(config["column"]) == "FAIL",
        )
    if share is None or set(verdicts) != set(columns) or set(status) != set(columns):
        raise FlamError("evidently's drift snapshot lacks the expected per-column results")
    return share, {c: verdicts[c] for c in columns}


def drift_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    out_dir: Path,
    max_drift_share: float = 0.5,
    columns: Sequence[str] | None = None,
) -> DriftResult:
    """Compare `current` with `reference` column by column and write out_dir/drift.{html,json}.

    `columns` defaults to every numeric column of `reference` except `clip`. Raises `DataError`
    for an empty table, a column missing from either table, non-numeric or NaN/infinite values;
    `ConfigError` for a max_drift_share outside [0, 1].
    """
    if not 0.0 <= max_drift_share <= 1.0:
        raise ConfigError(f"max_drift_share must lie in [0, 1], got {max_drift_share}")
    columns = _check_tables(reference, current, columns)
    out_dir = Path(out_dir)

    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=columns)
    report = Report([DataDriftPreset(columns=columns, drift_share=max_drift_share)], include_tests=True)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # constant columns make the correlation widgets divide by a zero standard deviation
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = report.run(
            Dataset.from_pandas(current[columns].astype(np.float64), data_definition=definition),
            Dataset.from_pandas(reference[columns].astype(np.float64), data_definition=definition),
        )
    payload = snapshot.dict()
    share, verdicts = _parse_snapshot(payload, columns)
    result = DriftResult(
        drift_share=share,
        drifted_columns=[c for c, v in verdicts.items() if v.drifted],
        n_columns=len(columns),
        passed=share <= max_drift_share,
        max_drift_share=float(max_drift_share),
        html_path=out_dir / REPORT_HTML,
        json_path=out_dir / REPORT_JSON,
        columns=verdicts,
    )
    document = {"summary": result.summary(), **payload}
    with atomic_dir(out_dir) as staging:
        snapshot.save_html(str(staging / REPORT_HTML))
        text = json.dumps(document, indent=1, default=_json_value)
        (staging / REPORT_JSON).write_text(text + "\n")
    return result


def check(result: DriftResult, fail: bool) -> None:
    """Raise `DriftExceeded` when `fail` is set and the report did not pass."""
    if fail and not result.passed:
        raise DriftExceeded(result)


def batch_table(
    detector: Any, items: Iterable[tuple[str, np.ndarray, int]], prompts: Sequence[str]
) -> pd.DataFrame:
    """Audio statistics and the detector's score columns of `(clip, audio, sample_rate)` items."""
    items = list(items)
    stats = statistics_table(items)
    scores: dict[str, list[np.ndarray]] = {p: [] for p in prompts}
    for _, audio, rate in items:
        probs = detector.score(detector.embed(detector.load_audio(audio, rate)), list(prompts))
        for k, prompt in enumerate(prompts):
            scores[prompt].append(probs[k])
    columns = score_columns({p: _ragged(v) for p, v in scores.items()}, clips=[clip for clip, _, _ in items])
    return stats.merge(columns, on=CLIP_COLUMN)


def _ragged(rows: list[np.ndarray]) -> np.ndarray:
    """Per-clip frame scores of different lengths -> `[n, T_max]` padded with each row's mean
    (so that max and mean per row are unchanged)."""
    width = max(len(r) for r in rows)
    return np.stack([np.pad(r, (0, width - len(r)), constant_values=float(r.mean())) for r in rows])


def run_monitor(
    params: Any,
    model_dir: Path | None = None,
    current_dir: Path | None = None,
    library_dir: Path | None = None,
    recipes_dir: Path | None = None,
    out_dir: Path | None = None,
) -> DriftResult:
    """Reference: training mixtures; current: a folder of production audio (or, by default, the
    test_seen mixtures as a stand-in). Both through the same detector and statistics."""
    from flam_core.data.mixer import Mixer
    from flam_core.data.recipes import read_recipes
    from flam_core.inference import FlamDetector

    cfg = params.monitor
    library_dir = Path(library_dir or params.sources.out_dir)
    recipes_dir = Path(recipes_dir or params.synth.out_dir)
    detector = FlamDetector.from_dir(Path(model_dir or params.train.out_dir))
    mixer = Mixer.for_library(params, library_dir)
    rate = params.audio.sample_rate

    def mixtures(split: str) -> list[tuple[str, np.ndarray, int]]:
        plan = mixer.plan(read_recipes(recipes_dir / f"{split}.parquet"))
        chosen = np.linspace(0, len(plan) - 1, min(cfg.reference_mixtures, len(plan))).astype(int)
        return [(f"{split}-{int(plan.mixture_ids[i])}", mixer.render(plan, int(i)), rate) for i in chosen]

    reference = batch_table(detector, mixtures("train"), cfg.prompts)
    current_dir = current_dir or (Path(cfg.current_dir) if cfg.current_dir else None)
    if current_dir is not None:
        paths = sorted(p for p in Path(current_dir).rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
        if not paths:
            raise DataError(f"{current_dir}: no audio files ({', '.join(AUDIO_SUFFIXES)}) to monitor")
        items = [(str(p), *read_audio(p)) for p in paths]
    else:
        items = mixtures("test_seen")
    current = batch_table(detector, items, cfg.prompts)
    return drift_report(reference, current, Path(out_dir or cfg.out_dir), cfg.max_drift_share)


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
