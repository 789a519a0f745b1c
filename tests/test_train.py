"""Training on the smoke profile's cached features: loss, crash and resume, failure modes."""

import json
import shutil

import numpy as np
import pytest
import torch

import flam_core.train
from flam_core.errors import ConfigError, DataError
from flam_core.features import read_labels, write_labels
from flam_core.model.flam import FlamConfig, FlamHead, build_model
from flam_core.model.text_encoder import TextEncoder
from flam_core.postprocess import unbiased_scores
from flam_core.train import TrainingDiverged, TrainResult, latest_checkpoint, param_groups, train
from tests.conftest import smoke_params

STEPS = ("train.steps=24", "train.warmup_steps=4", "train.log_every=4", "train.checkpoint_every=8")


@pytest.fixture(scope="module")
def feature_cache(smoke_features):
    return smoke_features


@pytest.fixture(scope="module", autouse=True)
def mlflow_in_tmp(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}")
        yield


def run(feature_cache, tmp_path, name, *overrides, **kwargs):
    params = smoke_params(*STEPS, *overrides)
    return train(
        params,
        features_dir=feature_cache,
        out_dir=tmp_path / name,
        report_dir=tmp_path / f"{name}-reports",
        **kwargs,
    )


def losses(tmp_path, name):
    lines = (tmp_path / f"{name}-reports" / "loss.csv").read_text().splitlines()
    header = lines[0].split(",")
    return np.array([[float(v) for v in line.split(",")] for line in lines[1:]]), header


def test_training_lowers_the_loss_and_writes_the_model(feature_cache, tmp_path):
    metrics = run(feature_cache, tmp_path, "model")
    assert metrics.steps == 24 and metrics.final_loss < metrics.first_loss
    assert 0.0 <= metrics.validation["val_frame_auroc_micro"] <= 1.0
    out = tmp_path / "model"
    assert json.loads((out / "metrics.json").read_text()) == metrics.to_json()
    assert TrainResult.from_json(metrics.to_json()) == metrics
    config = json.loads((out / "config.json").read_text())
    assert config["text_encoder"]["dim"] == 384 and config["audio"]["encoder"] == "yamnet"
    state = torch.load(out / "model.pt", weights_only=True)
    assert any(k.startswith("head.alpha_mlp") for k in state)
    table, header = losses(tmp_path, "model")
    assert header[:3] == ["step", "lr", "loss"] and table.shape[0] == 24


class Crash(Exception):
    """A failure injected into the training loop (the process dies mid-run)."""


