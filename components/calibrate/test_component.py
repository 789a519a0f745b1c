import json

from kfp.dsl import Artifact, Dataset, Metrics, Model

from components.calibrate.component import calibrate_model
from tests.conftest import smoke_params


def test_calibrates_a_copy_of_the_model(
    smoke_models, smoke_features, smoke_library, smoke_recipes, val_real_set, tmp_path
):
    (tmp_path / "params.json").write_text(smoke_params().model_dump_json())
    trained = smoke_models / "flam"
    before = {p.name: p.stat().st_mtime_ns for p in trained.iterdir()}
    model = Model(uri=str(trained))
    model.metadata.update({"mode": "flam", "framework": "pytorch"})
    calibrated, report = Model(uri=str(tmp_path / "calibrated")), Dataset(uri=str(tmp_path / "report"))
    metrics = Metrics(uri=str(tmp_path / "metrics"))
    calibrate_model.python_func(
        params=Artifact(uri=str(tmp_path / "params.json")),
        model=model,
        library=Dataset(uri=str(smoke_library[0])),
        recipes=Dataset(uri=str(smoke_recipes[0])),
        features=Dataset(uri=str(smoke_features)),
        real_set=Dataset(uri=str(val_real_set[0])),
        calibrated=calibrated,
        calibration_report=report,
        metrics=metrics,
    )
    # The input artifact is read-only: the calibration goes into the copy, without checkpoints.
    assert {p.name: p.stat().st_mtime_ns for p in trained.iterdir()} == before
    copied = {p.name for p in (tmp_path / "calibrated").iterdir()}
    assert {"model.pt", "config.json", "calibration.json"} <= copied and "checkpoints" not in copied
    assert (tmp_path / "calibrated" / "model.pt").read_bytes() == (trained / "model.pt").read_bytes()
    calibration = json.loads((tmp_path / "calibrated" / "calibration.json").read_text())
    assert 0.0 < calibration["threshold"] < 1.0
    assert calibrated.metadata == {
        "mode": "flam",
        "framework": "pytorch",
        "threshold": calibration["threshold"],
    }
    for key in ("threshold", "threshold_segment_f1_macro", "threshold_event_f1_macro", "threshold_seen"):
        assert metrics.metadata[key] == calibration[key]
    for kind in ("posterior", "unbiased"):
        assert metrics.metadata[f"ece_balanced.{kind}"] == calibration["ece_balanced"][kind]
    real = json.loads((tmp_path / "report" / "metrics.json").read_text())["val_real"]
    for system in ("flam", "audioset"):
        pooled = real[system]["recordings"]["frame_auroc_pooled"]
        assert metrics.metadata[f"val_real.{system}.frame_auroc_pooled"] == pooled
    assert {p.name for p in (tmp_path / "report").iterdir()} == {
        "metrics.json",
        "reliability.png",
        "beta_prior.png",
    }
