"""Stage `shards` (optional): mixtures materialised as WebDataset tar shards."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.image import FLAM_IMAGE


@dsl.component(base_image=FLAM_IMAGE, install_kfp_package=False)
def write_shards(
    params: Input[Artifact], library: Input[Dataset], recipes: Input[Dataset], shards: Output[Dataset]
):
    """`flam_core.data.shards.write_shards(params, library, recipes, out_dir)` when `shards.enabled`.

    Disabled (the CPU profiles): writes only `summary.json` saying so, as `flam synth shards` does.
    """
    import json
    from pathlib import Path

    from flam_core.config import Params
    from flam_core.data.shards import write_shards
    from flam_core.utils import atomic_write_text

    resolved = Params.model_validate_json(Path(params.path).read_text())
    out = Path(shards.path)
    if not resolved.shards.enabled:
        atomic_write_text(out / "summary.json", json.dumps({"enabled": False, "splits": {}}, indent=2))
        shards.metadata["enabled"] = False
        return
    summary = write_shards(resolved, Path(library.path), Path(recipes.path), out_dir=out)
    n_shards = sum(split["n_shards"] for split in summary.splits.values())
    shards.metadata.update({"enabled": True, "n_shards": n_shards})