@pytest.mark.slow
def test_crashed_and_resumed_run_matches_an_uninterrupted_one(feature_cache, tmp_path, monkeypatch):
    whole_metrics = run(feature_cache, tmp_path, "whole")
    whole_csv = (tmp_path / "whole-reports" / "loss.csv").read_text()
    # Die in step 14: loss.csv was last flushed at step 12 (log_every 4), the last checkpoint is
    # step 8, so the file holds four rows past the checkpoint that the resumed run computes again.
    compute_loss, calls = flam_core.train.compute_loss, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 14:
            raise Crash("injected at step 14")
        return compute_loss(*args, **kwargs)

    monkeypatch.setattr(flam_core.train, "compute_loss", crashing)
    with pytest.raises(Crash):
        run(feature_cache, tmp_path, "split")
    monkeypatch.undo()
    report = tmp_path / "split-reports" / "loss.csv"
    assert report.read_text() == "".join(whole_csv.splitlines(keepends=True)[:13])  # header, steps 1-12
    assert latest_checkpoint(tmp_path / "split" / "checkpoints").name == "step-0000008"
    assert not (tmp_path / "split" / "model.pt").exists()
    with report.open("a") as handle:
        handle.write("13,0.00035,41.2")  # and a row cut short, as by a crash in the middle of a write
    with pytest.raises(ConfigError, match=r"split.*--resume.*--overwrite"):
        run(feature_cache, tmp_path, "split")  # never over a run by accident

    metrics = run(feature_cache, tmp_path, "split", resume=True)
    assert report.read_text() == whole_csv  # every row bit-identical, none twice, none missing
    for key in ("first_loss", "final_loss", "val_frame_auroc_micro"):
        assert metrics.to_json()[key] == whole_metrics.to_json()[key]
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_naming_step_and_batch(feature_cache, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(feature_cache, broken)
    features = np.load(broken / "train.features.npy", mmap_mode="r+")
    features[:] = np.nan
    features.flush()
    del features
    with pytest.raises(TrainingDiverged, match=r"non-finite loss \(nan\) at step 1, batch of mixtures \[\d+"):
        run(broken, tmp_path, "nan")
    assert not (tmp_path / "nan" / "model.pt").exists()
    import mlflow

    assert mlflow.active_run() is None  # the failed run is closed, not left open in the process
    last = mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"], max_results=1)
    assert last["status"].tolist() == ["FAILED"]


@pytest.mark.parametrize("mode", ["no_text_scale", "no_text_bias", "no_text_scale_bias"])
def test_every_ablation_trains_to_a_model(feature_cache, tmp_path, mode):
    metrics = run(feature_cache, tmp_path, mode, f"train.mode={mode}", "train.steps=8")
    assert (tmp_path / mode / "model.pt").is_file()
    saved = json.loads((tmp_path / mode / "metrics.json").read_text())
    if mode == "no_text_scale":
        assert -1.0 <= saved["beta_prior_spearman"] <= 1.0
    else:  # one shared bias: no per-label ranking to correlate
        assert saved["beta_prior_spearman"] is None
    assert metrics.steps == 8


def test_vocabulary_negatives_reach_the_frame_and_prior_losses(feature_cache, tmp_path):
    for v in (0, 4):
        run(feature_cache, tmp_path, f"v{v}", "train.steps=2", f"loader.negative_texts={v}")
    (plain, header), (negatives, _) = losses(tmp_path, "v0"), losses(tmp_path, "v4")
    sed, prior = header.index("sed"), header.index("prior")
    # the same first batch (same model, same mixtures) with 4 texts more, negative everywhere
    assert plain[0, sed] != negatives[0, sed] and plain[0, prior] != negatives[0, prior]
    assert (tmp_path / "v4" / "model.pt").is_file()


def test_a_split_without_events_fails_before_any_step(feature_cache, tmp_path):
    no_events = tmp_path / "no-events"
    shutil.copytree(feature_cache, no_events)
    labels = read_labels(no_events / "train.labels.npz")
    stripped = []
    for mixture_id, frame_labels in labels:
        keep = ~frame_labels.is_event
        stripped.append(
            (
                mixture_id,
                type(frame_labels)(
                    labels=tuple(np.array(frame_labels.labels)[keep]),
                    captions=tuple(np.array(frame_labels.captions)[keep]),
                    is_event=frame_labels.is_event[keep],
                    frames=frame_labels.frames[keep],
                ),
            )
        )
    write_labels(no_events / "train.labels.npz", stripped, labels[0][1].frames.shape[1])
    with pytest.raises(DataError, match="no event label"):
        run(no_events, tmp_path, "empty")
    assert not (tmp_path / "empty-reports").exists()


def test_untracked_run_writes_the_model_and_no_mlflow_store(feature_cache, tmp_path, monkeypatch):
    store = tmp_path / "store.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    run(feature_cache, tmp_path, "untracked", "train.steps=4", "train.log_every=2", track=False)
    assert (tmp_path / "untracked" / "model.pt").is_file()
    assert not store.exists()

    # The folder now holds a run: training into it again needs --overwrite, which replaces it whole.
    with pytest.raises(ConfigError, match=r"untracked already holds a training run \(model.pt\)"):
        run(feature_cache, tmp_path, "untracked", "train.steps=2", track=False)
    stale = tmp_path / "untracked" / "checkpoints" / "step-0000004"
    stale.mkdir(parents=True)
    metrics = run(feature_cache, tmp_path, "untracked", "train.steps=2", track=False, overwrite=True)
    assert metrics.steps == 2 and not stale.exists()
    assert json.loads((tmp_path / "untracked" / "metrics.json").read_text())["steps"] == 2
    assert losses(tmp_path, "untracked")[0][:, 0].tolist() == [1.0, 2.0]


def test_an_existing_run_is_refused_before_any_work(tmp_path):
    params = smoke_params(*STEPS)
    (tmp_path / "m" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"holds a training run \(checkpoints\).*--resume.*--overwrite"):
        train(params, features_dir=tmp_path / "nothing", out_dir=tmp_path / "m")
    with pytest.raises(ConfigError, match="exclude each other"):
        train(params, features_dir=tmp_path / "nothing", out_dir=tmp_path / "m", resume=True, overwrite=True)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "model.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"model.pt but no checkpoint to resume from.*--overwrite"):
        train(params, features_dir=tmp_path / "nothing", out_dir=tmp_path / "done", resume=True)


def _ids(parameters) -> set[int]:
    return {id(p) for p in parameters}


def test_text_encoder_trains_at_its_own_rate():
    tuned = build_model(smoke_params("model.train_text_encoder=true", "train.text_lr=2e-5"), audio_dim=16)
    head_group, text_group = param_groups(tuned, 5e-4, 2e-5)
    assert (head_group["lr"], text_group["lr"]) == (5e-4, 2e-5)
    assert _ids(text_group["params"]) == _ids(tuned.text_encoder.parameters())
    trainable = _ids(p for p in tuned.parameters() if p.requires_grad)
    assert _ids(head_group["params"]) == trainable - _ids(tuned.text_encoder.parameters())
    # Unset, or with a frozen encoder: one group at the head's rate.
    assert [len(g["params"]) for g in param_groups(tuned, 5e-4, None)] == [len(trainable)]
    frozen = build_model(smoke_params("train.text_lr=2e-5"), audio_dim=16)
    (group,) = param_groups(frozen, 5e-4, 2e-5)
    assert group["lr"] == 5e-4 and _ids(frozen.text_encoder.parameters()).isdisjoint(_ids(group["params"]))


def test_frozen_text_encoder_answers_on_the_model_device():
    """The cache is filled on the CPU before the model moves; embeddings must follow the model
    (a CUDA run with a frozen encoder once got CPU embeddings for a CUDA head)."""
    encoder = TextEncoder()
    encoder.precompute(["a dog barks", "glass breaking"])
    encoder.model.to("meta")  # a device other than the cache's, without a GPU
    out = encoder(["glass breaking", "a dog barks"])
    assert out.device.type == "meta" and out.shape == (2, encoder.dim)


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"no cached features for split 'train'.*flam features"):
        train(smoke_params(*STEPS), features_dir=tmp_path / "nothing", out_dir=tmp_path / "m")


