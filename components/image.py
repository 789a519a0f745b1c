"""The container images of the FLAM components, in one place.

`FLAM_IMAGE` (CPU stages) and `FLAM_CUDA_IMAGE` (training) are read from the environment when
the components are imported, so `FLAM_IMAGE=registry.example.com/flam:abc123-cpu python -m
pipelines.flam compile` binds a pipeline to the images `make images` built. The defaults are the
names the committed `pipelines/flam.yaml` was compiled with.
"""

from __future__ import annotations

import os

DEFAULT_IMAGE = "ghcr.io/flam-project/flam:latest-cpu"
DEFAULT_CUDA_IMAGE = "ghcr.io/flam-project/flam:latest-cuda"

FLAM_IMAGE = os.environ.get("FLAM_IMAGE") or DEFAULT_IMAGE
FLAM_CUDA_IMAGE = os.environ.get("FLAM_CUDA_IMAGE") or DEFAULT_CUDA_IMAGE
