"""The data-validation gate: clean smoke data passes; each planted violation is caught and named."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flam_core.config import Params
from flam_core.data.recipes import RECIPE_SPLITS, read_recipes
from flam_core.data.sources import load_manifest
from flam_core.data.validate import (
    REPORT_HTML,
    REPORT_JSON,
    ValidationFailed,
    ValidationReport,
    validate_all,
)
from flam_core.errors import DataError
from tests.conftest import smoke_params


@dataclass
class Inputs:
    """Editable copies of the smoke library's manifest and the recipes (no audio is needed).

    With `shard_counts` set, `save()` also writes tiny shards (see `write_shards`) to `shards_dir`.
    """

    params: Params
    library: Path
    recipes_dir: Path
    manifest: pd.DataFrame
    recipes: dict[str, pd.DataFrame]
    shard_counts: dict[str, int] | None = None
    shard_omit: set[str] = field(default_factory=set)

    @property
    def shards_dir(self) -> Path:
        return self.library.parent / "shards"

    def save(self) -> None:
        self.manifest.to_parquet(self.library / "manifest.parquet", index=False)
        for split, table in self.recipes.items():
            table.to_parquet(self.recipes_dir / f"{split}.parquet", index=False)
        if self.shard_counts is not None:
            counts = recipe_counts(self.recipes_dir)
            write_shards(self.shards_dir, self.shard_counts, summary_counts=counts, omit=self.shard_omit)


def copy_inputs(smoke_library, smoke_recipes, folder: Path) -> Inputs:
    library, recipes_dir = folder / "sources", folder / "recipes"
    library.mkdir(parents=True)
    for name in ("manifest.parquet", "summary.json"):
        shutil.copy(smoke_library[0] / name, library / name)
    shutil.copytree(smoke_recipes[0], recipes_dir)
    recipes = {split: read_recipes(recipes_dir / f"{split}.parquet") for split in RECIPE_SPLITS}
    return Inputs(smoke_params(), library, recipes_dir, load_manifest(library), recipes)


@pytest.fixture
def inputs(smoke_library, smoke_recipes, tmp_path) -> Inputs:
    return copy_inputs(smoke_library, smoke_recipes, tmp_path)


def write_shards(
    folder: Path,
    counts: dict[str, int],
    summary_counts: dict[str, int] | None = None,
    omit: Collection[str] = (),
) -> Path:
    """Tiny shards in the shard writer's layout: `counts[split]` samples over two tars each.

    Sample `<split>-<id:09d>` has members `.audio.npy` and `.json`, except the member names in
    `omit`; summary.json lists `summary_counts` (default `counts`) and the recipes' params_hash.
    """
    folder.mkdir(parents=True)
    for split, count in counts.items():
        for shard, ids in enumerate(np.array_split(np.arange(count), 2)):
            with tarfile.open(folder / f"{split}-{shard:06d}.tar", "w") as archive:
                for mixture_id in ids:
                    for name in (f"{split}-{mixture_id:09d}.{ext}" for ext in ("audio.npy", "json")):
                        if name in omit:
                            continue
                        member = tarfile.TarInfo(name)
                        member.size = 2
                        archive.addfile(member, io.BytesIO(b"{}"))
    splits = {split: {"n_mixtures": n} for split, n in (summary_counts or counts).items()}
    summary = {
        "params_hash": smoke_params().section_hash("synth"),
        "audio_member": "audio.npy",
        "splits": splits,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def recipe_counts(recipes_dir: Path) -> dict[str, int]:
    summary = json.loads((recipes_dir / "summary.json").read_text())
    return {split: summary["splits"][split]["n_mixtures"] for split in RECIPE_SPLITS}


# --- clean data ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_report(smoke_library, smoke_recipes, tmp_path_factory) -> tuple[ValidationReport, Path]:
    """The untouched smoke library and recipes, plus shards that match them."""
    folder = tmp_path_factory.mktemp("clean")
    shards = write_shards(folder / "shards", recipe_counts(smoke_recipes[0]))
    report = validate_all(smoke_params(), smoke_library[0], smoke_recipes[0], folder / "report", shards)
    return report, folder / "report"


def test_clean_smoke_data_passes_every_check(clean_report):
    report, _ = clean_report
    assert report.success, report.summary_text()
    tables = {c.table for c in report.checks}
    assert tables >= {"manifest", "recipes", *(f"recipes/{s}" for s in RECIPE_SPLITS)}
    assert {f"shards/{s}" for s in RECIPE_SPLITS} <= tables
    assert {c.engine for c in report.checks} == {"great_expectations", "pandas"}
    assert all(c.count == 0 and not c.examples for c in report.checks)
    assert report.summary_text().startswith("data validation passed")


def test_report_files_are_written(clean_report):
    report, report_dir = clean_report
    payload = json.loads((report_dir / REPORT_JSON).read_text())
    assert payload["success"] is True and payload["n_checks"] == len(report.checks) > 60
    assert {"name", "table", "success", "message", "count", "examples"} <= set(payload["checks"][0])
    page = (report_dir / REPORT_HTML).read_text()
    assert page.startswith("<!DOCTYPE html>") and "one_background_per_mixture" in page
    assert sorted(p.name for p in report_dir.iterdir()) == [REPORT_HTML, REPORT_JSON]  # no temp files


# --- planted violations ------------------------------------------------------------------------
# All violations are planted in one copy of the data, each on its own rows, and validated once
# (great-expectations costs seconds per run); each is then looked up in the report by its
# check, table and the row or id that the failure must name.


@dataclass(frozen=True)
class Planted:
    check: str
    table: str
    names: tuple[str, ...]  # fragments that one example of the failed check must contain


def event_row(table: pd.DataFrame, k: int) -> int:
    """The row number of the k-th event row."""
    return int(np.flatnonzero((table["kind"] == "event").to_numpy())[k])


def negative_onset(data: Inputs) -> Planted:
    table = data.recipes["train"]
    row = event_row(table, 0)
    table.loc[row, "onset_s"] = -0.5
    return Planted("onset_non_negative", "recipes/train", (f"row={row} ", "onset_s=-0.5"))


def event_past_mixture_end(data: Inputs) -> Planted:
    table = data.recipes["val"]
    row = event_row(table, 0)
    table.loc[row, ["onset_s", "duration_s"]] = [9.5, 1.0]
    return Planted("end_within_mixture", "recipes/val", (f"row={row} ", "end_s=10.5"))


def gain_out_of_range(data: Inputs) -> Planted:
    table = data.recipes["test_seen"]
    row = event_row(table, 0)
    table.loc[row, "gain_db"] = data.params.synth.max_snr_db + 5
    return Planted("event_gain_in_range", "recipes/test_seen", (f"row={row} ",))


def fourth_overlapping_event(data: Inputs) -> Planted:
    table = data.recipes["train"]
    events = table[(table["kind"] == "event") & (table["mixture_id"] == 5)]
    # pile pieces onto the mixture's first event until one more than allowed sound together
    onset, duration = float(events["onset_s"].iloc[0]), float(events["duration_s"].iloc[0])
    extra = events.iloc[[0] * data.params.synth.max_overlap].assign(onset_s=onset, duration_s=duration)
    data.recipes["train"] = pd.concat([table, extra], ignore_index=True)
    return Planted("max_overlap", "recipes/train", ("mixture_id=5 ",))


def two_backgrounds(data: Inputs) -> Planted:
    table = data.recipes["train"]
    background = table[(table["kind"] == "background") & (table["mixture_id"] == 3)]
    data.recipes["train"] = pd.concat([table, background], ignore_index=True)
    return Planted("one_background_per_mixture", "recipes/train", ("mixture_id=3 ",))


def unknown_clip(data: Inputs) -> Planted:
    table = data.recipes["val"]
    table["clip_id"] = table["clip_id"].astype(object)
    row = event_row(table, 1)
    table.loc[row, "clip_id"] = "ghost-000000000000"
    return Planted("clip_in_manifest", "recipes/val", (f"row={row} ", "clip_id=ghost-000000000000"))


def duplicate_clip_id(data: Inputs) -> Planted:
    data.manifest = pd.concat([data.manifest, data.manifest.iloc[[0]]], ignore_index=True)
    return Planted("clip_id_unique", "manifest", (f"clip_id={data.manifest.loc[0, 'clip_id']}",))


def span_outside_clip(data: Inputs) -> Planted:
    row = event_row(data.manifest, 1)
    duration = float(data.manifest.loc[row, "duration_s"])
    data.manifest.at[row, "active_spans"] = [[0.0, duration + 0.5]]
    return Planted("spans_inside_clip", "manifest", (f"clip_id={data.manifest.loc[row, 'clip_id']}",))


def use_clip(table: pd.DataFrame, row: int, clip: pd.Series) -> None:
    """Point a recipe row at another manifest clip, consistently (label, a valid caption)."""
    for column in ("clip_id", "label"):
        table[column] = table[column].astype(object)
        table.loc[row, column] = clip[column]
    table.loc[row, "caption_id"] = 0


def train_uses_test_clip(data: Inputs) -> Planted:
    manifest = data.manifest
    clip = manifest[
        (manifest["split"] == "test") & (manifest["kind"] == "event") & ~manifest["heldout"]
    ].iloc[0]
    table = data.recipes["train"]
    row = event_row(table, 1)
    use_clip(table, row, clip)
    return Planted("clips_from_source_split", "recipes/train", (f"row={row} ", f"clip_id={clip['clip_id']}"))


def heldout_label_in_train(data: Inputs) -> Planted:
    clip = data.manifest[data.manifest["heldout"]].iloc[0]
    table = data.recipes["train"]
    row = event_row(table, 2)
    use_clip(table, row, clip)
    return Planted("no_heldout_labels", "recipes/train", (f"row={row} ", f"label='{clip['label']}'"))


def held_out_source_in_train(data: Inputs) -> Planted:
    """A leak: one training clip's source is declared held out, yet the clip sits in train."""
    manifest = data.manifest
    plain = ~manifest["origin"].str.contains(r"[\[\]*?]")
    clip = manifest[(manifest["split"] == "train") & (manifest["kind"] == "event") & plain].iloc[0]
    source = f"{clip['source_package']}:{clip['origin']}"
    data.params = smoke_params(f"sources.held_out_sources=[{json.dumps(source)}]")
    return Planted("held_out_sources_only_in_test_real", "manifest", (f"clip_id={clip['clip_id']}",))


