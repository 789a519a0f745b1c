"""Stage `sources`: the labelled source library (clips, manifest.parquet, summary.json)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from components.image import FLAM_IMAGE


@dsl.component(base_image=FLAM_IMAGE, install_kfp_package=False)
def build_sources(params: Input[Artifact], library: Output[Dataset], metrics: Output[Metrics]):
    """`flam_core.data.sources.build_source_library(params, out_dir=library, base_dir=cwd)`."""
    from pathlib import Path

    from flam_core.config import Params
    from flam_core.data.sources import build_source_library

    resolved = Params.model_validate_json(Path(params.path).read_text())
    summary = build_source_library(resolved, out_dir=Path(library.path), base_dir=Path.cwd())
    stats = summary.stats
    for key in ("n_clips", "n_event_clips", "n_event_labels", "n_backgrounds"):
        metrics.log_metric(key, stats[key])
    metrics.log_metric("n_heldout_labels", len(summary.heldout_labels))
    metrics.log_metric("n_rejected", len(summary.rejected))
    library.metadata["manifest_hash"] = summary.manifest_hash
