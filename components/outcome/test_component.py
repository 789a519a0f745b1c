from kfp.dsl import PipelineTaskFinalStatus

from components.outcome.component import record_outcome


def test_records_the_final_state_in_mlflow(tmp_path, monkeypatch, capsys):
    import mlflow

    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)
    status = PipelineTaskFinalStatus(
        state="FAILED",
        pipeline_job_resource_name="flam-run-1",
        pipeline_task_name="exit-handler-1",
        error_code=1.0,  # kfp.local passes integers as floats
        error_message="Task exit-handler-1 failed.",
    )
    assert record_outcome.python_func(status=status, experiment="outcomes") == "FAILED"
    assert '"error_code": 1' in capsys.readouterr().out
    mlflow.set_tracking_uri(store)
    (run,) = mlflow.search_runs(experiment_names=["outcomes"], output_format="list")
    assert run.info.run_name == "pipeline-outcome"
    assert run.data.tags["pipeline.state"] == "FAILED"
    assert run.data.tags["pipeline.error"] == "Task exit-handler-1 failed."