def trained_source_clip_in_test_real(data: Inputs) -> Planted:
    manifest = data.manifest
    row = manifest.index[(manifest["split"] == "test") & (manifest["kind"] == "background")][0]
    manifest.loc[row, "split"] = "test_real"
    return Planted(
        "test_real_only_held_out_sources", "manifest", (f"clip_id={manifest.loc[row, 'clip_id']}",)
    )


def validation_source_in_train(data: Inputs) -> Planted:
    """The same leak for the real-recording validation set: a validation source's clip in train."""
    manifest = data.manifest
    plain = ~manifest["origin"].str.contains(r"[\[\]*?]")
    clip = manifest[(manifest["split"] == "train") & (manifest["kind"] == "event") & plain].iloc[1]
    sources = data.params.sources.model_copy(
        update={"validation_sources": [f"{clip['source_package']}:{clip['origin']}"]}
    )
    data.params = data.params.model_copy(update={"sources": sources})
    return Planted("validation_sources_only_in_val_real", "manifest", (f"clip_id={clip['clip_id']}",))


def trained_source_clip_in_val_real(data: Inputs) -> Planted:
    manifest = data.manifest
    row = manifest.index[(manifest["split"] == "val") & (manifest["kind"] == "event")][0]
    manifest.loc[row, "split"] = "val_real"
    return Planted(
        "val_real_only_validation_sources", "manifest", (f"clip_id={manifest.loc[row, 'clip_id']}",)
    )


