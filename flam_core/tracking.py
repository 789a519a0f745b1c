"""Where the project's MLflow store is: one store for every command of a project.

`tracking_uri()` is `$MLFLOW_TRACKING_URI` when set, else the SQLite file `mlruns.db` beside the
project's params.yaml; experiments keep their artifacts in `mlruns/` beside that file
(`artifact_location`), never in the working directory. Training logs its runs there, the
registry registers models there, and `flam detect` fetches the champion from there.
"""

from __future__ import annotations

import os
from pathlib import Path

from flam_core.config import find_params_file
from flam_core.errors import ConfigError


def tracking_uri(params_file: str | Path | None = None) -> str:
    """The project's one MLflow store: `$MLFLOW_TRACKING_URI` when set, else the SQLite file
    `mlruns.db` next to the project's params.yaml (`params_file`, default: the one found from the
    working directory up), as an absolute `sqlite:////...` URI, so every command of a project,
    from any folder, reads and writes the same store.

    Raises ConfigError outside a project (no params.yaml found) without `$MLFLOW_TRACKING_URI`.
    """
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    try:
        params_path = Path(params_file) if params_file else find_params_file()
    except ConfigError:
        raise ConfigError(
            f"no MLflow store: {Path.cwd()} is not inside a project (no params.yaml in it or its parents) "
            "and MLFLOW_TRACKING_URI is not set; run inside the project, pass --params, or set "
            "MLFLOW_TRACKING_URI"
        ) from None
    return f"sqlite:///{(params_path.resolve().parent / 'mlruns.db').as_posix()}"


def artifact_location(uri: str | None = None) -> str | None:
    """Where a new experiment in the store `uri` (default `tracking_uri()`) keeps run artifacts:
    `mlruns/` beside a SQLite store's database file, so they never land in the working directory
    (MLflow's default is `./mlruns`); None for other stores, whose server chooses."""
    uri = uri or tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    database = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not database or database == ":memory:":
        return None
    return str(Path(database).resolve().parent / "mlruns")


def use_experiment(name: str) -> str:
    """Point MLflow at the project's store and at experiment `name`, creating it if missing with
    its artifacts at `artifact_location()` (beside a SQLite store, never the working directory).
    Returns the store's URI."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=artifact_location(uri))
    mlflow.set_experiment(name)
    return uri
