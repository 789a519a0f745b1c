"""The `flam` command. Each subcommand parses its arguments and calls one `flam_core` function.

Output: results go to stdout, problems to stderr as one line (`error: ...`, exit code 2).
`detect`, `index` and `search` check their arguments before any model is imported or loaded, and
print nothing else: no progress bars, no third-party warnings. Every MLflow use goes to the
project's one store (`flam_core.tracking.tracking_uri`: `$MLFLOW_TRACKING_URI`, else
`<project>/mlruns.db`), where `flam register` puts the champion that `detect` serves by default.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
import yaml
from rich.console import Console
from rich.table import Table

from flam_core.config import Params, find_params_file, load_params, read_resolved_params
from flam_core.errors import ConfigError, FlamError

if TYPE_CHECKING:
    import numpy as np

    from flam_core.storage import ObjectInfo

# sed_scores_eval imports dcase_util, which imports the deprecated pkg_resources: a warning about
# a dependency's dependency, not about anything the user can change.
warnings.filterwarnings(
    "ignore", message="pkg_resources is deprecated", category=UserWarning, module="dcase_util"
)

app = typer.Typer(help="FLAM: open-vocabulary, frame-level sound event detection.", no_args_is_help=True)
sources_app = typer.Typer(help="The library of labelled source recordings.", no_args_is_help=True)
config_app = typer.Typer(help="Resolved parameters.", no_args_is_help=True)
app.add_typer(sources_app, name="sources")
app.add_typer(config_app, name="config")
synth_app = typer.Typer(help="Mixture recipes and materialised shards.", no_args_is_help=True)
app.add_typer(synth_app, name="synth")
console = Console(stderr=True, soft_wrap=True, highlight=False)


class _State:
    params_path: Path | None = None
    profile: str | None = None
    overrides: list[str] = []  # noqa: RUF012 - replaced per invocation
    resolved: Path | None = None

    def params(self) -> Params:
        if self.resolved is not None:
            return read_resolved_params(self.resolved)
        return load_params(self.params_path, self.profile, self.overrides)


state = _State()


@app.callback()
def main(
    params: Annotated[
        Path | None, typer.Option("--params", help="params.yaml to read (default: found from cwd up).")
    ] = None,
    profile: Annotated[str | None, typer.Option("--profile", help="default | smoke | gpu")] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", "-S", help="Override a parameter: -S sources.splits.seed=3")
    ] = None,
    resolved: Annotated[
        Path | None,
        typer.Option(
            "--resolved",
            help="A JSON file of fully resolved parameters (the pipeline's params artifact), used as it "
            "is: no --params, --profile or --set with it.",
        ),
    ] = None,
) -> None:
    if resolved is not None:
        options = (("--params", params), ("--profile", profile), ("--set", overrides))
        given = [name for name, value in options if value]
        if given:
            raise ArgumentError(
                f"--resolved {resolved} holds parameters already resolved: {', '.join(given)} cannot change "
                "them (resolve again with the overrides, or drop --resolved)"
            )
        _check_file(resolved, "a JSON file of resolved parameters")
    state.params_path, state.profile, state.overrides = params, profile, list(overrides or [])
    state.resolved = resolved


@config_app.command("show")
def config_show() -> None:
    """Print the resolved parameters (params.yaml + profile + overrides) as YAML."""
    typer.echo(yaml.safe_dump(state.params().model_dump(mode="json"), sort_keys=False))


@sources_app.command("build")
def sources_build(
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Skip undecodable files and report them.")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Library folder (default: sources.out_dir).")] = None,
) -> None:
    """Build the source library: clips (FLAC), manifest.parquet and summary.json."""
    from flam_core.data.sources import build_source_library

    params = state.params()
    if skip_bad:
        params = params.model_copy(update={"sources": params.sources.model_copy(update={"skip_bad": True})})
    summary = build_source_library(params, out_dir=out)
    stats = summary.stats
    for item in summary.skipped_bad_files:
        console.print(f"[yellow]skipped[/] {item['clip']}: {item['error']}")
    console.print(
        f"source library: {stats['n_event_clips']} event clips, {stats['n_event_labels']} event labels, "
        f"{stats['n_backgrounds']} backgrounds, {len(stats['heldout_labels'])} held-out labels; "
        f"{len(summary.rejected)} rejected, {len(summary.skipped_bad_files)} skipped; "
        f"manifest {summary.manifest_hash[:12]}"
    )


@sources_app.command("stats")
def sources_stats(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    library: Annotated[Path | None, typer.Option(help="Library folder (default: sources.out_dir).")] = None,
) -> None:
    """Counts per kind, split, label and package; held-out labels; unreadable clips."""
    from flam_core.data.sources import check_readable, library_stats, load_manifest

    folder = library or Path(state.params().sources.out_dir)
    manifest = load_manifest(folder)
    stats = library_stats(manifest)
    stats["unreadable_clips"] = check_readable(manifest, folder)
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    out = Console()
    summary = Table(title=f"source library {folder}")
    summary.add_column("what")
    summary.add_column("value", justify="right")
    for key in ("n_clips", "n_event_clips", "n_event_labels", "n_backgrounds", "heldout_label_fraction"):
        summary.add_row(key, str(stats[key]))
    summary.add_row("unreadable clips", str(len(stats["unreadable_clips"])))
    out.print(summary)
    for title, counts in (("kind/split", stats["per_kind_split"]), ("package", stats["per_package"])):
        table = Table(title=title)
        table.add_column(title)
        table.add_column("clips", justify="right")
        for key, value in counts.items():
            table.add_row(key, str(value))
        out.print(table)
    heldout_val = set(stats["heldout_val_labels"])
    out.print("held-out labels, val_unseen: " + ", ".join(sorted(heldout_val)))
    heldout_test = [label for label in stats["heldout_labels"] if label not in heldout_val]
    out.print("held-out labels, test_unseen: " + ", ".join(heldout_test))


@synth_app.command("recipes")
def synth_recipes(
    library: Annotated[Path | None, typer.Option(help="Source library (default: sources.out_dir).")] = None,
    out: Annotated[Path | None, typer.Option(help="Recipe folder (default: synth.out_dir).")] = None,
) -> None:
    """Sample the mixture recipes of every split (Parquet + summary.json)."""
    from flam_core.data.recipes import build_recipes

    summary = build_recipes(state.params(), library_dir=library, out_dir=out)
    for split, info in summary.splits.items():
        console.print(
            f"{split}: {info['n_mixtures']} mixtures, {info['n_event_pieces']} event pieces, "
            f"{info['n_event_labels']} labels, {info['bytes'] / 1e6:.1f} MB"
        )


@synth_app.command("real")
def synth_real(
    library: Annotated[Path | None, typer.Option(help="Source library (default: sources.out_dir).")] = None,
    out: Annotated[Path | None, typer.Option(help="Test set folder (default: test_real.out_dir).")] = None,
    val_out: Annotated[
        Path | None, typer.Option(help="Validation set folder (default: test_real.val_out_dir).")
    ] = None,
) -> None:
    """The real-recording sets: the test from the held-out sources, and its validation twin from
    the validation sources (when `sources.validation_sources` names any)."""
    from flam_core.data.realset import REAL_SPLIT, VAL_REAL_SPLIT, build_real_set

    params = state.params()
    library = library or Path(params.sources.out_dir)
    wanted = [(REAL_SPLIT, out)]
    if params.sources.validation_sources:
        wanted.append((VAL_REAL_SPLIT, val_out))
    for split, folder in wanted:
        summary = build_real_set(params, library, folder, split=split)
        console.print(
            f"{split}: {summary.recordings} recordings ({summary.recording_s / 60:.1f} min), "
            f"{summary.clips} isolated clips, {len(summary.labels)} prompts "
            f"({len(summary.background_labels)} ambiences) from {', '.join(summary.sources)}"
        )


@synth_app.command("shards")
def synth_shards(
    library: Annotated[Path | None, typer.Option(help="Source library (default: sources.out_dir).")] = None,
    recipes: Annotated[Path | None, typer.Option(help="Recipe folder (default: synth.out_dir).")] = None,
    out: Annotated[Path | None, typer.Option(help="Shard folder (default: shards.out_dir).")] = None,
) -> None:
    """Materialise mixtures into WebDataset shards (when `shards.enabled`)."""
    from flam_core.data.shards import write_shards
    from flam_core.utils import atomic_write_text

    params = state.params()
    out = out or Path(params.shards.out_dir)
    if not params.shards.enabled:
        atomic_write_text(out / "summary.json", json.dumps({"enabled": False, "splits": {}}, indent=2))
        console.print("shards: disabled (shards.enabled=false); mixtures are mixed on the fly")
        return
    summary = write_shards(
        params,
        library or Path(params.sources.out_dir),
        recipes or Path(params.synth.out_dir),
        out_dir=out,
    )
    for split, info in summary.splits.items():
        console.print(
            f"{split}: {info['n_mixtures']} mixtures in {info['n_shards']} shard(s), "
            f"{info['bytes'] / 1e6:.0f} MB"
        )


@app.command("validate")
def validate(
    library: Annotated[Path | None, typer.Option(help="Source library (default: sources.out_dir).")] = None,
    recipes: Annotated[Path | None, typer.Option(help="Recipe folder (default: synth.out_dir).")] = None,
    report: Annotated[
        Path | None, typer.Option(help="Report folder (default: validation.report_dir).")
    ] = None,
) -> None:
    """The data-validation gate: sources, recipes (and shards when enabled). Exit 1 on failure."""
    from flam_core.data.validate import ValidationFailed, validate_all

    params = state.params()
    shards = params.shards.enabled or params.validation.check_shards
    try:
        result = validate_all(
            params,
            library or Path(params.sources.out_dir),
            recipes or Path(params.synth.out_dir),
            report or Path(params.validation.report_dir),
            shards_dir=Path(params.shards.out_dir) if shards else None,
        )
    except ValidationFailed as failed:
        console.print(f"[red]validation failed[/]\n{failed}")
        raise typer.Exit(1) from None
    console.print(f"validation passed: {len(result.checks)} checks")


@app.command("features")
def features(
    library: Annotated[Path | None, typer.Option(help="Source library (default: sources.out_dir).")] = None,
    recipes: Annotated[Path | None, typer.Option(help="Recipe folder (default: synth.out_dir).")] = None,
    out: Annotated[Path | None, typer.Option(help="Cache folder (default: train.features_dir).")] = None,
) -> None:
    """Cache the frozen audio encoder's frame features of every mixture."""
    from flam_core.features import build_feature_cache

    params = state.params()
    summary = build_feature_cache(
        params,
        library or Path(params.sources.out_dir),
        recipes or Path(params.synth.out_dir),
        out or Path(params.train.features_dir),
    )
    console.print(
        f"features ({summary.encoder}, {summary.dim}-d x {summary.n_frames} frames): {summary.shapes}"
    )