def shard_count_mismatch(data: Inputs) -> Planted:
    counts = data.shard_counts or recipe_counts(data.recipes_dir)
    data.shard_counts = {**counts, "train": counts["train"] - 1}
    return Planted("shard_samples_match_recipes", "shards/train", ("train-000001.tar: 31 samples",))


def shard_sample_without_audio(data: Inputs) -> Planted:
    data.shard_counts = data.shard_counts or recipe_counts(data.recipes_dir)
    data.shard_omit.add("val-000000003.audio.npy")
    return Planted("shard_samples_complete", "shards/val", ("val-000000003 lacks audio.npy",))


VIOLATIONS: list[Callable[[Inputs], Planted]] = [
    negative_onset,
    event_past_mixture_end,
    gain_out_of_range,
    fourth_overlapping_event,
    two_backgrounds,
    unknown_clip,
    duplicate_clip_id,
    span_outside_clip,
    train_uses_test_clip,
    heldout_label_in_train,
    held_out_source_in_train,
    trained_source_clip_in_test_real,
    validation_source_in_train,
    trained_source_clip_in_val_real,
    shard_count_mismatch,
    shard_sample_without_audio,
]


@pytest.fixture(scope="module")
def planted(smoke_library, smoke_recipes, tmp_path_factory) -> tuple[ValidationReport, dict[str, Planted]]:
    folder = tmp_path_factory.mktemp("planted")
    data = copy_inputs(smoke_library, smoke_recipes, folder)
    expected = {plant.__name__: plant(data) for plant in VIOLATIONS}
    data.save()
    report = validate_all(
        data.params,
        data.library,
        data.recipes_dir,
        folder / "report",
        data.shards_dir,
        raise_on_failure=False,
    )
    return report, expected


