"""Stage `test_real`: the real-recording test set, from the held-out sources only."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.image import FLAM_IMAGE


@dsl.component(base_image=FLAM_IMAGE, install_kfp_package=False)
def build_real_set(params: Input[Artifact], library: Input[Dataset], real_set: Output[Dataset]):
    """`flam_core.data.realset.build_real_set(params, library, out_dir)`, as `flam synth real` runs it."""
    from pathlib import Path

    from flam_core.config import Params
    from flam_core.data.realset import build_real_set

    resolved = Params.model_validate_json(Path(params.path).read_text())
    summary = build_real_set(resolved, Path(library.path), Path(real_set.path))
    real_set.metadata.update(
        {
            "recordings": summary.recordings,
            "clips": summary.clips,
            "prompts": len(summary.labels),
            "sources": ", ".join(summary.sources),
        }
    )