@app.command("train")
def train_command(
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
    out: Annotated[Path | None, typer.Option(help="Model folder (default: train.out_dir).")] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after this many steps (schedule unchanged).")
    ] = None,
    reports: Annotated[Path, typer.Option(help="Loss curve and metrics folder.")] = Path("reports/train"),
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Delete the run already in the model folder and start afresh.")
    ] = False,
) -> None:
    """Train FLAM (or an ablation: train.mode) on the train split.

    Data-parallel with DeepSpeed: `torchrun --nproc_per_node N -m flam_core.cli -S
    train.backend=deepspeed train` (or the `deepspeed` launcher); rank 0 writes the outputs.
    """
    from flam_core.train import train

    params = state.params()
    _pin_store()
    result = train(
        params, out_dir=out, resume=resume, overwrite=overwrite, max_steps=max_steps, report_dir=reports
    )
    if result is not None:  # rank 0 of a data-parallel run reports
        console.print(" ".join(f"{k}={v}" for k, v in result.to_json().items()))


@app.command("calibrate")
def calibrate_command(
    model: Annotated[Path | None, typer.Option(help="Model folder (default: train.out_dir).")] = None,
    reports: Annotated[Path, typer.Option(help="Plots and metrics folder.")] = Path("reports/calibration"),
    real: Annotated[
        Path | None,
        typer.Option(help="Real-recording validation set (default: test_real.val_out_dir, if built)."),
    ] = None,
) -> None:
    """Calibrate the detector on val and val_unseen: its score normalisation over training frames
    (calibration.score_norm), thresholds, ECE, beta vs prior; and measure it on the
    real-recording validation set."""
    from flam_core.calibrate import calibrate

    params = state.params()
    if real is None and Path(params.test_real.val_out_dir).exists():
        real = Path(params.test_real.val_out_dir)
    result = calibrate(params, model_dir=model, report_dir=reports, real_dir=real)
    console.print(
        f"threshold {result.threshold} for novel prompts ({result.split} macro segment F1 "
        f"{result.threshold_segment_f1_macro}; on val_unseen {result.threshold_unseen}), "
        f"{result.threshold_seen} over training labels (val); "
        "balanced ECE " + " -> ".join(f"{kind} {ece}" for kind, ece in result.ece_balanced.items()) + "; "
        f"sigmoid(beta) vs frame prior: Spearman {result.beta_prior_spearman}"
    )
    for system, figures in (result.val_real or {}).items():
        if system != "set":
            found, shot = figures["recordings"], figures["zero_shot"]
            console.print(
                f"val_real {system}: frame AUROC macro {found['frame_auroc_macro']} pooled "
                f"{found['frame_auroc_pooled']}, event found {found['event_found']}, segment F1 "
                f"{found['segment_f1_macro']}, false alarms {found['false_alarm_rate']}, zero-shot "
                f"top-1 {shot['top1']}"
            )


