"""The data-validation gate: the source manifest, every recipe split and (optionally) the shards.

`validate_all(params, library_dir, recipes_dir, report_dir)` runs three kinds of checks and
writes one report:

1. great-expectations suites, one per table (`manifest`, `recipes/<split>`). Contracts that
   span rows or tables are first turned into helper columns computed with numpy (a clip's
   spans inside the clip, a mixture's background count and largest event overlap, the
   manifest duration of a recipe row's clip), so every failure still names its rows.
2. Cross-table checks in pandas that great-expectations cannot express well: split leakage,
   held-out labels, event/background clip kinds, recipes sampled from this very library.
3. Shard checks (with `validation.check_shards` or an explicit `shards_dir`), against the
   layout of `flam_core.data.shards`: the samples (distinct webdataset keys) in
   `{split}-{n:06d}.tar` number the recipe split's mixtures and the writer's `summary.json`
   `splits.<split>.n_mixtures`; each has its `<key>.audio.npy` and `<key>.json`.

Outputs in `report_dir` (each written atomically, and only once every input has loaded):
    validation.json    every check: name, table, success, message, count, up to 20 examples
    validation.html    the same as a readable table

great-expectations takes seconds to import, so it is imported inside the functions that use it.
"""

from __future__ import annotations

import html
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from flam_core.config import Params
from flam_core.data.recipes import (
    RECIPE_SPLITS,
    SOURCE_SPLIT_OF,
    TIME_GRID,
    UNSEEN_SPLITS,
    max_concurrency,
    read_recipes,
)
from flam_core.data.sources import (
    REAL_SPLIT,
    SPLITS,
    VAL_REAL_SPLIT,
    held_out_source_mask,
    load_manifest,
    manifest_hash,
)
from flam_core.errors import DataError
from flam_core.utils import atomic_write_text

if TYPE_CHECKING:
    from great_expectations.expectations import Expectation

MAX_EXAMPLES = 20
REPORT_JSON = "validation.json"
REPORT_HTML = "validation.html"
KINDS = ("event", "background")
PIECE_TOLERANCE_S = 2.0 / TIME_GRID  # recipe times are rounded to the 2^-12 s grid
# webdataset's key rule: the key is the member path up to the first dot of its file name.
_MEMBER_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
SHARD_AUDIO_MEMBER = "audio.npy"  # used when the shard summary.json names no `audio_member`
SHARD_LABELS_MEMBER = "json"


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check on one table.

    `count` is the number of failing rows (or items: mixtures, shards) and `examples` names
    at most `MAX_EXAMPLES` of them (clip ids, `row=N mixture_id=M clip_id=C`, shard names);
    both are empty for a passing check. `engine` is `great_expectations` or `pandas`.
    """

    name: str
    table: str
    success: bool
    message: str
    count: int = 0
    examples: list[str] = field(default_factory=list)
    engine: str = "pandas"


@dataclass(frozen=True)
class ValidationReport:
    """All checks of one `validate_all` run; `success` is True when every check passed."""

    success: bool
    checks: list[CheckResult]
    inputs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_checks(
        cls, checks: Sequence[CheckResult], inputs: dict[str, str] | None = None
    ) -> ValidationReport:
        return cls(success=all(c.success for c in checks), checks=list(checks), inputs=dict(inputs or {}))

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success]

    def summary_text(self, max_examples: int = 5) -> str:
        """A few lines for a terminal: the verdict, then one line per failed check with examples."""
        failed = self.failures
        if not failed:
            return f"data validation passed: {len(self.checks)} checks"
        lines = [f"data validation FAILED: {len(failed)} of {len(self.checks)} checks failed"]
        for check in failed:
            lines.append(f"  [{check.table}] {check.name}: {check.message}")
            if check.examples:
                shown = "; ".join(check.examples[:max_examples])
                more = f" (+{check.count - max_examples} more)" if check.count > max_examples else ""
                lines.append(f"      e.g. {shown}{more}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "n_checks": len(self.checks),
            "n_failed": len(self.failures),
            "inputs": self.inputs,
            "checks": [asdict(c) for c in self.checks],
        }

    def to_html(self) -> str:
        """A self-contained HTML page: the verdict and one table row per check, failures first."""
        verdict = "passed" if self.success else "FAILED"
        rows = []
        for check in sorted(self.checks, key=lambda c: c.success):
            examples = "<br>".join(html.escape(e) for e in check.examples)
            status = "ok" if check.success else "FAIL"
            rows.append(
                f'<tr class="{status.lower()}"><td>{status}</td><td>{html.escape(check.table)}</td>'
                f"<td>{html.escape(check.name)}</td><td>{check.count}</td>"
                f"<td>{html.escape(check.message)}</td><td>{examples}</td></tr>"
            )
        inputs = "".join(
            f"<li>{html.escape(k)}: <code>{html.escape(v)}</code></li>" for k, v in self.inputs.items()
        )
        return (
            "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>FLAM data validation</title>"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;text-align:left}"
            "tr.fail td{background:#fdd}tr.ok td:first-child{color:#070}</style></head><body>"
            f"<h1>Data validation {verdict}</h1>"
            f"<p>{len(self.failures)} of {len(self.checks)} checks failed.</p><ul>{inputs}</ul>"
            "<table><tr><th>status</th><th>table</th><th>check</th><th>failing</th>"
            "<th>message</th><th>examples</th></tr>" + "".join(rows) + "</table></body></html>\n"
        )

    def write(self, report_dir: Path) -> tuple[Path, Path]:
        """Write `validation.json` and `validation.html` into `report_dir` (atomically each)."""
        json_path, html_path = Path(report_dir) / REPORT_JSON, Path(report_dir) / REPORT_HTML
        atomic_write_text(json_path, json.dumps(self.to_dict(), indent=2) + "\n")
        atomic_write_text(html_path, self.to_html())
        return json_path, html_path


class ValidationFailed(DataError):
    """At least one check failed; `report` holds every check, the message summarises failures."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(report.summary_text())
        self.report = report


