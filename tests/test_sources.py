import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from flam_core.config import SplitParams
from flam_core.data.catalog.base import RawClip
from flam_core.data.catalog.debian import AUDIO_SUFFIXES, fetch_package, load_mapping
from flam_core.data.sources import (
    MANIFEST_COLUMNS,
    REAL_SPLIT,
    VAL_REAL_SPLIT,
    assign_splits,
    build_source_library,
    cap_per_label,
    check_readable,
    held_out_source_mask,
    library_stats,
    load_manifest,
)
from flam_core.errors import AudioError, ConfigError, DataError
from tests.conftest import ROOT, smoke_params

# A library with no Debian package and no renders: only a user folder + procedural noise.
USER_ONLY = (
    "sources.packages=[]",
    "sources.held_out_sources=[]",
    "sources.validation_sources=[]",
    "sources.max_clips_per_label=40",
    "sources.midi.enabled=false",
    "sources.speech.enabled=false",
    "sources.procedural.clips_per_label=1",
    "sources.procedural.duration_s=3",
)


def test_manifest_contract(smoke_library):
    folder, summary = smoke_library
    manifest = load_manifest(folder)
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    assert manifest["clip_id"].is_unique
    assert set(manifest["kind"]) == {"event", "background"}
    assert set(manifest["split"]) <= {"train", "val", "test", "test_real", "val_real"}
    assert set(manifest.loc[manifest["split"] == "test_real", "source_package"]) == {"scratch"}
    assert (manifest["sample_rate"] == 16000).all()
    assert check_readable(manifest, folder) == []
    for row in manifest.itertuples():
        spans = np.asarray(row.active_spans.tolist(), dtype=float).reshape(-1, 2)
        assert len(spans) >= 1, row.clip_id
        assert (spans[:, 0] >= 0).all() and (spans[:, 1] <= row.duration_s + 1e-6).all()
        assert (spans[:, 1] > spans[:, 0]).all() and (spans[1:, 0] > spans[:-1, 1]).all()
        assert row.captions[0] == row.label and len(set(row.captions)) == len(row.captions) >= 2
    assert summary.manifest_hash and summary.stats == library_stats(manifest)
    assert json.loads((folder / "summary.json").read_text()) == summary.to_json()


def test_clips_are_conditioned(smoke_library):
    folder, _ = smoke_library
    manifest = load_manifest(folder)
    for row in manifest.sample(20, random_state=0).itertuples():
        samples, rate = sf.read(folder / row.path, dtype="float32")
        assert samples.ndim == 1 and rate == 16000
        assert np.max(np.abs(samples)) == pytest.approx(10 ** (-1 / 20), abs=2e-3)  # peak_dbfs = -1
        limit = 8.0 if row.kind == "event" else 30.0
        assert len(samples) / rate <= limit + 1e-3


def test_heldout_labels_never_reach_train_and_split_by_label(smoke_library):
    folder, summary = smoke_library
    manifest = load_manifest(folder)
    events = manifest[(manifest["kind"] == "event") & ~manifest["split"].isin(["test_real", "val_real"])]
    heldout = set(summary.heldout_labels)
    assert len(heldout) / events["label"].nunique() >= 0.15
    assert set(events.loc[events["heldout"], "label"]) == heldout
    # Each held-out label lies whole in val (val_unseen) or whole in test (test_unseen), and
    # both sides get labels: the threshold for novel prompts is never chosen on test labels.
    sides = events[events["heldout"]].groupby("label")["split"].unique()
    assert all(len(s) == 1 and s[0] in ("val", "test") for s in sides)
    val_side = {label for label, s in sides.items() if s[0] == "val"}
    assert val_side == set(library_stats(manifest)["heldout_val_labels"])
    assert 0 < len(val_side) < len(heldout)
    seen = events[~events["heldout"]]
    assert set(seen.loc[seen["split"] == "train", "label"]) == set(seen["label"])
    assert not (manifest.loc[manifest["kind"] == "background", "heldout"]).any()