@app.command("evaluate")
def evaluate_command(
    models: Annotated[
        Path | None, typer.Option(help="Folder of models/<mode>/ (evaluation.models_dir).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Report folder (default: evaluation.out_dir).")] = None,
    tsv: Annotated[
        Path | None,
        typer.Option(help="Evaluate on a real SED set: DCASE TSV (filename onset offset event_label)."),
    ] = None,
    audio_dir: Annotated[Path | None, typer.Option(help="Audio folder of --tsv.")] = None,
    model: Annotated[str | None, typer.Option(help="With --tsv: model folder or MLflow URI.")] = None,
) -> None:
    """FLAM vs its baselines on the test splits (or one model on a DCASE-format dataset)."""
    params = state.params()
    if tsv is not None:
        if audio_dir is None:
            raise ArgumentError("--tsv needs --audio-dir")
        _check_file(tsv, "a DCASE TSV file")
        _check_folder(audio_dir, "the audio folder of --tsv")
        detector = _detector(_model_uri(model or params.train.out_dir))
        from flam_core.data.tsv import SedDataset
        from flam_core.evaluation.report import evaluate_sed_dataset

        result = evaluate_sed_dataset(detector, SedDataset(audio_dir, tsv))
        typer.echo(json.dumps(result, indent=2))
        return
    from flam_core.evaluation.report import evaluate

    claims = evaluate(params, models_dir=models, out_dir=out).claims
    if claims:
        low, high = claims["unseen_auroc_gain_ci95_low"], claims["unseen_auroc_gain_ci95_high"]
        console.print(
            f"unseen macro AUROC gain over FLAM-Global {claims['unseen_auroc_gain']:+.3f} (95% interval "
            f"[{low:+.3f}, {high:+.3f}] over {claims['unseen_auroc_labels']} prompts; clip "
            f"{claims['unseen_clip_auroc_gain']:+.3f}, within-clip "
            f"{claims['unseen_within_clip_auroc_gain']:+.3f}), PSDS1 gain "
            f"{claims['unseen_psds1_gain']:+.3f} ({claims['seen_psds1_gain']:+.3f} on test_seen), "
            f"retrieval R@5 ratio {claims['retrieval_r5_relative']:.2f}"
        )