# --- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ShardInventory:
    """What the shard folder holds: the writer's summary and, per split and tar, its file members."""

    folder: Path
    summary: dict[str, Any]
    members: dict[str, dict[str, list[tuple[str, str]]]]  # split -> tar name -> [(sample key, ext)]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(payload, dict):
        raise DataError(f"{path}: expected a JSON object at the top level")
    return payload


def _summary_counts(summary: dict[str, Any], path: Path) -> dict[str, int]:
    """`splits.<split>.n_mixtures` of a recipe summary for every recipe split; `DataError` if one lacks it."""
    splits = summary.get("splits")
    counts = {}
    for split in RECIPE_SPLITS:
        entry = splits.get(split) if isinstance(splits, dict) else None
        count = entry.get("n_mixtures") if isinstance(entry, dict) else None
        if not isinstance(count, int):
            raise DataError(f"{path}: no integer splits.{split}.n_mixtures; re-run `flam synth recipes`")
        counts[split] = count
    return counts


def _load_shards(shards_dir: Path, splits: Iterable[str]) -> _ShardInventory:
    """Read `summary.json` and the member names of every `{split}-{n:06d}.tar` (headers only).

    Member names split into sample key and extension by webdataset's rule: the key is the
    path up to the first dot of the file name (`train-000000042.audio.npy` -> key
    `train-000000042`, extension `audio.npy`).
    """
    if not shards_dir.is_dir():
        raise DataError(
            f"shard folder not found: {shards_dir}; run `flam synth shards` or unset check_shards"
        )
    summary = _read_json(shards_dir / "summary.json", "shard summary")
    members: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for split in splits:
        pattern = re.compile(rf"{re.escape(split)}-\d{{6}}\.tar")
        members[split] = {}
        for tar_path in sorted(p for p in shards_dir.iterdir() if pattern.fullmatch(p.name)):
            try:
                with tarfile.open(tar_path, "r:") as archive:
                    names = [m.name for m in archive.getmembers() if m.isfile()]
            except (tarfile.TarError, OSError) as exc:
                raise DataError(f"{tar_path}: not a readable tar file ({exc})") from exc
            matches = (_MEMBER_KEY.match(name) for name in names)
            members[split][tar_path.name] = [(m.group(1), m.group(2)) for m in matches if m]
    return _ShardInventory(folder=shards_dir, summary=summary, members=members)


# --- helper columns -----------------------------------------------------------------------


