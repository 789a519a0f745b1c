"""MGA-CLAP, the frame-aware baseline: each part against hand-computed values, and the model
through training, the model folder and detection."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from flam_core.errors import ConfigError, DataError
from flam_core.losses import (
    FlamLoss,
    LossInputError,
    clip_loss,
    hard_negative_clip_loss,
    hard_negative_weights,
)
from flam_core.model.flam import FlamConfig, FlamHead, build_model
from flam_core.model.mga_clap import (
    LocalityAwareBlock,
    ModalitySharedCodebook,
    local_attention_mask,
    sparsemax,
)
from flam_core.train import build_loss, build_teacher
from tests.conftest import smoke_params

# ----------------------------------------------------------------------------- sparsemax


def test_sparsemax_by_hand():
    # sorted z = 1, 0.8, 0.1, -1: k = 1 (2 > 1) and k = 2 (2.6 > 1.8) are in the support,
    # k = 3 is not (1.3 < 1.9); tau = (1.8 - 1) / 2 = 0.4, so p = (0.6, 0.4, 0, 0)
    p = sparsemax(torch.tensor([[0.1, 1.0, -1.0, 0.8]]))
    assert torch.allclose(p, torch.tensor([[0.0, 0.6, 0.0, 0.4]]), atol=1e-6)
    # equal logits: uniform; one far ahead: one-hot; any shift: the same weights
    assert torch.allclose(sparsemax(torch.zeros(1, 4)), torch.full((1, 4), 0.25))
    assert torch.equal(sparsemax(torch.tensor([[5.0, 2.0, 1.0]])), torch.tensor([[1.0, 0.0, 0.0]]))
    z = torch.randn(6, 50)
    assert torch.allclose(sparsemax(z), sparsemax(z + 3.0), atol=1e-6)
    assert torch.allclose(sparsemax(z).sum(-1), torch.ones(6), atol=1e-5)
    assert torch.allclose(sparsemax(z.T, dim=0), sparsemax(z).T)


def test_sparsemax_gradient_is_the_projection_jacobian():
    # on the support S the Jacobian is I - 1 1^T / |S|, zero off it: dp_1/dz = (0, 0.5, 0, -0.5)
    z = torch.tensor([[0.1, 1.0, -1.0, 0.8]], requires_grad=True)
    sparsemax(z)[0, 1].backward()
    assert torch.allclose(z.grad, torch.tensor([[0.0, 0.5, 0.0, -0.5]]))


# ----------------------------------------------------------------------------- codebook


def _axis_codebook() -> ModalitySharedCodebook:
    """Three codewords of norm 2 along the first three axes of D = 4 (sqrt(D) = 2), temperature
    1: a token's scaled affinity to codeword m is its m-th coordinate."""
    codebook = ModalitySharedCodebook(size=3, dim=4, temperature=1.0)
    with torch.no_grad():
        codebook.codewords.copy_(2 * torch.eye(3, 4))
    return codebook


def test_codebook_weights_are_sparsemax_of_the_max_pooled_affinities():
    codebook = _axis_codebook()
    # one token with affinities (1, 0.8, 0.1): weights (0.6, 0.4, 0), exactly two codewords
    one = codebook.weights(torch.tensor([[[1.0, 0.8, 0.1, 5.0]]]))
    assert torch.allclose(one, torch.tensor([[0.6, 0.4, 0.0]]), atol=1e-6)
    assert int((one > 0).sum()) == 2
    # two frames, each holding part of it: max-pooling over frames gives the same affinities
    two = codebook.weights(torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 0.8, 0.1, -3.0]]]))
    assert torch.allclose(two, one, atol=1e-6)
    # the embedding: 0.6 c0 + 0.4 c1 = (1.2, 0.8, 0, 0), unit norm
    expected = torch.tensor([[1.2, 0.8, 0.0, 0.0]]) / math.sqrt(1.2**2 + 0.8**2)
    assert torch.allclose(codebook(torch.tensor([[[1.0, 0.8, 0.1, 5.0]]])), expected, atol=1e-6)


def test_a_codeword_maps_to_itself():
    torch.manual_seed(0)
    codebook = ModalitySharedCodebook(size=64, dim=32, temperature=0.01)
    words = codebook.codewords.detach()
    weights = codebook.weights(words[:, None, :])  # each codeword as a one-token sequence
    assert torch.equal(weights, torch.eye(64))
    assert torch.allclose(codebook(words[:, None, :]), F.normalize(words, dim=-1), atol=1e-6)