@app.command("register")
def register_command(
    model: Annotated[Path | None, typer.Option(help="Model folder (default: train.out_dir).")] = None,
    metrics: Annotated[Path | None, typer.Option(help="Evaluation metrics.json.")] = None,
) -> None:
    """Register the model in MLflow (alias challenger) and run the champion gate."""
    from flam_core.registry import register

    params = state.params()
    _pin_store()
    decision = register(params, model_dir=model, eval_metrics=metrics)
    verdict = "promoted to champion" if decision.promoted else "stays challenger"
    console.print(f"{decision.model} v{decision.version} {verdict}: {decision.reason}")


@app.command("promote")
def promote_command(
    version: Annotated[int, typer.Option(help="Model version to promote.")],
    force: Annotated[bool, typer.Option("--force", help="Promote without the comparison.")] = False,
    name: Annotated[
        str | None, typer.Option("--model", help="Registered model (registry.model_name).")
    ] = None,
) -> None:
    """Move the champion alias to a version, through the gate unless --force."""
    from flam_core.registry import gate_version

    params = state.params()
    _pin_store()
    if name:
        params = params.model_copy(
            update={"registry": params.registry.model_copy(update={"model_name": name})}
        )
    decision = gate_version(params, version, force=force)
    verdict = "promoted to champion" if decision.promoted else "refused"
    console.print(f"{decision.model} v{decision.version} {verdict}: {decision.reason}")
    if not decision.promoted:
        raise typer.Exit(1)


DEFAULT_MODEL_URI = "models:/flam-sed@champion"
CHAMPION_ALIAS = "champion"


class ArgumentError(FlamError):
    """A command-line argument that cannot work; reported in one line, exit code 2."""


def _params_file() -> Path | None:
    """The project's params.yaml: `--params`, else the one found from the working directory up;
    None outside a project."""
    if state.params_path is not None:
        return state.params_path
    try:
        return find_params_file()
    except ConfigError:
        return None


def _pin_store() -> str:
    """The project's MLflow store (`tracking.tracking_uri`), exported as `$MLFLOW_TRACKING_URI` so
    every MLflow call of this process and its children uses it, never MLflow's own default
    (`./mlflow.db`). Experiments are created beside the store (`tracking.use_experiment`)."""
    from flam_core.tracking import tracking_uri

    uri = tracking_uri(state.params_path)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    # The CLI prints results only: no "Downloading artifacts" bar (unless asked for).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return uri


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` store URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def _read_store() -> str:
    """`_pin_store` for reading: a missing SQLite store is an error, not a new empty file."""
    uri = _pin_store()
    database = _sqlite_file(uri)
    if database is not None and not database.is_file():
        raise ConfigError(
            f"the MLflow store {uri} does not exist: run `dvc repro` (or `flam register`) to register "
            "a model, or pass --model models/flam"
        )
    return uri


def _is_mlflow_uri(model: str) -> bool:
    """`models:/...`, `runs:/...`, `s3://...`: what FlamDetector.from_uri sends to MLflow."""
    return ("://" in model or ":/" in model) and not Path(model).is_dir()