def test_every_package_file_is_accounted_for(smoke_library):
    _, summary = smoke_library
    packages = {p.package: p for p in summary.packages}
    assert {"scratch", "sound-theme-freedesktop", "fluid-soundfont-gm", "espeak-ng", "procedural"} <= set(
        packages
    )
    scratch = packages["scratch"]
    assert scratch.mapped >= 40 and scratch.unmapped == 0
    # mapped + excluded + unmapped + sampled out = every audio file under the mapping's root
    root = fetch_package("scratch", smoke_params().cache_path) / load_mapping("scratch").root
    n_files = sum(1 for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    assert scratch.mapped + scratch.excluded + scratch.unmapped + scratch.sampled_out == n_files


def test_split_sizes_follow_the_fractions():
    table = pd.DataFrame(
        {
            "clip_id": [f"c{i:03d}" for i in range(200)],
            "label": [f"l{i % 10}" for i in range(200)],
            "kind": "event",
        }
    )
    split, heldout = assign_splits(
        table, SplitParams(val_fraction=0.1, test_fraction=0.2, heldout_label_fraction=0.2)
    )
    assert len(heldout) == 2
    # heldout_val_fraction 0.4 of two labels: one goes whole to val, the other whole to test.
    sides = split[split["heldout"]].groupby("label")["split"].agg(set)
    assert sorted(map(tuple, sides)) == [("test",), ("val",)]
    seen = split[~split["heldout"]]
    counts = seen.groupby("label")["split"].value_counts().unstack()
    assert (counts["test"] == 4).all() and (counts["val"] == 2).all() and (counts["train"] == 14).all()
    again, _ = assign_splits(
        table, SplitParams(val_fraction=0.1, test_fraction=0.2, heldout_label_fraction=0.2)
    )
    pd.testing.assert_frame_equal(split, again)


def test_a_label_that_also_names_backgrounds_is_never_held_out():
    """Backgrounds play under training mixtures with their label as a prompt: such a label
    cannot be an unseen one, whatever the draw."""
    events = pd.DataFrame(
        {"clip_id": [f"e{i:03d}" for i in range(100)], "label": [f"l{i % 10}" for i in range(100)]}
    )
    backgrounds = pd.DataFrame({"clip_id": [f"b{i}" for i in range(8)], "label": [f"l{i}" for i in range(8)]})
    table = pd.concat([events.assign(kind="event"), backgrounds.assign(kind="background")], ignore_index=True)
    for seed in range(5):
        split, heldout = assign_splits(table, SplitParams(seed=seed, heldout_label_fraction=0.2))
        assert heldout == ["l8", "l9"]  # the two labels without a background, as 20% of 10 asks
        assert set(split.loc[split["heldout"], "label"]) == {"l8", "l9"}
        assert (split.loc[split["kind"] == "background", "split"] != "test").any()  # backgrounds still split


def test_held_out_sources_go_whole_to_test_real_and_the_rest_splits_as_without_them():
    table = pd.DataFrame(
        {
            "clip_id": [f"c{i:03d}" for i in range(120)],
            "label": [f"l{i % 8}" for i in range(120)],
            "kind": ["background" if i % 15 == 0 else "event" for i in range(120)],
            "source_package": ["held" if i % 4 == 0 else "kept" for i in range(120)],
            "origin": [f"{i}.wav" for i in range(120)],
        }
    )
    splits = SplitParams(heldout_label_fraction=0.25)
    split, heldout = assign_splits(table, splits, ["held"])
    held = split["source_package"] == "held"
    assert (split.loc[held, "split"] == "test_real").all() and not split.loc[held, "heldout"].any()
    assert "test_real" not in set(split.loc[~held, "split"])
    rest, rest_heldout = assign_splits(table[~held.to_numpy()], splits)
    assert heldout == rest_heldout
    pd.testing.assert_frame_equal(split[~held], rest)
    assert list(split.index) == list(table.index)


def test_a_held_out_source_the_library_does_not_build_is_refused():
    with pytest.raises(ConfigError, match="held_out_sources"):
        smoke_params("sources.packages=[sound-theme-freedesktop]", "sources.held_out_sources=[scratch]")
    with pytest.raises(ConfigError, match="held_out_sources"):
        smoke_params("sources.packages=[sound-theme-freedesktop]", 'sources.held_out_sources=["scratch:*"]')
    with pytest.raises(ConfigError, match="twice"):
        smoke_params("sources.held_out_sources=[scratch, scratch]")


def test_held_out_source_mask_by_package_and_glob():
    packages = ["a-data", "a-data", "b-data", "user:rec", "user:rec2", "c-data"]
    origins = ["noises/dog.ogg", "speech/hi.ogg", "x.wav", "1.wav", "2.wav", "noises/cat.ogg"]
    mask = held_out_source_mask(packages, origins, ["a-data:noises/*", "b-data", "user:rec"])
    assert mask.tolist() == [True, False, True, True, False, False]
    assert not held_out_source_mask(packages, origins, []).any()


def split_table() -> pd.DataFrame:
    """Ten event labels over two training packages, a held-out package and a held-out folder."""
    rows = []
    for i in range(120):
        package = "train-a" if i % 2 else "train-b"
        rows.append((f"{package}-{i:03d}", f"l{i % 10}", "event", package, f"clips/{i}.wav"))
    for i in range(12):  # held out whole; labels l0-l5 seen in training, "real only" is not
        label = "real only" if i < 2 else f"l{i % 6}"
        rows.append((f"real-{i:03d}", label, "event", "real", f"r{i}.wav"))
    rows.append(("real-bg", "rain", "background", "real", "rain.wav"))
    rows.append(("mixed-in", "l1", "event", "mixed", "recordings/a.wav"))  # held-out folder
    rows.append(("mixed-out", "l2", "event", "mixed", "other/b.wav"))  # same package, trained on
    rows.append(("train-bg", "wind", "background", "train-a", "wind.wav"))
    return pd.DataFrame(rows, columns=["clip_id", "label", "kind", "source_package", "origin"])


def test_held_out_sources_by_package_and_glob_land_only_in_test_real():
    table, splits = split_table(), SplitParams(heldout_label_fraction=0.2)
    held_out = ["real", "mixed:recordings/*"]
    split, heldout_labels = assign_splits(table, splits, held_out)
    real = split["source_package"].eq("real") | split["clip_id"].eq("mixed-in")
    assert (split.loc[real, "split"] == REAL_SPLIT).all() and not split.loc[real, "heldout"].any()
    assert (split.loc[~real, "split"] != REAL_SPLIT).all()
    # The other clips are split exactly as if the held-out sources did not exist.
    alone, alone_heldout = assign_splits(table[~real.to_numpy()], splits)
    pd.testing.assert_frame_equal(split[~real], alone)
    assert heldout_labels == alone_heldout
    assert "real only" not in heldout_labels


def test_validation_sources_land_only_in_val_real_beside_the_test_sources():
    table, splits = split_table(), SplitParams(heldout_label_fraction=0.2)
    split, heldout_labels = assign_splits(table, splits, ["real"], ["mixed:recordings/*"])
    real, val_real = split["source_package"].eq("real"), split["clip_id"].eq("mixed-in")
    assert (split.loc[real, "split"] == REAL_SPLIT).all()
    assert (
        split.loc[val_real, "split"].tolist() == [VAL_REAL_SPLIT] and not split.loc[val_real, "heldout"].any()
    )
    rest = ~(real | val_real)
    assert not split.loc[rest, "split"].isin([REAL_SPLIT, VAL_REAL_SPLIT]).any()
    alone, alone_heldout = assign_splits(table[rest.to_numpy()], splits)
    pd.testing.assert_frame_equal(split[rest], alone)
    assert heldout_labels == alone_heldout
    with pytest.raises(DataError, match=r"both sources\.held_out_sources and sources\.validation_sources"):
        assign_splits(table, splits, ["real"], ["real:r1*"])


def test_a_source_listed_for_test_and_validation_is_refused():
    with pytest.raises(ConfigError, match="both"):
        smoke_params('sources.held_out_sources=["scratch:Effects/*"]')
    with pytest.raises(ConfigError, match="validation_sources"):
        smoke_params("sources.packages=[sound-theme-freedesktop]", "sources.held_out_sources=[]")


def test_held_out_sources_have_their_own_label_quota():
    def clip(package: str, i: int) -> RawClip:
        return RawClip(
            source_package=package,
            origin=f"{i}.wav",
            label="dog barking",
            kind="event",
            licence="x",
            path=Path(f"{i}.wav"),
        )

    clips = [clip("train", i) for i in range(10)] + [clip("real", i) for i in range(10)]
    kept = cap_per_label(clips, 4, seed=0, held_out_sources=["real"])
    assert sorted(c.source_package for c in kept) == ["real"] * 4 + ["train"] * 4
    assert len(cap_per_label(clips, 4, seed=0)) == 4
    # The held-out clips kept do not depend on how many training clips share their label.
    fewer = cap_per_label(clips[:5] + clips[10:], 4, seed=0, held_out_sources=["real"])
    assert [c for c in fewer if c.source_package == "real"] == [c for c in kept if c.source_package == "real"]


def write_clips(folder: Path, labels: str | list[str], n: int, seed: int) -> str:
    """`n` distinct noise bursts in `folder`, labelled in turn by `labels`; returns its user_folders entry."""
    labels = [labels] if isinstance(labels, str) else labels
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = ["filename,label"]
    for i in range(n):
        clip = np.zeros(16000, np.float32)
        clip[4000:12000] = 0.3 * rng.standard_normal(8000)
        sf.write(folder / f"{i}.wav", clip, 16000)
        rows.append(f"{i}.wav,{labels[i % len(labels)]}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return f"{{dir: {folder}, csv: {folder / 'labels.csv'}}}"


def test_a_held_out_user_folder_and_glob_are_built_as_test_real(tmp_path):
    trained_labels = ["door knocking", "dog barking", "glass breaking", "bell ringing", "drum"]
    train = write_clips(tmp_path / "studio", trained_labels, 20, seed=1)
    real = write_clips(tmp_path / "field", "door knocking", 3, seed=2)
    real_only = write_clips(tmp_path / "street", ["car horn", "siren"], 4, seed=3)
    overrides = (
        f"sources.user_folders=[{train}, {real}, {real_only}]",
        'sources.held_out_sources=[user:field, "user:street:[02].wav"]',
        'sources.validation_sources=["user:street:[13].wav"]',
    )
    build_source_library(smoke_params(*USER_ONLY, *overrides), out_dir=tmp_path / "library", base_dir=ROOT)
    manifest = load_manifest(tmp_path / "library")
    real_rows = manifest["source_package"].eq("user:field") | (
        manifest["source_package"].eq("user:street") & manifest["origin"].isin(["0.wav", "2.wav"])
    )
    assert real_rows.sum() == 5 and (manifest.loc[real_rows, "split"] == REAL_SPLIT).all()
    assert not (manifest.loc[~real_rows, "split"] == REAL_SPLIT).any()
    street = real_rows & manifest["source_package"].eq("user:street")
    assert set(manifest.loc[street, "label"]) == {"car horn"}
    val_rows = manifest["source_package"].eq("user:street") & manifest["origin"].isin(["1.wav", "3.wav"])
    assert set(manifest.loc[manifest["split"] == VAL_REAL_SPLIT, "clip_id"]) == set(
        manifest.loc[val_rows, "clip_id"]
    )
    assert set(manifest.loc[val_rows, "label"]) == {"siren"}


def test_a_held_out_glob_that_matches_no_clip_is_refused(tmp_path):
    train = write_clips(tmp_path / "studio", ["door knocking", "dog barking"], 6, seed=1)
    overrides = (f"sources.user_folders=[{train}]", 'sources.held_out_sources=["user:studio:*.flac"]')
    with pytest.raises(DataError, match=r"held_out_sources names .* gave the library no clip"):
        build_source_library(
            smoke_params(*USER_ONLY, *overrides), out_dir=tmp_path / "library", base_dir=ROOT
        )
    overrides = (f"sources.user_folders=[{train}]", 'sources.validation_sources=["user:studio:*.flac"]')
    with pytest.raises(DataError, match=r"validation_sources names .* gave the library no clip"):
        build_source_library(
            smoke_params(*USER_ONLY, *overrides), out_dir=tmp_path / "library", base_dir=ROOT
        )
    assert not (tmp_path / "library").exists()


def test_a_library_whose_events_are_all_held_out_is_refused(tmp_path):
    real = write_clips(tmp_path / "field", "door knocking", 3, seed=2)
    overrides = (f"sources.user_folders=[{real}]", "sources.held_out_sources=[user:field]")
    with pytest.raises(DataError, match=r"no event clip outside sources\.held_out_sources"):
        build_source_library(
            smoke_params(*USER_ONLY, *overrides), out_dir=tmp_path / "library", base_dir=ROOT
        )


def test_build_is_deterministic(tmp_path):
    overrides = (
        "sources.packages=[sound-theme-freedesktop]",
        "sources.held_out_sources=[]",
        "sources.validation_sources=[]",
        "sources.midi.clips_per_label=1",
        "sources.speech.clips_per_label=1",
        "sources.procedural.clips_per_label=1",
        "sources.procedural.duration_s=3",
    )
    first = build_source_library(smoke_params(*overrides), out_dir=tmp_path / "a", base_dir=ROOT)
    second = build_source_library(smoke_params(*overrides), out_dir=tmp_path / "b", base_dir=ROOT)
    assert first.manifest_hash == second.manifest_hash
    other = build_source_library(
        smoke_params(*overrides, "sources.splits.seed=1"), out_dir=tmp_path / "c", base_dir=ROOT
    )
    assert other.manifest_hash != first.manifest_hash


def make_user_folder(root: Path, broken: bytes | None) -> str:
    audio = root / "audio"
    audio.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["filename,label"]
    for i in range(4):
        clip = np.zeros(16000, np.float32)
        clip[4000:12000] = 0.3 * rng.standard_normal(8000)
        sf.write(audio / f"knock{i}.wav", clip, 16000)
        rows.append(f"knock{i}.wav,door knocking")
    if broken is not None:
        (audio / "broken.wav").write_bytes(broken)
        rows.append("broken.wav,door knocking")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return f"sources.user_folders=[{{dir: {audio}, csv: {root / 'labels.csv'}}}]"


@pytest.mark.parametrize("broken", [b"", b"RIFF1234WAVEfmt garbage"])
def test_corrupt_user_file_stops_the_build_and_writes_nothing(tmp_path, broken):
    folder = make_user_folder(tmp_path / "user", broken)
    out = tmp_path / "library"
    with pytest.raises(AudioError, match=r"broken\.wav"):
        build_source_library(smoke_params(*USER_ONLY, folder), out_dir=out, base_dir=ROOT)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["user"]  # no staging folder left behind


def test_a_failed_rebuild_keeps_the_previous_library(tmp_path):
    good = make_user_folder(tmp_path / "good", None)
    out = tmp_path / "library"
    summary = build_source_library(smoke_params(*USER_ONLY, good), out_dir=out, base_dir=ROOT)
    bad = make_user_folder(tmp_path / "bad", b"junk")
    with pytest.raises(AudioError):
        build_source_library(smoke_params(*USER_ONLY, bad), out_dir=out, base_dir=ROOT)
    assert json.loads((out / "summary.json").read_text())["manifest_hash"] == summary.manifest_hash


def test_skip_bad_skips_and_reports_the_file(tmp_path):
    folder = make_user_folder(tmp_path / "user", b"junk")
    summary = build_source_library(
        smoke_params(*USER_ONLY, folder, "sources.skip_bad=true"), out_dir=tmp_path / "library", base_dir=ROOT
    )
    assert [Path(s["clip"]).name for s in summary.skipped_bad_files] == ["broken.wav"]
    assert "cannot decode" in summary.skipped_bad_files[0]["error"]
    assert summary.stats["per_label"]["door knocking"] == 4


def test_a_library_without_events_is_refused(tmp_path):
    with pytest.raises(DataError, match="no event clip"):
        build_source_library(smoke_params(*USER_ONLY), out_dir=tmp_path / "library", base_dir=ROOT)
    assert not (tmp_path / "library").exists()


def run_flam(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flam_core.cli", *args], cwd=cwd, capture_output=True, text=True
    )


def test_cli_stats_json(smoke_library):
    folder, summary = smoke_library
    proc = run_flam("sources", "stats", "--json", "--library", str(folder))
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["unreadable_clips"] == []
    assert stats["n_event_labels"] == summary.stats["n_event_labels"]


def test_cli_skip_bad_reports_the_file(tmp_path):
    folder = make_user_folder(tmp_path / "user", b"junk")
    sets = [arg for override in (*USER_ONLY, folder) for arg in ("-S", override)]
    proc = run_flam(
        "--profile", "smoke", *sets, "sources", "build", "--skip-bad", "--out", str(tmp_path / "lib")
    )
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stderr and "broken.wav" in proc.stderr
    failed = run_flam("--profile", "smoke", *sets, "sources", "build", "--out", str(tmp_path / "lib2"))
    assert failed.returncode == 2
    assert "broken.wav: cannot decode" in failed.stderr
    assert not (tmp_path / "lib2").exists()


def test_cli_config_error_exits_2_naming_the_key():
    proc = run_flam("-S", "sources.midi.clips_per_label=0", "config", "show")
    assert proc.returncode == 2
    assert "sources.midi.clips_per_label" in proc.stderr and "greater than or equal to 1" in proc.stderr