def test_the_temperature_sets_how_many_codewords_mix():
    torch.manual_seed(0)
    tokens = torch.randn(4, 8, 32)
    counts = []
    for temperature in (0.1, 1.0, 10.0, 1000.0):
        codebook = ModalitySharedCodebook(size=256, dim=32, temperature=temperature)
        with torch.no_grad():
            codebook.codewords.copy_(torch.randn(256, 32, generator=torch.Generator().manual_seed(1)))
        counts.append(float((codebook.weights(tokens) > 0).sum(-1).float().mean()))
    assert counts == sorted(counts) and counts[0] < 5 and counts[-1] > 100


def test_codebook_rejects_bad_shapes_and_settings():
    with pytest.raises(DataError, match=r"\[B, T, D=4\]"):
        _axis_codebook().weights(torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="temperature"):
        ModalitySharedCodebook(size=8, dim=4, temperature=0.0)


# ----------------------------------------------------------------------------- locality-aware block


def test_window_mask_by_hand():
    assert torch.equal(local_attention_mask(4, 0), torch.eye(4, dtype=torch.bool))
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1],
            [0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(local_attention_mask(5, 1), expected)
    assert local_attention_mask(5, 4).all()
    with pytest.raises(ConfigError, match="window"):
        local_attention_mask(5, -1)


def test_locality_aware_block_sees_only_its_window():
    torch.manual_seed(0)
    block = LocalityAwareBlock(width=8, heads=2, window=1, dropout=0.0).eval()
    x = torch.randn(1, 7, 8)
    moved = x.clone()
    moved[0, 5] = torch.randn(8)  # change frame 5 only
    changed = (block(moved) - block(x)).abs().amax(dim=-1)[0] > 1e-6
    assert changed.tolist() == [False, False, False, False, True, True, True]  # frames 4, 5, 6
    # no feed-forward network in the block
    assert not any("linear" in name for name, _ in block.named_parameters())


def test_window_zero_is_the_value_path():
    """Each frame attends to itself alone: the attention is the value projection of the frame
    (the public code's output of its last block), then `x + LN(x)` in place of the FFN."""
    torch.manual_seed(0)
    block = LocalityAwareBlock(width=8, heads=2, window=0, dropout=0.0).eval()
    x = torch.randn(2, 5, 8)
    attn = block.attention
    w_v, b_v = attn.in_proj_weight[16:], attn.in_proj_bias[16:]
    value = F.linear(block.norm1(x), w_v, b_v)
    y = x + attn.out_proj(value)
    assert torch.allclose(block(x), y + block.norm2(y), atol=1e-5)


# ----------------------------------------------------------------------------- hard negatives

# Logits whose every row and column holds 2 (the positive, on the diagonal), 1 and 0. With
# beta = ln 3, exp(beta * 1) = 3 and exp(beta * 0) = 1: the negative at 1 weighs 2 * 3 / 4 = 1.5
# and the one at 0 weighs 2 * 1 / 4 = 0.5 (two negatives, weights averaging 1).
LOGITS = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0]])
WEIGHTS = torch.tensor([[1.0, 1.5, 0.5], [0.5, 1.0, 1.5], [1.5, 0.5, 1.0]])
EYE = torch.eye(3, dtype=torch.bool)


def test_hard_negative_weights_by_hand():
    assert torch.allclose(hard_negative_weights(LOGITS, EYE, math.log(3.0), dim=1), WEIGHTS)
    assert torch.allclose(hard_negative_weights(LOGITS, EYE, math.log(3.0), dim=0), WEIGHTS)
    assert torch.allclose(hard_negative_weights(LOGITS, EYE, 0.0), torch.ones(3, 3))
    # two positives in row 0: its single negative weighs 1 whatever its logit
    two = EYE.clone()
    two[0, 1] = True
    assert torch.allclose(hard_negative_weights(LOGITS, two, math.log(3.0))[0], torch.ones(3))