def _has_champion(uri: str, name: str) -> bool:
    """Whether the (existing) store `uri` holds `name@champion`."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(uri).get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return False  # no such registered model, or no champion alias
        raise ConfigError(f"cannot read the MLflow store {uri}: {exc.message}") from None
    return True


def _model_uri(model: str | None, origin: str = "--model") -> str:
    """`--model` checked (a model folder or an MLflow URI), or the registry's champion.

    Without `--model`: `models:/<registry.model_name>@champion` of the project's store; an error
    (no fallback) when the store has no champion, or outside a project without
    `$MLFLOW_TRACKING_URI`. `origin` names where `model` came from in messages.
    """
    if model:
        if _is_mlflow_uri(model):
            _read_store()
            return model
        if not Path(model).exists():
            raise ArgumentError(
                f"{origin} {model}: no such model folder (nor an MLflow URI such as {DEFAULT_MODEL_URI})"
            )
        if not Path(model).is_dir():
            raise ArgumentError(f"{origin} {model}: not a model folder (one holds model.pt and config.json)")
        return model
    params_file = _params_file()
    if params_file is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ArgumentError(
            f"--model is required outside a project ({Path.cwd()} has no params.yaml in it or its parents, "
            "and MLFLOW_TRACKING_URI is not set): pass --model models/flam or an MLflow model URI"
        )
    in_project = params_file is not None or state.resolved is not None
    name = (state.params() if in_project else Params()).registry.model_name
    store = _read_store()
    if not _has_champion(store, name):
        raise ConfigError(
            f"the MLflow store {store} has no {name}@{CHAMPION_ALIAS}: run `dvc repro` (or `flam register`) "
            "to register one, or pass --model models/flam"
        )
    return f"models:/{name}@{CHAMPION_ALIAS}"


def _detector(model_uri: str) -> Any:
    """Load the detector of a checked model reference (`_model_uri`), with prompt embeddings kept
    on disk (`flam_core.model.prompt_cache`; `FLAM_PROMPT_CACHE=off` turns that off).

    The model's OpenMP threads sleep between operations instead of spinning
    (`OMP_WAIT_POLICY=PASSIVE`, unless the variable is set): on cores that other processes also
    use, spinning threads wait on each other at every operation, and a 10 s file took 1-3 s
    instead of 0.1 s to score on two shared cores (BENCHMARKS.md, "Start-up time"). OpenMP reads
    the variable when torch loads, which is here in a `flam` process.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from flam_core.inference import FlamDetector

    return FlamDetector.from_uri(model_uri, cache_prompts=True)


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise ArgumentError(f"no such file: {path}")
    if not path.is_file():
        raise ArgumentError(f"{path} is not a file ({what} expected)")
    if not os.access(path, os.R_OK):
        raise ArgumentError(f"{path} is not readable")


def _check_folder(path: Path, what: str) -> None:
    if not path.exists():
        raise ArgumentError(f"no such folder: {path} ({what})")
    if not path.is_dir():
        raise ArgumentError(f"{path} is not a folder ({what} expected)")


def _check_texts(texts: list[str], option: str) -> list[str]:
    empty = [t for t in texts if not t.strip()]
    if not texts or empty:
        raise ArgumentError(f"{option} must be a non-empty text, got {empty[0] if empty else ''!r}")
    return list(texts)


def _check_writable(path: Path, option: str, folder: bool = False) -> None:
    """`path` can be written: it is (or can become) a file (`folder`: a folder) in a writable folder.

    The nearest existing folder is probed with an anonymous temporary file, which also catches
    read-only file systems and pseudo file systems, where permission bits do not tell.
    """
    if path.exists() and path.is_dir() != folder:
        kind = "a folder" if path.is_dir() else "a file"
        raise ArgumentError(f"{option} {path}: is {kind}, not {'a folder' if folder else 'a file'}")
    if path.is_file() and not os.access(path, os.W_OK):
        raise ArgumentError(f"{option} {path}: the file is not writable")
    parent = path if path.is_dir() else path.absolute().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise ArgumentError(f"{option} {path}: {existing} is a file, so no folder can be made there")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ArgumentError(f"{option} {path}: cannot write in {existing} ({exc.strerror or exc})") from None


def _check_plot(path: Path) -> None:
    """`--plot`: a writable file whose suffix names an image format matplotlib writes."""
    _check_writable(path, "--plot")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in formats:
        raise ArgumentError(
            f"--plot {path}: the name must end in an image format ({', '.join(sorted(formats))})"
        )


