"""Stage `test_real`: the real-recording test set, from the held-out sources only, and its
validation twin (`split="val_real"`) from the validation sources."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.image import FLAM_IMAGE


@dsl.component(base_image=FLAM_IMAGE, install_kfp_package=False)
def build_real_set(
    params: Input[Artifact], library: Input[Dataset], real_set: Output[Dataset], split: str = "test_real"
):
    """`flam_core.data.realset.build_real_set(params, library, out_dir, split)`, as `flam synth real`
    runs it. The validation set of params without `sources.validation_sources` is an empty folder."""
    from pathlib import Path

    from flam_core.config import Params
    from flam_core.data.realset import VAL_REAL_SPLIT, build_real_set

    resolved = Params.model_validate_json(Path(params.path).read_text())
    if split == VAL_REAL_SPLIT and not resolved.sources.validation_sources:
        Path(real_set.path).mkdir(parents=True, exist_ok=True)
        real_set.metadata.update({"recordings": 0, "clips": 0, "prompts": 0, "sources": ""})
        return
    summary = build_real_set(resolved, Path(library.path), Path(real_set.path), split=split)
    real_set.metadata.update(
        {
            "recordings": summary.recordings,
            "clips": summary.clips,
            "prompts": len(summary.labels),
            "sources": ", ".join(summary.sources),
        }
    )
