"""Resolve the parameters once: params.yaml + profile + overrides -> one JSON artifact."""

from kfp import dsl
from kfp.dsl import Artifact, Output

from components.image import FLAM_IMAGE


@dsl.component(base_image=FLAM_IMAGE, install_kfp_package=False)
def resolve_params(profile: str, overrides: list[str], n_mixtures: int, params: Output[Artifact]):
    """`flam_core.config.load_params(None, profile, overrides)`; writes `params.model_dump(mode="json")`.

    `profile` "" keeps the file's profile; `n_mixtures` > 0 appends `synth.n_mixtures.train=N`.
    params.yaml is found from the working directory up (the image's WORKDIR holds it).
    """
    import json
    from pathlib import Path

    from flam_core.config import load_params

    settings = [str(item) for item in overrides or []]
    if n_mixtures > 0:
        settings.append(f"synth.n_mixtures.train={int(n_mixtures)}")
    resolved = load_params(None, profile or None, settings)
    Path(params.path).parent.mkdir(parents=True, exist_ok=True)
    Path(params.path).write_text(json.dumps(resolved.model_dump(mode="json"), indent=2, sort_keys=True))
    params.metadata.update({"profile": resolved.profile, "overrides": settings})