@app.command("detect")
def detect_command(
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="What to detect (repeat the option).")],
    audio: Annotated[
        list[str] | None,
        typer.Argument(
            help="Audio files (any length, rate, channels), folders (searched recursively), glob patterns, "
            "or S3 objects and prefixes (s3://bucket/key, s3://bucket/prefix/).",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Model folder or MLflow URI (default: the project's models:/flam-sed@champion)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the detection JSON (one file).")] = False,
    plot: Annotated[
        Path | None, typer.Option(help="Draw the score heatmap and segments to a PNG (one file).")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Override the calibrated threshold (0 to 1).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder for many files: detections.jsonl, segments.tsv, failed.jsonl "
            "(a second run resumes)."
        ),
    ] = None,
    list_file: Annotated[
        Path | None, typer.Option("--list", help="A file naming one audio file (or folder) per line.")
    ] = None,
    workers: Annotated[
        int, typer.Option(help="Processes decoding ahead of the model (0: decode in this one).")
    ] = 1,
    plots: Annotated[bool, typer.Option("--plots", help="With --out: a PNG per file in DIR/plots/.")] = False,
) -> None:
    """When does each prompt sound in recordings: frame probabilities and segments.

    One file: a table (or --json, --plot). Several files, folders, globs, --list, or --out DIR: the
    model is loaded once and DIR/detections.jsonl (a line per file) and DIR/segments.tsv (DCASE
    format) are written; files already in DIR are skipped; exit code 1 when a file could not be
    decoded (listed in DIR/failed.jsonl and retried by the next run).
    """
    inputs = list(audio or [])
    if list_file is not None:
        _check_file(list_file, "a list of audio files, one per line")
    if not inputs and list_file is None:
        raise ArgumentError("name the audio to detect in: files, folders, glob patterns or --list FILE")
    prompts = _check_texts(prompt, "--prompt")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ArgumentError(f"--threshold must be between 0 and 1, got {threshold}")
    if len(inputs) == 1 and list_file is None and out is None and not _is_pattern(inputs[0]):
        audio_input = _one_input(inputs[0])
        if plots:
            raise ArgumentError("--plots writes into --out DIR; for one file use --plot FILE.png")
        _detect_one(audio_input, prompts, model, as_json, plot, threshold)
        return
    if out is None:
        raise ArgumentError(
            "detecting in several files writes its results to a folder: pass --out DIR "
            "(detections.jsonl, segments.tsv)"
        )
    if as_json or plot is not None:
        raise ArgumentError(
            f"{'--json' if as_json else '--plot'} is for one file; with --out the detections go to "
            f"{out / 'detections.jsonl'} (and --plots draws a PNG per file)"
        )
    _detect_many(inputs, list_file, prompts, model, threshold, out, workers, plots)


@app.command("stream")
def stream_command(
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="What to detect (repeat the option).")],
    model: Annotated[
        str | None,
        typer.Option(help="Model folder or MLflow URI (default: the project's models:/flam-sed@champion)."),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option("--format", help="Input on stdin: wav (a WAV stream), or raw s16le / f32le samples."),
    ] = "wav",
    rate: Annotated[int | None, typer.Option(help="Sample rate of raw input (Hz).")] = None,
    channels: Annotated[int, typer.Option(help="Channels of raw input (interleaved).")] = 1,
    file: Annotated[
        Path | None,
        typer.Option(help="Read this audio file instead of stdin (any format flam detect reads)."),
    ] = None,
    realtime: Annotated[
        bool, typer.Option("--realtime", help="With --file: play it at the pace of real time.")
    ] = False,
    hop: Annotated[float, typer.Option(help="Seconds of new audio between two scorings.")] = 1.0,
    threshold: Annotated[
        float | None, typer.Option(help="Override the calibrated threshold (0 to 1).")
    ] = None,
) -> None:
    """Detect prompts in live audio: one JSON line per onset and offset, as soon as decided.

    Reads a WAV stream or raw PCM from stdin (or --file, optionally at real-time pace), scores the
    last 10 s every --hop seconds, and prints {"event": "onset"|"offset", "prompt", "time",
    "score"} lines (time: seconds into the input). Latency: about 1.6 s of look-ahead plus up to
    one hop plus the scoring time (flam_core.stream).
    """
    prompts = _check_texts(prompt, "--prompt")
    if fmt not in ("wav", "s16le", "f32le"):
        raise ArgumentError(f"--format must be wav, s16le or f32le, got {fmt!r}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ArgumentError(f"--threshold must be between 0 and 1, got {threshold}")
    if not (hop > 0 and math.isfinite(hop)):
        raise ArgumentError(f"--hop must be a positive number of seconds, got {hop}")
    if file is not None:
        _check_file(file, "an audio file")
        if fmt != "wav" or rate is not None:
            raise ArgumentError("--file is decoded by its own header: leave out --format and --rate")
    elif fmt != "wav" and rate is None:
        raise ArgumentError(f"raw {fmt} input needs its sample rate: pass --rate HZ (and --channels N)")
    elif realtime:
        raise ArgumentError("--realtime paces a --file; audio on stdin arrives at its own pace")
    model_uri = _model_uri(model)
    _stream(prompts, model_uri, fmt, rate, channels, file, realtime, hop, threshold)


def _stream(
    prompts: list[str],
    model_uri: str,
    fmt: str,
    rate: int | None,
    channels: int,
    file: Path | None,
    realtime: bool,
    hop: float,
    threshold: float | None,
) -> None:
    from flam_core.audio.io import StreamingResampler, to_mono
    from flam_core.audio.pcm import pcm_blocks, wav_stream
    from flam_core.stream import StreamDetector

    if file is not None:
        rate, blocks = _file_blocks(file, realtime)
    elif fmt == "wav":
        rate, _, blocks = wav_stream(sys.stdin.buffer)
    else:
        blocks = pcm_blocks(sys.stdin.buffer, fmt, int(rate or 0), channels)  # type: ignore[arg-type]
    detector = _detector(model_uri)
    live = StreamDetector(detector, prompts, hop_s=hop, threshold=threshold)
    resampler = StreamingResampler(int(rate or 0), detector.sample_rate)

    def model_rate() -> Iterator[np.ndarray]:
        for block in blocks:
            yield resampler.push(to_mono(block))
        yield resampler.flush()

    for event in live.run(model_rate()):
        print(json.dumps(event), flush=True)


def _file_blocks(path: Path, realtime: bool) -> tuple[int, Iterator[np.ndarray]]:
    """(sample rate, `[channels, n]` blocks of 0.1 s) of a file, at real-time pace when asked."""
    import soundfile as sf

    from flam_core.errors import AudioError

    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioError(f"{path}: cannot decode ({exc})") from None

    def blocks() -> Iterator[np.ndarray]:
        start = time.monotonic()
        played = 0
        for block in sf.blocks(
            str(path), blocksize=max(1, info.samplerate // 10), dtype="float32", always_2d=True
        ):
            played += len(block)
            if realtime:  # a block is given once its last sample has been "played"
                time.sleep(max(0.0, start + played / info.samplerate - time.monotonic()))
            yield block.T

    return info.samplerate, blocks()


def _is_pattern(text: str) -> bool:
    """A glob pattern (and not a path that exists with `*`, `?` or `[` in its name, nor an S3 URI)."""
    import glob

    from flam_core import storage

    return glob.has_magic(text) and not storage.is_s3(text) and not Path(text).exists()


def _one_input(text: str) -> Path | ObjectInfo:
    """The single input of `detect` without --out: a local path, or the `ObjectInfo` of an S3 object
    (listed now, before any model loads); a folder or S3 prefix is refused with what to do."""
    from flam_core import storage

    if not storage.is_s3(text):
        if Path(text).is_dir():
            raise ArgumentError(
                f"{text} is not a file: to detect in the audio files under a folder, pass --out DIR"
            )
        return Path(text)
    found = storage.input_objects(text)
    if len(found) != 1 or found[0].uri != text:
        raise ArgumentError(
            f"{text} is a prefix, not an object: to detect in the audio objects under it, pass --out DIR"
        )
    return found[0]


def _detect_one(
    audio: Path | ObjectInfo,
    prompts: list[str],
    model: str | None,
    as_json: bool,
    plot: Path | None,
    threshold: float | None,
) -> None:
    """One file (a local path or an S3 `ObjectInfo`): the segments as a table, or the detection
    JSON, on stdout. An S3 object is downloaded to a temporary file, removed afterwards."""
    from flam_core import storage
    from flam_core.errors import AudioError

    remote = isinstance(audio, storage.ObjectInfo)
    if not remote:
        _check_file(audio, "an audio file")
    if plot is not None:
        _check_plot(plot)
    detector = _detector(_model_uri(model))
    with storage.Staging() if remote else contextlib.nullcontext() as staging:
        local = staging.fetch(audio) if remote else audio
        try:
            detection = detector.detect(local, prompts, threshold=threshold)
        except AudioError as exc:  # the error names the temporary copy: name the object instead
            if not remote:
                raise
            raise type(exc)(str(exc).replace(str(local), audio.uri)) from None
    name = audio.uri if remote else audio
    if plot is not None:
        from flam_core.detection import plot_detection

        try:
            plot_detection(detection, plot)
        except OSError as exc:
            raise ArgumentError(f"--plot {plot}: cannot write it ({exc.strerror or exc})") from None
    if as_json:
        typer.echo(json.dumps(detection.to_json()))
        return
    table = Table(title=f"{name} ({detection.duration_s:.1f} s, model {detection.model})")
    for column in ("prompt", "onset (s)", "offset (s)", "score"):
        table.add_column(column)
    for seg in detection.segments:
        table.add_row(seg["prompt"], f"{seg['onset']:.2f}", f"{seg['offset']:.2f}", f"{seg['score']:.3f}")
    Console(soft_wrap=True).print(table if detection.segments else "no segment above the threshold")


def _detect_many(
    inputs: list[str],
    list_file: Path | None,
    prompts: list[str],
    model: str | None,
    threshold: float | None,
    out: Path,
    workers: int,
    plots: bool,
) -> None:
    """Many files into `out` (`flam_core.batch.detect_to_folder`); exit code 1 when any failed."""
    from flam_core.batch import collect_audio_files, read_list_file
    from flam_core.errors import DataError

    if workers < 0:
        raise ArgumentError(f"--workers must be 0 or more, got {workers}")
    bad = [p for p in prompts if any(c in p for c in "\t\r\n")]
    if bad:
        raise ArgumentError(f"--prompt {bad[0]!r}: a tab or newline cannot be written to segments.tsv")
    _check_writable(out, "--out", folder=True)
    listed = read_list_file(list_file) if list_file is not None else []
    try:
        files = collect_audio_files([*inputs, *listed], skip=out)
    except DataError as exc:
        raise ArgumentError(f"{exc}{f' (in --list {list_file})' if list_file is not None else ''}") from None
    if not files:
        raise ArgumentError(f"no audio file in {', '.join(inputs + listed)[:300]}")
    detector = _detector(_model_uri(model))
    from flam_core.batch import detect_to_folder

    def report(name: str, message: str) -> None:
        # audio errors name the file; the line must, whatever the error
        console.print(f"[yellow]failed[/] {message if message.startswith(name) else f'{name}: {message}'}")

    summary = detect_to_folder(
        detector, files, prompts, out, threshold=threshold, workers=workers, plots=plots, on_failure=report
    )
    console.print(f"detect: {summary.line()}")
    if summary.failed:
        console.print(f"{len(summary.failed)} file(s) could not be decoded: see {out / 'failed.jsonl'}")
        raise typer.Exit(1)


@app.command("index")
def index_command(
    audio_dir: Annotated[
        str,
        typer.Argument(
            help="Folder of audio files (searched recursively), or an S3 prefix s3://bucket/prefix/."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Index folder (created, or updated incrementally).")],
    model: Annotated[
        str | None,
        typer.Option(help="Model folder or MLflow URI (default: the project's models:/flam-sed@champion)."),
    ] = None,
) -> None:
    """Embed a corpus once (frame embeddings, float16); a second run adds only new or changed files.

    An S3 prefix is listed once, before the model loads; only new or changed objects are downloaded.
    """
    from flam_core import storage
    from flam_core.utils import AUDIO_EXTENSIONS

    objects = None
    if storage.is_s3(audio_dir):
        objects = storage.list_objects(audio_dir, AUDIO_EXTENSIONS)
        if not objects:
            raise ArgumentError(f"{audio_dir} holds no audio objects ({', '.join(AUDIO_EXTENSIONS)})")
    else:
        _check_folder(Path(audio_dir), "a folder of audio files")
    _check_writable(out, "--out", folder=True)
    detector = _detector(_model_uri(model))
    from flam_core.search import build_index

    summary = build_index(audio_dir, out, detector, objects=objects)
    typer.echo(" ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, list | dict)))
    for item in summary.get("skipped", []):
        console.print(f"[yellow]skipped[/] {item}")


@app.command("search")
def search_command(
    index: Annotated[Path, typer.Argument(help="Index folder built by `flam index`.")],
    query: Annotated[str, typer.Option("--query", "-q", help="What to look for.")],
    top: Annotated[int, typer.Option(help="Segments to return (1 or more).")] = 10,
    model: Annotated[
        str | None,
        typer.Option(help="Model folder or MLflow URI (default: the index's model, else the champion)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Ranked segments (file, onset, offset, score) of an indexed corpus for a text query."""
    _check_folder(index, "an index folder built by `flam index`")
    if not (index / "index.json").is_file():
        raise ArgumentError(
            f"{index} is not a search index (no index.json): run `flam index AUDIO_DIR` first"
        )
    _check_texts([query], "--query")
    if top < 1:
        raise ArgumentError(f"--top must be 1 or more, got {top}")
    from flam_core.search import SearchIndex, search

    opened = SearchIndex.open(index)
    if model:
        detector = _detector(_model_uri(model))
    else:  # the model that embedded the index, else the champion
        detector = _detector(_model_uri(opened.model.get("source"), origin="the index's model"))
    hits = search(opened, detector, query, top=top)
    if as_json:
        typer.echo(json.dumps(hits))
        return
    table = Table(title=f"{query!r} in {index}")
    for column in ("file", "onset (s)", "offset (s)", "score"):
        table.add_column(column)
    for hit in hits:
        table.add_row(hit["file"], f"{hit['onset']:.2f}", f"{hit['offset']:.2f}", f"{hit['score']:.3f}")
    Console(soft_wrap=True).print(table)


@app.command("monitor")
def monitor_command(
    current: Annotated[
        Path | None, typer.Option(help="Production audio folder (monitor.current_dir).")
    ] = None,
    model: Annotated[Path | None, typer.Option(help="Model folder (default: train.out_dir).")] = None,
    out: Annotated[Path | None, typer.Option(help="Report folder (default: monitor.out_dir).")] = None,
    fail_on_drift: Annotated[
        bool | None,
        typer.Option("--fail-on-drift/--no-fail-on-drift", help="Exit 1 when drift exceeds the share."),
    ] = None,
) -> None:
    """Drift report (evidently) of production audio and scores against the training mixtures."""
    from flam_core.monitor import DriftExceeded, check, run_monitor

    params = state.params()
    result = run_monitor(params, model_dir=model, current_dir=current, out_dir=out)
    console.print(
        f"drift share {result.drift_share:.2f} (max {result.max_drift_share}); drifted: "
        f"{', '.join(result.drifted_columns) or 'none'}; report {result.html_path}"
    )
    try:
        check(result, params.monitor.fail_on_drift if fail_on_drift is None else fail_on_drift)
    except DriftExceeded as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None


def run() -> None:
    """Console entry point: project errors print one clear line and exit 2."""
    try:
        code = app(standalone_mode=False)
    except FlamError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    run()
