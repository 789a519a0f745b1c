"""Drift monitoring: audio statistics, score columns and evidently drift reports on real mixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from torchaudio.functional import lowpass_biquad

from flam_core.data.recipes import read_recipes
from flam_core.errors import DataError, FlamError
from flam_core.monitor import (
    LOUDNESS_FLOOR_LUFS,
    STAT_COLUMNS,
    DriftExceeded,
    audio_statistics,
    check,
    drift_report,
    score_columns,
    statistics_from_files,
    statistics_table,
)

SR = 16000


def sine(freq: float, peak: float, seconds: float, rate: int = SR) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (peak * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def shift(audio: np.ndarray, rate: int) -> np.ndarray:
    """20 dB quieter and low-passed at 500 Hz."""
    quiet = torch.from_numpy(audio) * 10 ** (-20 / 20)
    return lowpass_biquad(quiet, rate, 500.0).numpy()


@pytest.fixture(scope="module")
def mixtures(mixer, smoke_recipes) -> dict[str, list[np.ndarray]]:
    recipes_dir, _ = smoke_recipes
    out = {}
    for split in ("train", "val", "test_seen"):
        plan = mixer.plan(read_recipes(recipes_dir / f"{split}.parquet"))
        out[split] = [mixer.mix(plan, i).audio for i in range(len(plan))]
    return out


@pytest.fixture(scope="module")
def tables(mixtures, mixer) -> dict[str, pd.DataFrame]:
    rate = mixer.sample_rate
    others = [(f"{s}-{i}", a) for s in ("val", "test_seen") for i, a in enumerate(mixtures[s])]
    return {
        "reference": statistics_table((f"train-{i}", a, rate) for i, a in enumerate(mixtures["train"])),
        "current": statistics_table((clip, a, rate) for clip, a in others),
        "shifted": statistics_table((clip, shift(a, rate), rate) for clip, a in others),
    }


@pytest.fixture(scope="module")
def reports(tables, tmp_path_factory):
    root = tmp_path_factory.mktemp("drift")
    return {
        name: drift_report(tables["reference"], tables[name], root / name) for name in ("current", "shifted")
    }


# ---------------------------------------------------------------------------------------------
# statistics


def test_sine_statistics():
    stats = audio_statistics(sine(1000.0, 0.1, 5.0), SR)
    assert set(stats) == set(STAT_COLUMNS)
    assert stats["duration_s"] == pytest.approx(5.0)
    assert stats["peak_dbfs"] == pytest.approx(-20.0, abs=0.01)
    assert stats["rms_dbfs"] == pytest.approx(-23.01, abs=0.02)
    assert stats["spectral_centroid_hz"] == pytest.approx(1000.0, abs=10.0)
    assert stats["silence_share"] == 0.0
    assert stats["loudness_lufs"] == pytest.approx(-23.01, abs=0.1)


@pytest.mark.parametrize("rate", [16000, 48000])
def test_loudness_of_bs1770_reference_sine(rate):
    """A full-scale 997 Hz sine reads -3.01 LUFS; loudness follows gain even at full scale."""
    full = audio_statistics(sine(997.0, 1.0, 5.0, rate), rate)["loudness_lufs"]
    half = audio_statistics(sine(997.0, 0.5, 5.0, rate), rate)["loudness_lufs"]
    assert full == pytest.approx(-3.01, abs=0.1)
    assert full - half == pytest.approx(20 * np.log10(2), abs=0.01)


def test_silence_and_short_clips_give_floors():
    silent = audio_statistics(np.zeros(2 * SR, np.float32), SR)
    assert all(np.isfinite(v) for v in silent.values())
    assert silent["loudness_lufs"] == LOUDNESS_FLOOR_LUFS
    assert silent["silence_share"] == 1.0
    assert silent["spectral_centroid_hz"] == 0.0
    short = audio_statistics(sine(1000.0, 0.5, 0.3), SR)
    assert short["loudness_lufs"] == LOUDNESS_FLOOR_LUFS
    assert short["rms_dbfs"] == pytest.approx(-9.03, abs=0.05)
    half = np.concatenate([sine(440.0, 0.5, 1.0), np.zeros(SR, np.float32)])
    assert audio_statistics(half, SR)["silence_share"] == pytest.approx(0.5, abs=0.02)


def test_invalid_audio_raises():
    with pytest.raises(DataError, match="NaN"):
        audio_statistics(np.array([0.1, np.nan] * 1000, np.float32), SR)
    with pytest.raises(DataError, match="mono"):
        audio_statistics(np.zeros((2, SR), np.float32), SR)
    with pytest.raises(DataError, match="clip bad"):
        statistics_table([("bad", np.zeros(0, np.float32), SR)])


def test_statistics_of_real_mixtures(tables):
    reference = tables["reference"]
    assert list(reference.columns) == ["clip", *STAT_COLUMNS]
    assert len(reference) == 64 and reference["clip"].is_unique
    assert np.isfinite(reference[list(STAT_COLUMNS)].to_numpy()).all()
    assert (reference["duration_s"] == 10.0).all()
    assert (reference["peak_dbfs"] <= 0.0).all()
    assert (reference["loudness_lufs"] > LOUDNESS_FLOOR_LUFS).all()
    shifted, current = tables["shifted"], tables["current"]
    assert (current["loudness_lufs"] - shifted["loudness_lufs"]).min() > 15.0
    lower = shifted["spectral_centroid_hz"] < current["spectral_centroid_hz"]
    assert lower.mean() > 0.9
    assert shifted["spectral_centroid_hz"].median() < 0.5 * current["spectral_centroid_hz"].median()


def test_statistics_from_files_downmixes(tmp_path, mixtures):
    left, right = mixtures["val"][0], mixtures["val"][1]
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.stack([left, right], axis=1), SR, subtype="FLOAT")
    table = statistics_from_files([path])
    assert table["clip"].tolist() == [str(path)]
    expected = audio_statistics((left + right) / 2, SR)
    for column in STAT_COLUMNS:
        assert table.loc[0, column] == pytest.approx(expected[column], rel=1e-4, abs=1e-4)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not audio")
    with pytest.raises(DataError, match=r"broken\.wav"):
        statistics_from_files([path, broken])


# ---------------------------------------------------------------------------------------------
# drift reports on real audio


def test_unshifted_batch_passes(reports):
    result = reports["current"]
    assert result.passed
    assert result.drift_share <= result.max_drift_share == 0.5
    assert result.n_columns == len(STAT_COLUMNS)
    assert result.drift_share == pytest.approx(len(result.drifted_columns) / result.n_columns)
    assert "loudness_lufs" not in result.drifted_columns
    check(result, fail=True)


def test_shifted_batch_is_flagged(reports):
    result = reports["shifted"]
    assert not result.passed
    assert result.drift_share > 0.5
    assert {"loudness_lufs", "rms_dbfs", "peak_dbfs", "spectral_centroid_hz"} <= set(result.drifted_columns)
    assert "duration_s" not in result.drifted_columns
    assert result.columns["loudness_lufs"].method == "K-S p_value"
    assert result.columns["loudness_lufs"].threshold == 0.05
    assert result.columns["loudness_lufs"].score < 0.05
    check(result, fail=False)
    with pytest.raises(DriftExceeded, match="spectral_centroid_hz") as caught:
        check(result, fail=True)
    assert isinstance(caught.value, FlamError)
    assert "loudness_lufs" in str(caught.value) and "0.500" in str(caught.value)


@pytest.mark.parametrize("name", ["current", "shifted"])
def test_report_files_match_result(reports, name):
    result = reports[name]
    assert result.html_path.name == "drift.html" and result.json_path.name == "drift.json"
    assert result.html_path.stat().st_size > 10_000
    assert "<html" in result.html_path.read_text()[:2000].lower()
    document = json.loads(result.json_path.read_text())
    summary = document["summary"]
    assert summary["drift_share"] == result.drift_share
    assert summary["drifted_columns"] == result.drifted_columns
    assert summary["passed"] == result.passed
    assert summary["max_drift_share"] == result.max_drift_share
    assert summary["n_columns"] == result.n_columns
    assert summary["columns"]["rms_dbfs"]["method"] == result.columns["rms_dbfs"].method
    tests = {t["name"]: t["status"] for t in document["tests"]}
    for column in STAT_COLUMNS:
        expected = "FAIL" if column in result.drifted_columns else "SUCCESS"
        assert tests[f"Value Drift for column {column}"] == expected
    leftovers = [p.name for p in result.html_path.parent.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


# ---------------------------------------------------------------------------------------------
# score distributions


def test_score_columns_layout_and_checks():
    scores = {"dog barking": np.array([[0.1, 0.9, 0.2], [0.0, 0.2, 0.4]])}
    table = score_columns(scores, clips=["a", "b"])
    assert list(table.columns) == ["clip", "score_max:dog barking", "score_mean:dog barking"]
    assert table["score_max:dog barking"].tolist() == pytest.approx([0.9, 0.4])
    assert table["score_mean:dog barking"].tolist() == pytest.approx([0.4, 0.2])
    with pytest.raises(DataError, match="siren"):
        score_columns({"dog barking": np.zeros((2, 3)), "siren": np.zeros((3, 3))})
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        score_columns({"siren": np.full((2, 3), 1.5)})


def test_score_drift_flags_the_shifted_prompt(tmp_path):
    rng = np.random.default_rng(7)
    prompts = ("dog barking", "siren", "rain")

    def batch(n: int, shifted: str | None) -> dict[str, np.ndarray]:
        return {p: rng.beta(5, 2, (n, 31)) if p == shifted else rng.beta(2, 5, (n, 31)) for p in prompts}

    reference = score_columns(batch(80, None))
    current = score_columns(batch(40, "siren"))
    result = drift_report(reference, current, tmp_path / "scores")
    assert set(result.drifted_columns) == {"score_max:siren", "score_mean:siren"}
    assert result.n_columns == 6
    assert result.passed  # 2 of 6 columns


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_input_raises_before_writing(tables, tmp_path):
    reference, current = tables["reference"], tables["current"]
    out = tmp_path / "report"
    with pytest.raises(DataError, match="current table is empty"):
        drift_report(reference, current.iloc[:0], out)
    with pytest.raises(DataError, match="reference table is empty"):
        drift_report(reference.iloc[:0], current, out)
    with pytest.raises(DataError, match=r"lacks column.*spectral_centroid_hz"):
        drift_report(reference, current.drop(columns=["spectral_centroid_hz"]), out)
    with pytest.raises(DataError, match=r"lacks column.*no_such"):
        drift_report(reference, current, out, columns=["rms_dbfs", "no_such"])
    nan = current.copy()
    nan.loc[3, "rms_dbfs"] = np.nan
    with pytest.raises(DataError, match=r"\['rms_dbfs'\].*NaN"):
        drift_report(reference, nan, out)
    with pytest.raises(DataError, match="not numeric"):
        drift_report(reference, current, out, columns=["clip"])
    assert list(tmp_path.iterdir()) == []


def test_error_during_report_leaves_nothing(tables, tmp_path, monkeypatch):
    from evidently.core.report import Snapshot

    def broken_save(self, path):
        Path(path).write_text("<html> half")
        raise OSError("disk full")

    monkeypatch.setattr(Snapshot, "save_html", broken_save)
    with pytest.raises(OSError, match="disk full"):
        drift_report(tables["reference"], tables["current"], tmp_path / "report", columns=["rms_dbfs"])
    assert list(tmp_path.iterdir()) == []