def _span_flags(spans_column: pd.Series, durations: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per clip: `(n_spans [n] int, inside [n] bool, ordered [n] bool)`.

    `inside`: every span is finite with 0 <= onset < offset <= duration_s. `ordered`: spans
    are sorted and disjoint (each onset at or after the previous offset). A malformed value
    (not a list of pairs) is neither.
    """
    n = len(durations)
    n_spans, inside, ordered = np.zeros(n, np.int64), np.zeros(n, bool), np.zeros(n, bool)
    for i, (spans, duration) in enumerate(zip(spans_column, durations, strict=True)):
        try:
            pairs = np.asarray([list(pair) for pair in spans], dtype=np.float64).reshape(-1, 2)
        except (TypeError, ValueError):
            continue
        onset, offset = pairs[:, 0], pairs[:, 1]
        n_spans[i] = len(pairs)
        inside[i] = bool(
            np.isfinite(pairs).all()
            and (onset >= 0).all()
            and (offset <= duration).all()
            and (onset < offset).all()
        )
        ordered[i] = bool((onset[1:] >= offset[:-1]).all())
    return n_spans, inside, ordered


def manifest_frame(
    manifest: pd.DataFrame, held_out_sources: Sequence[str] = (), validation_sources: Sequence[str] = ()
) -> pd.DataFrame:
    """The manifest's scalar columns plus the helper columns its suite checks.

    Helpers: `n_spans`, `spans_inside`, `spans_ordered` (see `_span_flags`), `rms_finite`,
    `n_captions` and `first_caption` (None when `captions` is empty or not a list),
    `held_out_source` (the clip belongs to one of `held_out_sources`: a whole source, or a
    source's files matching a glob; `flam_core.data.sources.held_out_source_mask`) and
    `validation_source` (the same for `validation_sources`).
    """
    frame = manifest.drop(columns=["active_spans", "captions"]).copy()
    packages, origins = manifest["source_package"].astype(str), manifest["origin"].astype(str)
    frame["held_out_source"] = held_out_source_mask(packages, origins, held_out_sources)
    frame["validation_source"] = held_out_source_mask(packages, origins, validation_sources)
    durations = pd.to_numeric(manifest["duration_s"], errors="coerce").to_numpy(np.float64)
    frame["n_spans"], frame["spans_inside"], frame["spans_ordered"] = _span_flags(
        manifest["active_spans"], durations
    )
    rms = pd.to_numeric(manifest["active_rms_dbfs"], errors="coerce").to_numpy(np.float64)
    frame["rms_finite"] = np.isfinite(rms)
    captions = manifest["captions"].map(lambda c: list(c) if isinstance(c, (list, np.ndarray)) else [])
    frame["n_captions"] = captions.map(len).astype(np.int64)
    frame["first_caption"] = captions.map(lambda c: c[0] if c else None)
    return frame


def recipe_frame(recipes: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """A recipe split as plain columns (strings, float64) plus the helper columns its suite checks.

    Helpers: `row` (row number in the file), `end_s` = onset_s + duration_s, `values_finite`,
    `backgrounds_in_mixture` and `mixture_max_overlap` (the row's mixture's background row
    count and largest number of event pieces sounding at once), and, from the manifest
    (NaN/None for an unknown clip): `clip_label`, `clip_kind`, `clip_split`, `clip_duration_s`,
    `clip_n_captions`, `clip_overrun_s` (how far the piece reads past its clip's end).
    """
    frame = pd.DataFrame({"row": np.arange(len(recipes), dtype=np.int64)})
    for column in ("mixture_id", "event_index", "caption_id"):
        frame[column] = recipes[column].to_numpy(np.int64)
    for column in ("kind", "clip_id", "label"):
        frame[column] = recipes[column].astype(object).to_numpy()
    for column in ("clip_offset_s", "onset_s", "duration_s", "gain_db", "fade_s"):
        frame[column] = recipes[column].to_numpy(np.float64)
    frame["end_s"] = frame["onset_s"] + frame["duration_s"]
    numeric = frame[["clip_offset_s", "onset_s", "duration_s", "gain_db", "fade_s"]].to_numpy()
    frame["values_finite"] = np.isfinite(numeric).all(axis=1)
    codes, uniques = pd.factorize(frame["mixture_id"])
    is_event = (frame["kind"] == "event").to_numpy()
    is_background = (frame["kind"] == "background").to_numpy()
    frame["backgrounds_in_mixture"] = np.bincount(codes, weights=is_background, minlength=len(uniques))[
        codes
    ].astype(np.int64)
    overlap = max_concurrency(
        codes[is_event],
        frame["onset_s"].to_numpy()[is_event],
        frame["end_s"].to_numpy()[is_event],
        len(uniques),
    )
    frame["mixture_max_overlap"] = overlap[codes]
    clips = manifest.drop_duplicates("clip_id").set_index("clip_id")
    frame["clip_label"] = frame["clip_id"].map(clips["label"])
    frame["clip_kind"] = frame["clip_id"].map(clips["kind"])
    frame["clip_split"] = frame["clip_id"].map(clips["split"])
    frame["clip_duration_s"] = frame["clip_id"].map(clips["duration_s"]).astype(np.float64)
    n_captions = clips["captions"].map(lambda c: len(c) if isinstance(c, (list, np.ndarray)) else 0)
    frame["clip_n_captions"] = frame["clip_id"].map(n_captions).astype(np.float64)
    frame["clip_overrun_s"] = frame["clip_offset_s"] + frame["duration_s"] - frame["clip_duration_s"]
    return frame


# --- great-expectations suites ------------------------------------------------------------


def _kept_out_expectations(column: str, kind: str, param: str, split: str) -> list[Expectation]:
    """The two checks that sources kept out of training fill `split` and nothing else: every clip
    flagged in `column` (sources of `sources.<param>`) is in `split`, and `split` holds no other."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    return [
        _named(
            gxe.ExpectColumnValuesToBeInSet,
            f"{param}_only_in_{split}",
            f"every clip of a {kind} source (sources.{param}) is in split {split}",
            column="split",
            value_set=[split],
            row_condition=Column(column) == True,  # noqa: E712 (a GE condition, not a comparison)
        ),
        _named(
            gxe.ExpectColumnValuesToBeInSet,
            f"{split}_only_{param}",
            f"split {split} holds clips of the {kind} sources only",
            column=column,
            value_set=[True],
            row_condition=Column("split") == split,
        ),
    ]


def manifest_expectations(params: Params) -> list[Expectation]:
    """The source-manifest suite, to run on `manifest_frame(manifest)`."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    processing = params.sources.processing
    event, background = Column("kind") == "event", Column("kind") == "background"
    rate = params.audio.sample_rate
    return [
        _named(gxe.ExpectColumnValuesToNotBeNull, "clip_id_not_null", "clip_id is set", column="clip_id"),
        _named(gxe.ExpectColumnValuesToBeUnique, "clip_id_unique", "clip_id is unique", column="clip_id"),
        _named(gxe.ExpectColumnValuesToNotBeNull, "label_not_null", "label is set", column="label"),
        _named(
            gxe.ExpectColumnValueLengthsToBeBetween,
            "label_non_empty",
            "label is a non-empty string",
            column="label",
            min_value=1,
        ),
        _named(
            gxe.ExpectColumnValuesToBeInSet, "kind_known", f"kind in {KINDS}", column="kind", value_set=KINDS
        ),
        _named(
            gxe.ExpectColumnValuesToBeInSet,
            "split_known",
            f"split in {SPLITS}",
            column="split",
            value_set=SPLITS,
        ),
        *_kept_out_expectations("held_out_source", "held-out", "held_out_sources", REAL_SPLIT),
        *_kept_out_expectations("validation_source", "validation", "validation_sources", VAL_REAL_SPLIT),
        _named(
            gxe.ExpectColumnValuesToBeInSet,
            "heldout_is_bool",
            "heldout is True or False",
            column="heldout",
            value_set=[True, False],
        ),
        _named(
            gxe.ExpectColumnValuesToBeInSet,
            "heldout_never_in_train",
            "clips of held-out labels are in split val or test, never train",
            column="split",
            value_set=["val", "test"],
            row_condition=Column("heldout") == True,  # noqa: E712 (a GE condition, not a comparison)
        ),
        _named(
            gxe.ExpectColumnValuesToBeInSet,
            "sample_rate_matches",
            f"sample_rate == audio.sample_rate ({rate})",
            column="sample_rate",
            value_set=[rate],
        ),
        _named(
            gxe.ExpectColumnValuesToNotBeNull, "duration_not_null", "duration_s is set", column="duration_s"
        ),
        _named(
            gxe.ExpectColumnValuesToBeBetween,
            "event_duration_in_range",
            f"event duration_s in (0, sources.processing.max_event_s = {processing.max_event_s}]",
            column="duration_s",
            min_value=0.0,
            max_value=processing.max_event_s,
            strict_min=True,
            row_condition=event,
        ),
        _named(
            gxe.ExpectColumnValuesToBeBetween,
            "background_duration_in_range",
            "background duration_s in (0, sources.processing.max_background_s"
            f" = {processing.max_background_s}]",
            column="duration_s",
            min_value=0.0,
            max_value=processing.max_background_s,
            strict_min=True,
            row_condition=background,
        ),
        _named(
            gxe.ExpectColumnValuesToBeInSet,
            "active_rms_finite",
            "active_rms_dbfs is finite",
            column="rms_finite",
            value_set=[True],
        ),
        _named(
            gxe.ExpectColumnValuesToBeBetween,
            "active_rms_at_most_0dbfs",
            "active_rms_dbfs <= 0",
            column="active_rms_dbfs",
            max_value=0.0,
        ),
        _named(
            gxe.ExpectColumnValuesToBeInSet,
            "spans_inside_clip",
            "every active span has 0 <= onset < offset <= duration_s",
            column="spans_inside",
            value_set=[True],
        ),
        _named(
            gxe.ExpectColumnValuesToBeInSet,
            "spans_sorted_disjoint",
            "active spans are sorted and disjoint",
            column="spans_ordered",
            value_set=[True],
        ),
        _named(
            gxe.ExpectColumnValuesToBeBetween,
            "event_has_active_span",
            "every event clip has at least one active span",
            column="n_spans",
            min_value=1,
            row_condition=event,
        ),
        _named(
            gxe.ExpectColumnValuesToBeBetween,
            "captions_non_empty",
            "every clip has at least one caption",
            column="n_captions",
            min_value=1,
        ),
        _named(
            gxe.ExpectColumnPairValuesToBeEqual,
            "captions_start_with_label",
            "the first caption is the label",
            column_A="label",
            column_B="first_caption",
        ),
    ]


def recipe_expectations(params: Params, clip_ids: Sequence[str], n_mixtures: int) -> list[Expectation]:
    """The suite of one recipe split, to run on `recipe_frame(...)`.

    `clip_ids` are the manifest's clip ids; `n_mixtures` is the split's count in the recipe
    folder's `summary.json`.
    """
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    synth = params.synth
    event, background = Column("kind") == "event", Column("kind") == "background"
    return [
        _named(
            gxe.ExpectColumnUniqueValueCountToBeBetween,
            "mixture_count_matches_summary",
            f"the file holds the {n_mixtures} mixtures its summary.json lists",
            column="mixture_id",
            min_value=n_mixtures,
            max_value=n_mixtures,
        ),
        _named(
            gxe.ExpectColumnValuesToBeBetween,
            "mixture_id_in_range",
            f"mixture_id in [0, {n_mixtures - 1}]",
            column="mixture_id",
            min_value=0,
            max_value=n_mixtures - 1,
        ),
        _named(
            gxe.ExpectColumnValuesToBeInSet, "kind_known", f"kind in {KINDS}", column="kind", value_set=KINDS
        ),
        _named(
            gxe.ExpectColumnValuesToBeInSet,
            "values_finite",
            "clip_offset_s, onset_s, duration_s, gain_db and fade_s are finite",
            column="values_finite",
            value_set=[True],
        ),
        _named(
            gxe.ExpectColumnValuesToBeBetween,
            "onset_non_negative",
            "onset_s >= 0",
            column="onset_s",
            min_value=0.0,
        ),
        _named(
            gxe.ExpectColumnValuesToBeBetween,
            "end_within_mixture",
            f"onset_s + duration_s <= synth.mixture_s ({synth.mixture_s})",
            column="end_s",
            max_value=synth.mixture_s,
        ),
        _named(
            gxe.ExpectColumnValuesToBeBetween,
            "duration_positive",
            "duration_s > 0",
            column="duration_s",
            min_value=0.0,
            strict_min=True,
        ),
        _named(
            gxe.ExpectColumnValuesToBeBetween,
            "event_gain_in_range",
            "event gain_db in [synth.min_snr_db, synth.max_snr_db]"
            f" = [{synth.min_snr_db}, {synth.max_snr_db}]",
            column="gain_db",
            min_value=synth.min_snr_db,
            max_value=synth.max_snr_db,
            row_condition=event,
        ),
        _named(
            gxe.ExpectColumnValuesToBeBetween,
            "background_gain_zero",
            "background gain_db == 0",
            column="gain_db",
            min_value=0.0,
            max_value=0.0,
            row_condition=background,
        ),
        _named(
            gxe.ExpectColumnValuesToBeBetween,
            "background_covers_mixture",
            f"background rows start at 0 and last synth.mixture_s ({synth.mixture_s})",
            column="end_s",
            min_value=synth.mixture_s,
            max_value=synth.mixture_s,
            row_condition=background,
        ),
        _named(
            gxe.ExpectColumnValuesToBeInSet,
            "one_background_per_mixture",
            "exactly one background row per mixture",
            column="backgrounds_in_mixture",
            value_set=[1],
        ),
        _named(
            gxe.ExpectColumnValuesToBeBetween,
            "event_caption_id_non_negative",
            "event caption_id >= 0",
            column="caption_id",
            min_value=0,
            row_condition=event,
        ),
        _named(
            gxe.ExpectColumnPairValuesAToBeGreaterThanB,
            "event_caption_id_exists",
            "event caption_id < the number of captions of its clip",
            column_A="clip_n_captions",
            column_B="caption_id",
            row_condition=event,
        ),
        _named(
            gxe.ExpectColumnValuesToBeBetween,
            "fade_in_range",
            "fade_s in [0, 0.5]",
            column="fade_s",
            min_value=0.0,
            max_value=0.5,
        ),
        _named(
            gxe.ExpectColumnValuesToBeBetween,
            "max_overlap",
            f"at most synth.max_overlap ({synth.max_overlap}) event pieces sound at once in a mixture",
            column="mixture_max_overlap",
            max_value=synth.max_overlap,
        ),
        _named(
            gxe.ExpectColumnValuesToBeInSet,
            "clip_in_manifest",
            "every clip_id exists in the source manifest",
            column="clip_id",
            value_set=list(clip_ids),
        ),
        _named(
            gxe.ExpectColumnPairValuesToBeEqual,
            "label_matches_clip",
            "label is the manifest label of the row's clip",
            column_A="label",
            column_B="clip_label",
        ),
        _named(
            gxe.ExpectColumnValuesToBeBetween,
            "clip_offset_non_negative",
            "clip_offset_s >= 0",
            column="clip_offset_s",
            min_value=0.0,
        ),
        _named(
            gxe.ExpectColumnValuesToBeBetween,
            "event_piece_inside_clip",
            f"event pieces end inside their clip (clip_offset_s + duration_s <= clip duration_s "
            f"+ {PIECE_TOLERANCE_S:.6f} s of grid rounding)",
            column="clip_overrun_s",
            max_value=PIECE_TOLERANCE_S,
            row_condition=event,
        ),
    ]


def _named(cls: type[Expectation], name: str, contract: str, **kwargs: Any) -> Expectation:
    """An expectation tagged with the check name and the contract text the report shows."""
    return cls(meta={"check": name}, description=contract, **kwargs)


class _GxSession:
    """One ephemeral great-expectations context with one pandas data source; a suite per table."""

    def __init__(self) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self._gx = gx
        self._context = gx.get_context(mode="ephemeral")
        self._context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self._source = self._context.data_sources.add_pandas("flam")

    def validate(
        self, table: str, frame: pd.DataFrame, expectations: Sequence[Expectation], index_columns: list[str]
    ) -> list[CheckResult]:
        """Run `expectations` on `frame`; one `CheckResult` per expectation, in the given order.

        Failing rows are named by `index_columns` (at most `MAX_EXAMPLES` per check).
        """
        gx = self._gx
        slug = re.sub(r"\W", "_", table)
        batch = self._source.add_dataframe_asset(slug).add_batch_definition_whole_dataframe(slug)
        # One `add` for the whole suite: adding expectations one by one re-serialises the suite each time.
        suite = self._context.suites.add(gx.ExpectationSuite(name=slug, expectations=list(expectations)))
        definition = self._context.validation_definitions.add(
            gx.ValidationDefinition(name=slug, data=batch, suite=suite)
        )
        outcome = definition.run(
            batch_parameters={"dataframe": frame},
            result_format={
                "result_format": "SUMMARY",
                "partial_unexpected_count": MAX_EXAMPLES,
                "unexpected_index_column_names": index_columns,
            },
        )
        by_name = {r.expectation_config.meta["check"]: r for r in outcome.results}
        return [
            _check_from_gx(
                table, e.meta["check"], e.description or "", by_name[e.meta["check"]], index_columns
            )
            for e in expectations
        ]


def _check_from_gx(
    table: str, name: str, contract: str, result: Any, index_columns: list[str]
) -> CheckResult:
    """Translate one great-expectations result into a `CheckResult`."""
    if result.success:
        return CheckResult(name, table, True, contract, engine="great_expectations")
    error = _exception_message(result.exception_info)
    if error:
        return CheckResult(
            name, table, False, f"{contract}: could not be evaluated ({error})", 1, [], "great_expectations"
        )
    details = result.result or {}
    count = details.get("unexpected_count")
    if count is None:  # an aggregate expectation: one observed value
        message = f"{contract}; observed {details.get('observed_value')!r}"
        return CheckResult(name, table, False, message, 1, [], "great_expectations")
    examples = _dedupe(
        _format_index(item, index_columns) for item in details.get("partial_unexpected_index_list", [])
    )
    message = f"{contract}; {count} of {details.get('element_count')} row(s) violate it"
    return CheckResult(name, table, False, message, int(count), examples[:MAX_EXAMPLES], "great_expectations")


def _exception_message(info: Any) -> str:
    """The first exception message in a great-expectations `exception_info` (flat or per metric)."""
    if not isinstance(info, dict):
        return ""
    if "raised_exception" in info:
        return str(info.get("exception_message") or "") if info["raised_exception"] else ""
    for value in info.values():
        message = _exception_message(value)
        if message:
            return message
    return ""


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return round(value, 6)
    return value


def _format_index(item: dict[str, Any], index_columns: list[str]) -> str:
    """`clip_id=X` or `row=12 mixture_id=3 clip_id=X`, then the checked values unless booleans."""
    ids = " ".join(f"{c}={_plain(item[c])}" for c in index_columns if c in item)
    values = ", ".join(
        f"{k}={_plain(v)!r}"
        for k, v in item.items()
        if k not in index_columns and not isinstance(v, (bool, np.bool_))
    )
    return f"{ids} ({values})" if values else ids


def _dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# --- cross-table checks (pandas) ------------------------------------------------------------


def _outcome(
    name: str,
    table: str,
    contract: str,
    failure: str | None = None,
    count: int = 1,
    examples: Sequence[str] = (),
) -> CheckResult:
    """A pandas-side check result: passed when `failure` is None, else failed with that detail."""
    if failure is None:
        return CheckResult(name, table, True, contract)
    return CheckResult(name, table, False, f"{contract}; {failure}", count, list(examples)[:MAX_EXAMPLES])


def _rows_check(
    name: str, table: str, contract: str, frame: pd.DataFrame, bad: np.ndarray, detail: str
) -> CheckResult:
    """A row-level pandas check: `bad` marks failing rows of a `recipe_frame`; `detail` a column to show."""
    count = int(np.count_nonzero(bad))
    examples = [
        f"row={r.row} mixture_id={r.mixture_id} clip_id={r.clip_id} ({detail}={getattr(r, detail)!r})"
        for r in frame.loc[bad].head(MAX_EXAMPLES).itertuples(index=False)
    ]
    failure = f"{count} of {len(frame)} row(s) violate it" if count else None
    return _outcome(name, table, contract, failure, count, examples)


def cross_table_checks(split: str, frame: pd.DataFrame, heldout_labels: set[str]) -> list[CheckResult]:
    """Leakage and label-set checks of one recipe split against the manifest.

    Rows whose clip is not in the manifest are skipped here (`clip_in_manifest` reports them).
    """
    table = f"recipes/{split}"
    known = frame["clip_kind"].notna().to_numpy()
    is_event = (frame["kind"] == "event").to_numpy()
    source_split = SOURCE_SPLIT_OF[split]
    checks = [
        _rows_check(
            "clips_from_source_split",
            table,
            f"{split} recipes use only clips of source split {source_split!r}",
            frame,
            known & (frame["clip_split"] != source_split).to_numpy(),
            "clip_split",
        ),
        _rows_check(
            "clip_kind_matches_row",
            table,
            "event rows use event clips and background rows background clips",
            frame,
            known & (frame["clip_kind"] != frame["kind"]).to_numpy(),
            "clip_kind",
        ),
    ]
    heldout = is_event & frame["label"].isin(heldout_labels).to_numpy()
    if split not in UNSEEN_SPLITS:
        checks.append(
            _rows_check(
                "no_heldout_labels", table, f"no held-out label in {split} events", frame, heldout, "label"
            )
        )
    else:
        checks.append(
            _rows_check(
                "only_heldout_labels",
                table,
                f"every {split} event label is held out",
                frame,
                is_event & ~heldout,
                "label",
            )
        )
    return checks


def library_match_check(recipes_summary: dict[str, Any], manifest: pd.DataFrame) -> CheckResult:
    """The recipes were sampled from this library: summary.json's manifest hash matches."""
    recorded, actual = recipes_summary.get("sources_manifest_hash"), manifest_hash(manifest)
    return _outcome(
        "recipes_from_this_library",
        "recipes",
        "recipes/summary.json sources_manifest_hash matches the source manifest",
        None
        if recorded == actual
        else f"recorded {recorded!r}, manifest has {actual!r}: re-run `flam synth recipes`",
    )


# --- shards -------------------------------------------------------------------------------


def shard_checks(
    inventory: _ShardInventory, recipe_mixtures: dict[str, int], recipes_params_hash: str | None
) -> list[CheckResult]:
    """The shards against the recipes (layout: `flam_core.data.shards`).

    Folder-wide: the shards were rendered from these recipes (summary.json `params_hash`).
    Per split: every sample has its audio and labels members, no sample key repeats, and the
    number of samples equals the recipe split's mixtures and summary.json's `n_mixtures`.
    """
    summary = inventory.summary
    summary_path = inventory.folder / "summary.json"
    if summary.get("enabled") is False:
        return [
            _outcome(
                "shards_present",
                "shards",
                "validation.check_shards is set, so shards must exist",
                f"{summary_path} says shards are disabled: set shards.enabled=true or unset check_shards",
            )
        ]
    recorded_hash = summary.get("params_hash")
    checks = [
        _outcome(
            "shards_from_these_recipes",
            "shards",
            "shard summary.json params_hash equals the recipes' params_hash",
            None
            if recorded_hash == recipes_params_hash
            else f"shards have {recorded_hash!r}, recipes {recipes_params_hash!r}: "
            "re-run `flam synth shards`",
        )
    ]
    audio_member = str(summary.get("audio_member") or SHARD_AUDIO_MEMBER)
    splits = summary.get("splits") if isinstance(summary.get("splits"), dict) else {}
    for split, tars in inventory.members.items():
        table = f"shards/{split}"
        per_tar = [f"{name}: {len({k for k, _ in items})} samples" for name, items in tars.items()]
        per_tar = per_tar or [f"no {split}-NNNNNN.tar in {inventory.folder}"]
        extensions: dict[str, Counter[str]] = {}
        for items in tars.values():
            for key, ext in items:
                extensions.setdefault(key, Counter())[ext] += 1
        n_samples = len(extensions)
        incomplete = [
            f"{key} lacks {' and '.join(m for m in (audio_member, SHARD_LABELS_MEMBER) if not exts[m])}"
            for key, exts in extensions.items()
            if not (exts[audio_member] and exts[SHARD_LABELS_MEMBER])
        ]
        checks.append(
            _outcome(
                "shard_samples_complete",
                table,
                f"every sample has <key>.{audio_member} and <key>.{SHARD_LABELS_MEMBER}",
                f"{len(incomplete)} sample(s) do not" if incomplete else None,
                len(incomplete),
                incomplete,
            )
        )
        repeated = sorted(key for key, exts in extensions.items() if max(exts.values()) > 1)
        checks.append(
            _outcome(
                "shard_keys_unique",
                table,
                f"no sample key repeats in {split}-*.tar",
                f"{len(repeated)} key(s) repeat" if repeated else None,
                len(repeated),
                repeated,
            )
        )
        expected = recipe_mixtures[split]
        checks.append(
            _outcome(
                "shard_samples_match_recipes",
                table,
                f"{split}-*.tar hold one sample per recipe mixture ({expected})",
                f"found {n_samples}" if n_samples != expected else None,
                abs(n_samples - expected),
                per_tar,
            )
        )
        entry = splits.get(split)
        recorded = entry.get("n_mixtures") if isinstance(entry, dict) else None
        failure = None
        if not isinstance(recorded, int):
            failure = f"{summary_path} has no integer splits.{split}.n_mixtures"
        elif recorded != n_samples:
            failure = f"it says {recorded}"
        checks.append(
            _outcome(
                "shard_summary_matches_samples",
                table,
                f"summary.json splits.{split}.n_mixtures equals the samples in {split}-*.tar ({n_samples})",
                failure,
                abs(recorded - n_samples) if isinstance(recorded, int) else 1,
                per_tar,
            )
        )
    return checks


# --- the gate -------------------------------------------------------------------------------


def validate_all(
    params: Params,
    library_dir: Path,
    recipes_dir: Path,
    report_dir: Path,
    shards_dir: Path | None = None,
    raise_on_failure: bool = True,
) -> ValidationReport:
    """Validate the source library, every recipe split and, optionally, the shards.

    Shards are checked when `shards_dir` is given or `params.validation.check_shards` is set
    (then in `params.shards.out_dir`), for the splits in `params.shards.splits`.

    Every input is loaded first: a missing or unreadable manifest, recipe file, recipe or
    shard `summary.json` or tar raises `DataError` naming the path, and no report is written.
    Then all checks run (none stops the others), the report is written to
    `report_dir/validation.json` and `validation.html`, and, if a check failed and
    `raise_on_failure`, `ValidationFailed` (a `DataError` carrying the report) is raised.
    """
    library_dir, recipes_dir, report_dir = Path(library_dir), Path(recipes_dir), Path(report_dir)
    manifest = load_manifest(library_dir)
    recipes_summary = _read_json(recipes_dir / "summary.json", "recipe summary")
    n_mixtures = _summary_counts(recipes_summary, recipes_dir / "summary.json")
    recipes = {split: read_recipes(recipes_dir / f"{split}.parquet") for split in RECIPE_SPLITS}
    if shards_dir is None and params.validation.check_shards:
        shards_dir = Path(params.shards.out_dir)
    inventory = _load_shards(Path(shards_dir), params.shards.splits) if shards_dir is not None else None

    session = _GxSession()
    checks = session.validate(
        "manifest",
        manifest_frame(manifest, params.sources.held_out_sources, params.sources.validation_sources),
        manifest_expectations(params),
        ["clip_id"],
    )
    clip_ids = manifest["clip_id"].dropna().astype(str).unique().tolist()
    heldout_labels = set(manifest.loc[manifest["heldout"] == True, "label"])  # noqa: E712 (may be non-bool)
    recipe_mixtures = {}
    for split, table in recipes.items():
        frame = recipe_frame(table, manifest)
        expectations = recipe_expectations(params, clip_ids, n_mixtures[split])
        checks += session.validate(f"recipes/{split}", frame, expectations, ["row", "mixture_id", "clip_id"])
        checks += cross_table_checks(split, frame, heldout_labels)
        recipe_mixtures[split] = int(frame["mixture_id"].nunique())
    checks.append(library_match_check(recipes_summary, manifest))
    if inventory is not None:
        checks += shard_checks(inventory, recipe_mixtures, recipes_summary.get("params_hash"))

    inputs = {"library_dir": str(library_dir), "recipes_dir": str(recipes_dir)}
    if inventory is not None:
        inputs["shards_dir"] = str(inventory.folder)
    report = ValidationReport.from_checks(checks, inputs)
    report.write(report_dir)
    if raise_on_failure and not report.success:
        raise ValidationFailed(report)
    return report
