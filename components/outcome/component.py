"""The exit task of the pipeline's `dsl.ExitHandler`: record how the run ended."""

from kfp import dsl

from components.image import FLAM_IMAGE


@dsl.component(base_image=FLAM_IMAGE, install_kfp_package=False)
def record_outcome(status: dsl.PipelineTaskFinalStatus, experiment: str) -> str:
    """Print the run's final state and, when `$MLFLOW_TRACKING_URI` is set, log it as an MLflow run
    `pipeline-outcome` (tags `pipeline.state`, `pipeline.job`, `pipeline.error`) in `experiment`.
    Returns the state (SUCCEEDED, FAILED, CANCELLED)."""
    import json
    import os

    outcome = {
        "state": status.state,
        "job": status.pipeline_job_resource_name,
        "task": status.pipeline_task_name,
        "error_code": None if status.error_code is None else int(status.error_code),
        "error": status.error_message,
    }
    print(json.dumps(outcome))
    if os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name="pipeline-outcome"):
            mlflow.set_tags(
                {
                    "pipeline.state": str(outcome["state"]),
                    "pipeline.job": str(outcome["job"]),
                    "pipeline.error": str(outcome["error"] or ""),
                }
            )
    return str(status.state)
