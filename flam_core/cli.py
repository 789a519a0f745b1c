"""The `flam` command. Each subcommand parses its arguments and calls one `flam_core` function."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
import yaml
from rich.console import Console
from rich.table import Table

from flam_core.config import Params, load_params
from flam_core.errors import FlamError

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

    def params(self) -> Params:
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
) -> None:
    state.params_path, state.profile, state.overrides = params, profile, list(overrides or [])


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
    stats = summary["stats"]
    for item in summary["skipped_bad_files"]:
        console.print(f"[yellow]skipped[/] {item['clip']}: {item['error']}")
    console.print(
        f"source library: {stats['n_event_clips']} event clips, {stats['n_event_labels']} event labels, "
        f"{stats['n_backgrounds']} backgrounds, {len(stats['heldout_labels'])} held-out labels; "
        f"{len(summary['rejected'])} rejected, {len(summary['skipped_bad_files'])} skipped; "
        f"manifest {summary['manifest_hash'][:12]}"
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
    for split, info in summary["splits"].items():
        console.print(
            f"{split}: {info['n_mixtures']} mixtures, {info['n_event_pieces']} event pieces, "
            f"{info['n_event_labels']} labels, {info['bytes'] / 1e6:.1f} MB"
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
    for split, info in summary["splits"].items():
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
        f"features ({summary['encoder']}, {summary['dim']}-d x {summary['n_frames']} frames): "
        f"{summary['shapes']}"
    )


@app.command("train")
def train_command(
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
    out: Annotated[Path | None, typer.Option(help="Model folder (default: train.out_dir).")] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after this many steps (schedule unchanged).")
    ] = None,
    reports: Annotated[Path, typer.Option(help="Loss curve and metrics folder.")] = Path("reports/train"),
) -> None:
    """Train FLAM (or an ablation: train.mode) on the train split.

    Data-parallel with DeepSpeed: `torchrun --nproc_per_node N -m flam_core.cli -S
    train.backend=deepspeed train` (or the `deepspeed` launcher); rank 0 writes the outputs.
    """
    from flam_core.train import train

    metrics = train(state.params(), out_dir=out, resume=resume, max_steps=max_steps, report_dir=reports)
    if metrics:
        console.print(" ".join(f"{k}={v}" for k, v in metrics.items()))


@app.command("calibrate")
def calibrate_command(
    model: Annotated[Path | None, typer.Option(help="Model folder (default: train.out_dir).")] = None,
    reports: Annotated[Path, typer.Option(help="Plots and metrics folder.")] = Path("reports/calibration"),
) -> None:
    """Calibrate the unbiased detector on val and val_unseen: thresholds, ECE, beta vs prior."""
    from flam_core.calibrate import calibrate

    result = calibrate(state.params(), model_dir=model, report_dir=reports)
    console.print(
        f"threshold {result['threshold']} for novel prompts (val_unseen macro segment F1 "
        f"{result['threshold_segment_f1_macro']}), {result['threshold_seen']} over training labels (val); "
        "balanced ECE "
        f"posterior {result['ece_balanced']['posterior']} -> unbiased {result['ece_balanced']['unbiased']}; "
        f"sigmoid(beta) vs frame prior: Spearman {result['beta_prior_spearman']}"
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
        from flam_core.evaluation.report import evaluate_sed_dataset
        from flam_core.evaluation.tsv import SedDataset
        from flam_core.inference import FlamDetector

        if audio_dir is None:
            raise FlamError("--tsv needs --audio-dir")
        detector = FlamDetector.from_uri(model or params.train.out_dir)
        result = evaluate_sed_dataset(detector, SedDataset(audio_dir, tsv))
        typer.echo(json.dumps(result, indent=2))
        return
    from flam_core.evaluation.report import evaluate

    metrics = evaluate(params, models_dir=models, out_dir=out)
    claims = metrics["claims"]
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

    decision = register(state.params(), model_dir=model, eval_metrics=metrics)
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


def _detector(model: str | None) -> object:
    """The detector of `--model`; by default the registry's champion, else the local model."""
    from flam_core.errors import ConfigError
    from flam_core.inference import FlamDetector

    if model:
        return FlamDetector.from_uri(model)
    try:
        return FlamDetector.from_uri(DEFAULT_MODEL_URI)
    except ConfigError as exc:
        local = Path(state.params().train.out_dir)
        console.print(f"[yellow]{DEFAULT_MODEL_URI} is not available ({exc}); using {local}[/]")
        return FlamDetector.from_dir(local)


@app.command("detect")
def detect_command(
    audio: Annotated[Path, typer.Argument(help="An audio file (any length, rate, channels).")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="What to detect (repeat the option).")],
    model: Annotated[
        str | None, typer.Option(help=f"Model folder or MLflow URI (default {DEFAULT_MODEL_URI}).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the detection JSON.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Draw the score heatmap and segments to a PNG.")] = None,
    threshold: Annotated[float | None, typer.Option(help="Override the calibrated threshold.")] = None,
) -> None:
    """When does each prompt sound in a recording: frame probabilities and segments."""
    from flam_core.inference import plot_detection

    detector = _detector(model)
    detection = detector.detect(audio, list(prompt), threshold=threshold)  # type: ignore[attr-defined]
    if plot is not None:
        plot_detection(detection, plot)
    if as_json:
        typer.echo(json.dumps(detection.to_json()))
        return
    table = Table(title=f"{audio} ({detection.duration_s:.1f} s, model {detection.model})")
    for column in ("prompt", "onset (s)", "offset (s)", "score"):
        table.add_column(column)
    for seg in detection.segments:
        table.add_row(seg["prompt"], f"{seg['onset']:.2f}", f"{seg['offset']:.2f}", f"{seg['score']:.3f}")
    Console(soft_wrap=True).print(table if detection.segments else "no segment above the threshold")


@app.command("index")
def index_command(
    audio_dir: Annotated[Path, typer.Argument(help="Folder of audio files (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", help="Index folder (created, or updated incrementally).")],
    model: Annotated[
        str | None, typer.Option(help=f"Model folder or MLflow URI (default {DEFAULT_MODEL_URI}).")
    ] = None,
) -> None:
    """Embed a corpus once (frame embeddings, float16); a second run adds only new or changed files."""
    from flam_core.search import build_index

    summary = build_index(audio_dir, out, _detector(model))
    console.print(" ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, list | dict)))
    for item in summary.get("skipped", []):
        console.print(f"[yellow]skipped[/] {item}")


@app.command("search")
def search_command(
    index: Annotated[Path, typer.Argument(help="Index folder built by `flam index`.")],
    query: Annotated[str, typer.Option("--query", "-q", help="What to look for.")],
    top: Annotated[int, typer.Option(help="Segments to return.")] = 10,
    model: Annotated[
        str | None,
        typer.Option(help="Model folder or MLflow URI (default: the index's model, else champion)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Ranked segments (file, onset, offset, score) of an indexed corpus for a text query."""
    from flam_core.search import SearchIndex, search

    opened = SearchIndex.open(index)
    hits = search(opened, _detector(model or opened.model.get("source")), query, top=top)
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