@pytest.mark.parametrize("plant", [p.__name__ for p in VIOLATIONS])
def test_planted_violation_is_caught_and_named(planted, plant):
    report, expected = planted
    want = expected[plant]
    failed = {(c.table, c.name): c for c in report.failures}
    assert (want.table, want.check) in failed, report.summary_text()
    check = failed[(want.table, want.check)]
    assert check.count >= 1 and any(all(n in e for n in want.names) for e in check.examples), check
    assert f"[{want.table}] {want.check}" in report.summary_text(max_examples=0)


def test_a_single_violation_fails_only_its_check_and_raises(inputs, tmp_path):
    planted_here = gain_out_of_range(inputs)
    inputs.save()
    with pytest.raises(ValidationFailed) as caught:
        validate_all(inputs.params, inputs.library, inputs.recipes_dir, tmp_path / "report")
    report = caught.value.report
    assert [(c.table, c.name) for c in report.failures] == [(planted_here.table, planted_here.check)]
    assert "event_gain_in_range" in str(caught.value) and "gain_db=35.0" in str(caught.value)
    written = json.loads((tmp_path / "report" / REPORT_JSON).read_text())
    assert written["success"] is False and written["n_failed"] == 1
    assert "event_gain_in_range" in (tmp_path / "report" / REPORT_HTML).read_text()


# --- loading errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("sources/manifest.parquet", "missing manifest.parquet"),
        ("recipes/val.parquet", "recipe file not found: .*val.parquet"),
        ("recipes/summary.json", "recipe summary not found: .*summary.json"),
    ],
)
def test_missing_input_raises_and_writes_nothing(inputs, tmp_path, missing, message):
    (tmp_path / missing).unlink()
    with pytest.raises(DataError, match=message):
        validate_all(inputs.params, inputs.library, inputs.recipes_dir, tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_check_shards_without_a_shard_folder_is_a_loading_error(inputs, tmp_path):
    params = smoke_params("validation.check_shards=true", f"shards.out_dir={tmp_path / 'nowhere'}")
    with pytest.raises(DataError, match=r"shard folder not found: .*nowhere"):
        validate_all(params, inputs.library, inputs.recipes_dir, tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_cli_exits_1_with_a_readable_summary(smoke_library, smoke_recipes, tmp_path):
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.conftest import ROOT

    library, _ = smoke_library
    recipes_dir, _ = smoke_recipes
    bad = tmp_path / "recipes"
    shutil.copytree(recipes_dir, bad)
    table = pq.read_table(bad / "val.parquet")
    gains = table.column("gain_db").to_numpy().copy()
    event_row = int(np.flatnonzero(gains > 0)[0])
    gains[event_row] = 99.0
    table = table.set_column(
        table.schema.get_field_index("gain_db"), "gain_db", pa.array(gains, pa.float32())
    )
    pq.write_table(table, bad / "val.parquet")
    args = ["--library", str(library), "--recipes", str(bad), "--report", str(tmp_path / "report")]
    proc = subprocess.run(
        [sys.executable, "-m", "flam_core.cli", "--profile", "smoke", "validate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stderr
    assert "validation failed" in proc.stderr and "event_gain_in_range" in proc.stderr
    assert f"row={event_row}" in proc.stderr
    assert (tmp_path / "report" / "validation.json").is_file()