def _as_embeddings(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Audio rows e_i and text rows with <a_i, t_k> = logits[i, k] (logit scale 1)."""
    return torch.eye(3), logits.T.clone()


def test_hard_negative_loss_by_hand():
    audio, text = _as_embeddings(LOGITS)
    mask, scale = torch.ones(3, dtype=torch.bool), torch.tensor(1.0)
    # every row and column alike: -(2 - log(e^2 + 1.5 e + 0.5)) = 0.48216
    loss = hard_negative_clip_loss(audio, text, EYE, mask, scale, strength=math.log(3.0))
    assert loss.item() == pytest.approx(-(2 - math.log(math.exp(2) + 1.5 * math.e + 0.5)), abs=1e-6)
    # beta = 0: plain InfoNCE, -(2 - log(e^2 + e + 1)) = 0.40761
    plain = hard_negative_clip_loss(audio, text, EYE, mask, scale, strength=0.0)
    assert plain.item() == pytest.approx(-(2 - math.log(math.exp(2) + math.e + 1)), abs=1e-6)


def test_with_strength_zero_the_loss_is_clip_loss():
    torch.manual_seed(0)
    audio = F.normalize(torch.randn(6, 16), dim=-1)
    text = F.normalize(torch.randn(9, 16), dim=-1)
    positives = torch.rand(6, 9) < 0.3
    positives[torch.arange(6), torch.arange(6)] = True
    mask = torch.ones(9, dtype=torch.bool)
    mask[7:] = False
    scale = torch.tensor(14.3)
    expected = clip_loss(audio, text, positives, mask, scale)
    plain = hard_negative_clip_loss(audio, text, positives, mask, scale, 0.0)
    assert torch.allclose(plain, expected, atol=1e-6)
    assert not torch.allclose(hard_negative_clip_loss(audio, text, positives, mask, scale, 0.15), expected)


def test_hard_negative_loss_gradients_and_padding():
    torch.manual_seed(0)
    audio = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(6, 8), dim=-1)
    text[5] = float("nan")  # a padded slot may hold anything
    text.requires_grad_()
    positives = torch.zeros(4, 6, dtype=torch.bool)
    positives[torch.arange(4), torch.arange(4)] = True
    positives[0, :] = True  # an audio every text describes: no negative in its row
    mask = torch.tensor([True] * 5 + [False])
    theta = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss = hard_negative_clip_loss(audio, text, positives, mask, theta.exp(), strength=0.15)
    loss.backward()
    assert torch.isfinite(loss)
    for grad in (audio.grad, text.grad[:5], theta.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.equal(text.grad[5], torch.zeros(8))


def test_hard_negative_loss_checks_its_inputs():
    audio, text = _as_embeddings(LOGITS)
    mask, scale = torch.ones(3, dtype=torch.bool), torch.tensor(1.0)
    with pytest.raises(LossInputError, match="positives must be bool"):
        hard_negative_clip_loss(audio, text, EYE.float(), mask, scale)
    with pytest.raises(LossInputError, match=">= 0"):
        hard_negative_clip_loss(audio, text, EYE, mask, scale, strength=-1.0)
    with pytest.raises(LossInputError, match="audio_emb must be"):
        hard_negative_clip_loss(audio[:, :2], text, EYE, mask, scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hard_negative_clip_loss(audio.bfloat16(), text.bfloat16(), EYE, mask, scale)
    assert out.dtype == torch.float32


# ----------------------------------------------------------------------------- the model


def test_mga_clap_mode_builds_the_baseline_and_its_loss():
    params = smoke_params("train.mode=mga_clap")
    model = build_model(params, audio_dim=16)
    head = model.head
    assert head.config.architecture == "mga_clap" and head.codebook is not None
    assert head.codebook.codewords.shape == (params.model.mga_codebook_size, params.model.embed_dim)
    assert isinstance(head.context[-1], LocalityAwareBlock)
    loss = build_loss(params)
    assert loss.mode == "mga_clap" and loss.hard_negative_strength == params.train.mga_hard_negative_beta
    assert build_teacher(params, None) is None  # no frame term to teach
    # FLAM keeps its head: no codebook, its own context block
    flam = build_model(smoke_params(), audio_dim=16).head
    assert flam.codebook is None and not any(isinstance(m, LocalityAwareBlock) for m in flam.modules())


def test_mga_clap_embeddings_and_gradients():
    torch.manual_seed(0)
    head = FlamHead(
        FlamConfig(audio_dim=16, text_dim=8, embed_dim=8, architecture="mga_clap", codebook_size=32)
    )
    frames = head.contextualise(torch.randn(3, 6, 16))
    text_features = torch.randn(5, 8)
    global_emb, text_emb = head.global_embedding(frames), head.text_embeddings(text_features)
    frame_emb = head.frame_embeddings(frames)
    for emb in (global_emb, text_emb, frame_emb):
        assert torch.allclose(emb.norm(dim=-1), torch.ones(emb.shape[:-1]), atol=1e-5)
    # global and text embeddings: codebook mixtures; frames: their projections (the paper's
    # SED scores compare those with the text's codebook embedding)
    assert torch.allclose(global_emb, head.codebook(head.audio_proj(frames)))
    assert torch.allclose(text_emb, head.codebook(head.text_proj(text_features)[:, None]))
    assert torch.allclose(frame_emb, F.normalize(head.audio_proj(frames), dim=-1))
    positives = torch.zeros(3, 5, dtype=torch.bool)
    positives[[0, 1, 2, 2], [0, 1, 2, 3]] = True
    labels = positives[:, :, None].expand(3, 5, 6).clone()
    loss = FlamLoss(mode="mga_clap", w_clip=1.0)(
        audio_emb=global_emb,
        text_emb=text_emb,
        labels=labels,
        text_mask=torch.ones(5, dtype=torch.bool),
        logit_scale=head.logit_scale[0].exp(),
    )
    assert set(loss) == {"loss", "clip"}
    loss["loss"].backward()
    for name in ("codebook.codewords", "audio_proj.0.weight", "text_proj.0.weight", "context.1.norm1.weight"):
        grad = dict(head.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert head.alpha_mlp[0].weight.grad is None  # scale and bias are never trained, as FLAM-Global's


@pytest.fixture(scope="module")
def mga_clap_model(smoke_features, tmp_path_factory):
    """MGA-CLAP trained as the smoke FLAM-Global of `smoke_models` (40 steps): its folder."""
    from flam_core.train import train

    folder = tmp_path_factory.mktemp("mga") / "mga_clap"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder.parent / 'runs.db'}")
        train(
            smoke_params("train.mode=mga_clap", "train.steps=40"),
            features_dir=smoke_features,
            out_dir=folder,
            report_dir=folder.parent / "reports",
        )
    return folder


def test_trained_model_saves_loads_and_scores_frames(mga_clap_model, smoke_features, tmp_path):
    from flam_core.evaluation.frames import event_vocabulary, vocabulary_scores
    from flam_core.features import FeatureCache
    from flam_core.model.folder import load_model, save_model

    model, params, _ = load_model(mga_clap_model)
    assert params.train.mode == "mga_clap" and model.head.codebook is not None
    loss_log = (mga_clap_model.parent / "reports" / "loss.csv").read_text().splitlines()
    assert loss_log[0].split(",") == ["step", "lr", "loss", "clip"]  # its clip term only
    save_model(tmp_path, model, params)  # written again: the same tensors come back
    again, _, _ = load_model(tmp_path)
    a, b = model.head.state_dict(), again.head.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    cache = FeatureCache(smoke_features, "test_unseen")
    vocabulary = event_vocabulary(cache)
    scores = vocabulary_scores(model, cache, vocabulary)
    assert scores.shape == (len(cache), len(vocabulary), cache.features.shape[1])
    assert np.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()
    # per prompt, an increasing function of the frame-text cosine (what AUROC and PSDS read)
    head = model.head
    with torch.no_grad():
        frames = head.frame_embeddings(
            head.contextualise(torch.from_numpy(np.asarray(cache.features[:4], np.float32)))
        )
        cos = torch.einsum("bld,kd->bkl", frames, head.text_embeddings(model.text_encoder(vocabulary)))
    for k in range(len(vocabulary)):
        order = np.argsort(cos[:, k].numpy().ravel(), kind="stable")
        assert (np.diff(scores[:4, k].ravel()[order]) >= -1e-7).all()


def test_detector_runs_the_trained_model(mga_clap_model):
    from flam_core.inference import FlamDetector

    detector = FlamDetector.from_dir(mga_clap_model)
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(detector.sample_rate * 4)).astype(np.float32)
    result = detector.detect(audio, ["a dog barks", "rain"], sample_rate=detector.sample_rate)
    assert result.probs.shape[0] == 2 and np.isfinite(result.probs).all()


# Retrieval over every held-out smoke mixture (val, val_unseen, test_seen, test_unseen: 64
# caption-audio pairs); the mean of R@1, R@5 and R@10 in both directions. Chance: (1 + 5 + 10)
# / 3 / 64 = 0.083. Tolerance: 0.06, about two standard errors of such a mean over 64 pairs
# (one recall's binomial error at 0.15 is 0.045; the six are positively correlated), and 3-4
# times the seed spread of either model at this budget (0.013 for FLAM-Global, 0.018 for
# MGA-CLAP between seeds 0 and 1, measured when this test was written).
RETRIEVAL_SPLITS = ("val", "val_unseen", "test_seen", "test_unseen")
CHANCE_MEAN_RECALL = (1 + 5 + 10) / 3 / 64
TOLERANCE = 0.06


@pytest.mark.slow
def test_clip_retrieval_matches_flam_global_within_noise(smoke_features, tmp_path, monkeypatch):
    """Trained alike (same features, texts, 200 steps, seed 0), MGA-CLAP retrieves as FLAM-Global
    does within noise, both well above chance: a weak MGA-CLAP on frames cannot be a broken
    clip-level model."""
    from types import SimpleNamespace

    from flam_core.evaluation.report import clip_retrieval
    from flam_core.features import FeatureCache
    from flam_core.model.folder import load_model
    from flam_core.train import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'runs.db'}")
    splits = [SimpleNamespace(cache=FeatureCache(smoke_features, name)) for name in RETRIEVAL_SPLITS]
    mean_recall = {}
    for mode in ("global", "mga_clap"):
        params = smoke_params(f"train.mode={mode}", "train.steps=200", "train.seed=0")
        train(params, features_dir=smoke_features, out_dir=tmp_path / mode, report_dir=tmp_path / f"{mode}-r")
        model, _, _ = load_model(tmp_path / mode)
        metrics = clip_retrieval(model, splits, caption_events=3)
        assert metrics["n_pairs"] == 64
        mean_recall[mode] = np.mean([metrics[f"{d}_R@{k}"] for d in ("t2a", "a2t") for k in (1, 5, 10)])
    assert min(mean_recall.values()) > 1.4 * CHANCE_MEAN_RECALL, mean_recall
    assert abs(mean_recall["mga_clap"] - mean_recall["global"]) <= TOLERANCE, mean_recall


@pytest.mark.slow
def test_evaluation_carries_mga_clap_everywhere(
    mga_clap_model, smoke_models, smoke_features, smoke_library, smoke_recipes, real_set, tmp_path
):
    """`evaluate` with MGA-CLAP among the baselines: its SED, retrieval and zero-shot results,
    the real-recording test, moment retrieval, the near/far split, the ordering claim and a
    row of results.md under its name."""
    from flam_core.evaluation.report import evaluate

    models = tmp_path / "models"
    models.mkdir()
    for mode, folder in (("flam", smoke_models / "flam"), ("global", smoke_models / "global")):
        (models / mode).symlink_to(folder, target_is_directory=True)
    (models / "mga_clap").symlink_to(mga_clap_model, target_is_directory=True)
    result = evaluate(
        smoke_params("evaluation.baselines=[flam, global, mga_clap]"),
        models_dir=models,
        features_dir=smoke_features,
        library_dir=smoke_library[0],
        recipes_dir=smoke_recipes[0],
        out_dir=tmp_path / "eval",
        real_dir=real_set[0],
    )
    mga = result.models["mga_clap"]
    assert mga["threshold_source"] == "validation"
    for split in ("test_unseen", "test_seen"):
        assert 0 <= mga[split]["frame_auroc_macro"] <= 1 and 0 <= mga[split]["psds1_alpha_st0"] <= 1
    assert mga["retrieval"]["n_pairs"] > 0 and "seen" in mga["zero_shot"]
    assert "mga_clap" in result.test_real and "mga_clap" in result.moment_retrieval["systems"]
    assert "mga_clap" in result.near_far["splits"]["test_unseen"]["frame_auroc_macro"]
    claims = result.claims
    assert claims["mga_clap_unseen_auroc_macro"] == mga["test_unseen"]["frame_auroc_macro"]
    assert claims["unseen_auroc_gain_over_mga_clap"] == pytest.approx(
        result.models["flam"]["test_unseen"]["frame_auroc_macro"] - mga["test_unseen"]["frame_auroc_macro"],
        abs=1e-4,
    )
    text = (tmp_path / "eval" / "results.md").read_text()
    assert text.count("| MGA-CLAP |") >= 10 and "MGA-CLAP between them" in text