def test_head_initialisation_and_score_forms():
    head = FlamHead(FlamConfig(audio_dim=16, text_dim=8, embed_dim=8, context="none"))
    text = torch.randn(5, 8)
    alpha, beta = head.text_scale_bias(text)
    assert torch.allclose(alpha, torch.full((5,), 10.0), rtol=0.5)
    assert torch.allclose(beta, torch.full((5,), -8.0), atol=1.0)
    frame_emb = torch.nn.functional.normalize(torch.randn(2, 7, 8), dim=-1)
    text_emb = head.text_embeddings(text)
    # Far-negative beta: the unbiased score and the approximate sigmoid(alpha * cos) agree.
    very_negative = torch.full((5,), -20.0)
    logits = head.frame_logits(frame_emb, text_emb, alpha, very_negative)
    unbiased = unbiased_scores(logits, very_negative[None, :, None])
    approximate = head.approximate_scores(frame_emb, text_emb, alpha)
    assert torch.allclose(unbiased, approximate, atol=1e-6)
    # Near the prior the two differ: the unbiased score removes it.
    logits = head.frame_logits(frame_emb, text_emb, alpha, beta * 0)
    assert not torch.allclose(unbiased_scores(logits, (beta * 0)[None, :, None]), approximate, atol=1e-3)


def test_ablation_heads_share_one_scale_or_bias():
    text = torch.randn(4, 8)
    no_scale = FlamHead(FlamConfig(audio_dim=16, text_dim=8, embed_dim=8, context="none", text_scale=False))
    alpha, _ = no_scale.text_scale_bias(text)
    assert torch.all(alpha == alpha[0])
    no_bias = FlamHead(FlamConfig(audio_dim=16, text_dim=8, embed_dim=8, context="none", text_bias=False))
    _, beta = no_bias.text_scale_bias(text)
    assert torch.all(beta == beta[0])
