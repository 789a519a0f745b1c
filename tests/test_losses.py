"""FLAM losses: hand-computed values, chunked == naive, masking, modes, and 2-process gloo."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from flam_core.data.mixer import FrameLabels
from flam_core.losses import (
    FlamLoss,
    LossInputError,
    all_gather_with_grad,
    clip_loss,
    frame_logits,
    gather_texts,
    prior_loss,
    remote_labels,
    sed_loss,
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# B=1, K=2, L=2, D=2. Frames f0=(0.6, 0.8), f1=(1, 0); texts t0=(1, 0), t1=(0, 1):
# cos[k0] = [0.6, 1.0], cos[k1] = [0.8, 0.0]. alpha = [2, 1], beta = [-1, 0.5]:
# h[k0] = [0.2, 1.0], h[k1] = [1.3, 0.5]. Labels k0 = [1, 0], k1 = [0, 1]:
# z*h = [0.2, -1.0, -1.3, 0.5]; L_SED = 1/4 * sum softplus(-z*h).
SED_VALUE = (softplus(-0.2) + softplus(1.0) + softplus(1.3) + softplus(-0.5)) / 4  # 0.98162150
# dL/dh = -z * sigmoid(-z*h) / N; dL/dalpha_k = sum_l dL/dh * cos.
ALPHA_GRAD = (
    (-sigmoid(-0.2) * 0.6 + sigmoid(1.0) * 1.0) / 4,  # 0.11523974
    (sigmoid(1.3) * 0.8 - sigmoid(-0.5) * 0.0) / 4,  # 0.15716700
)


def hand_case(pad: bool = False) -> dict[str, torch.Tensor]:
    """The case above; with `pad`, a third, padded text slot holding NaN."""
    text = [[1.0, 0.0], [0.0, 1.0]] + ([[math.nan, math.nan]] if pad else [])
    return {
        "frame_emb": torch.tensor([[[0.6, 0.8], [1.0, 0.0]]], requires_grad=True),
        "text_emb": torch.tensor(text, requires_grad=True),
        "alpha": torch.tensor([2.0, 1.0] + ([math.nan] if pad else []), requires_grad=True),
        "beta": torch.tensor([-1.0, 0.5] + ([math.nan] if pad else []), requires_grad=True),
        "labels": torch.tensor([[[True, False], [False, True]] + ([[True, True]] if pad else [])]),
        "text_mask": torch.tensor([True, True] + ([False] if pad else [])),
    }


def random_case(b: int = 3, k: int = 10, n_frames: int = 5, d: int = 16, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(k, dtype=torch.bool)
    mask[[2, 7, 9]] = False  # padded slots, holding NaN
    text = F.normalize(torch.randn(k, d, generator=gen), dim=-1)
    text[~mask] = math.nan
    return {
        "frame_emb": F.normalize(torch.randn(b, n_frames, d, generator=gen), dim=-1).requires_grad_(),
        "text_emb": text.requires_grad_(),
        "alpha": (1 + 10 * torch.rand(k, generator=gen)).requires_grad_(),
        "beta": (torch.randn(k, generator=gen) - 2).requires_grad_(),
        "labels": torch.rand(b, k, n_frames, generator=gen) < 0.3,
        "text_mask": mask,
    }


def grads(case: dict, names: tuple[str, ...] = ("frame_emb", "text_emb", "alpha", "beta")) -> dict:
    out = {name: case[name].grad for name in names}
    for name in names:
        case[name].grad = None
    return out


def test_frame_logits_hand_values():
    case = hand_case()
    h = frame_logits(case["frame_emb"], case["text_emb"], case["alpha"], case["beta"])
    assert h.shape == (1, 2, 2) and h.dtype == torch.float32
    torch.testing.assert_close(h, torch.tensor([[[0.2, 1.0], [1.3, 0.5]]]))


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 5])
@pytest.mark.parametrize("pad", [False, True])
def test_sed_loss_hand_value_and_gradients(chunk_size, pad):
    case = hand_case(pad)
    loss = sed_loss(**case, chunk_size=chunk_size)
    assert loss.shape == () and loss.item() == pytest.approx(SED_VALUE, rel=1e-6)
    assert abs(SED_VALUE - 0.98162150) < 1e-8  # the literal, for the reader
    loss.backward()
    assert case["alpha"].grad[:2].tolist() == pytest.approx(ALPHA_GRAD, rel=1e-5)
    assert case["beta"].grad is None  # beta is detached inside L_SED
    if pad:  # the padded NaN slot is never touched
        assert case["alpha"].grad[2] == 0 and (case["text_emb"].grad[2] == 0).all()
        assert torch.isfinite(case["frame_emb"].grad).all()


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7, 64])
def test_chunked_equals_naive(chunk_size):
    case = random_case()
    naive = sed_loss(**case)
    naive.backward()
    expected = grads(case)
    chunked = sed_loss(**case, chunk_size=chunk_size)
    chunked.backward()
    got = grads(case)
    torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=0)
    for name in ("frame_emb", "text_emb", "alpha"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)
    assert got["beta"] is None and expected["beta"] is None
    padded = ~case["text_mask"]
    assert (got["text_emb"][padded] == 0).all() and (got["alpha"][padded] == 0).all()


def test_chunked_scales_by_grad_output_and_skips_grads_under_no_grad():
    case = random_case()
    (3 * sed_loss(**case)).backward()
    expected = grads(case)
    (3 * sed_loss(**case, chunk_size=4)).backward()
    got = grads(case)
    for name in ("frame_emb", "text_emb", "alpha"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        value = sed_loss(**case, chunk_size=4)
    assert value.grad_fn is None and value.item() == pytest.approx(sed_loss(**case).item(), rel=1e-5)


def test_prior_loss_hand_value_and_gradients():
    # B=2, K=2, L=2: text 0 positive in 3 of 4 frames (r=3/4), text 1 in 1 of 4 (r=1/4).
    labels = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 1]]], dtype=torch.bool)
    beta = torch.tensor([0.0, -1.0], requires_grad=True)
    loss = prior_loss(beta, labels, torch.tensor([True, True]))
    # -1/2 [3/4 log s(0) + 1/4 log s(0) + 1/4 log s(-1) + 3/4 log s(1)]
    expected = -0.5 * (math.log(0.5) - 0.25 * softplus(1.0) - 0.75 * softplus(-1.0))
    assert loss.item() == pytest.approx(expected, rel=1e-6) and expected == pytest.approx(0.62820443)
    loss.backward()
    # dL/dbeta_k = (sigmoid(beta_k) - r_k) / K
    assert beta.grad.tolist() == pytest.approx([(0.5 - 0.75) / 2, (sigmoid(-1.0) - 0.25) / 2], rel=1e-6)


def test_prior_loss_masks_texts_and_audios():
    case = random_case()
    beta, labels, mask = case["beta"].detach(), case["labels"], case["text_mask"]
    valid = mask.nonzero().flatten()
    full = prior_loss(beta, labels, mask)
    assert full.item() == pytest.approx(prior_loss(beta[valid], labels[:, valid], mask[valid]).item())
    audio_mask = torch.tensor([True, False, True])
    masked = prior_loss(beta, labels, mask, audio_mask=audio_mask)
    dropped = prior_loss(beta, labels[audio_mask], mask)
    assert masked.item() == pytest.approx(dropped.item(), rel=1e-6)


def standard_clip(audio: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    logits = scale * audio @ text.T
    target = torch.arange(len(audio))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def test_clip_loss_hand_values():
    # audio a0=(1, 0), a1=(0.6, 0.8); texts t0=(1, 0), t1=(0, 1); s=1: logits [[1, 0], [0.6, 0.8]].
    audio = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask, scale = torch.tensor([True, True]), torch.tensor(1.0)
    eye = clip_loss(audio, text, torch.eye(2, dtype=torch.bool), mask, scale)
    # a->t: softplus(-1), softplus(-0.2); t->a: softplus(-0.4), softplus(-0.8)
    expected_eye = 0.5 * ((softplus(-1) + softplus(-0.2)) / 2 + (softplus(-0.4) + softplus(-0.8)) / 2)
    assert eye.item() == pytest.approx(expected_eye, rel=1e-6) and expected_eye == pytest.approx(0.44887912)
    # a0 has both texts as positives: a->t row 0 = mean(softplus(-1), softplus(1));
    # t1 has both audios: t->a column 1 = mean(softplus(0.8), softplus(-0.8)).
    multi = clip_loss(audio, text, torch.tensor([[True, True], [False, True]]), mask, scale)
    a2t = (0.5 * (softplus(-1) + softplus(1)) + softplus(-0.2)) / 2
    t2a = (softplus(-0.4) + 0.5 * (softplus(0.8) + softplus(-0.8))) / 2
    assert multi.item() == pytest.approx((a2t + t2a) / 2, rel=1e-6)
    assert (a2t + t2a) / 2 == pytest.approx(0.67387912)


def test_clip_loss_with_eye_positives_is_standard_clip():
    gen = torch.Generator().manual_seed(1)
    audio = F.normalize(torch.randn(6, 32, generator=gen), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(8, 32, generator=gen), dim=-1)
    text[6:] = math.nan  # two padded slots
    text.requires_grad_()
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    mask = torch.arange(8) < 6
    positives = torch.zeros(6, 8, dtype=torch.bool)
    positives[:, :6] = torch.eye(6, dtype=torch.bool)
    loss = clip_loss(audio, text, positives, mask, scale)
    loss.backward()
    got = (audio.grad, text.grad[:6], scale.grad)
    assert (text.grad[6:] == 0).all()
    audio.grad = text.grad = scale.grad = None
    reference = standard_clip(audio, text[:6], scale)
    reference.backward()
    torch.testing.assert_close(loss, reference)
    for a, b in zip(got, (audio.grad, text.grad[:6], scale.grad), strict=True):
        torch.testing.assert_close(a, b)


def flam_inputs(seed: int = 0) -> dict:
    case = random_case(seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    case["audio_emb"] = F.normalize(torch.randn(3, 16, generator=gen), dim=-1).requires_grad_()
    case["logit_scale"] = torch.tensor(1 / 0.07, requires_grad=True)
    return case


def test_flam_loss_combines_terms_and_beta_learns_only_from_prior():
    case = flam_inputs()
    out = FlamLoss(chunk_size=4)(**case)
    assert set(out) == {"loss", "clip", "sed", "prior"}
    assert all(not out[name].requires_grad for name in ("clip", "sed", "prior"))
    expected = out["clip"] + 200 * out["sed"] + out["prior"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    out["loss"].backward()
    beta_grad = case["beta"].grad.clone()
    case["beta"].grad = None
    prior_loss(case["beta"], case["labels"], case["text_mask"]).backward()
    torch.testing.assert_close(beta_grad, case["beta"].grad)


def test_global_mode_ignores_frame_labels():
    case = flam_inputs()
    loss = FlamLoss(mode="global")
    out = loss(**case)
    assert set(out) == {"loss", "clip"}
    # The same clip-level positives, frames shuffled: the global loss cannot see frames.
    shuffled = case["labels"].any(-1, keepdim=True).expand_as(case["labels"]).clone()
    moved = loss(**{**case, "labels": shuffled, "frame_emb": None, "alpha": None, "beta": None})
    assert moved["loss"].item() == out["loss"].item()
    out["loss"].backward()
    assert case["frame_emb"].grad is None and case["beta"].grad is None and case["alpha"].grad is None


def test_frame_mode_has_no_clip_term():
    case = flam_inputs()
    out = FlamLoss(mode="frame", w_sed=2.0)(**{**case, "audio_emb": None, "logit_scale": None})
    assert set(out) == {"loss", "sed", "prior"}
    assert out["loss"].item() == pytest.approx((2 * out["sed"] + out["prior"]).item(), rel=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_bf16_autocast_computes_in_float32(chunk_size):
    case = random_case()
    reference = sed_loss(**case, chunk_size=chunk_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = sed_loss(**case, chunk_size=chunk_size)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference)
    bf16 = {
        k: v.detach().bfloat16().requires_grad_() if v.is_floating_point() else v for k, v in case.items()
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sed_loss(**bf16, chunk_size=chunk_size)
    loss.backward()
    assert loss.dtype == torch.float32 and bf16["frame_emb"].grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(reference.item(), rel=2e-2)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_non_finite_valid_input_gives_non_finite_loss_without_raising(chunk_size):
    case = random_case()
    with torch.no_grad():
        case["frame_emb"][0, 0, 0] = math.nan
    assert torch.isnan(sed_loss(**case, chunk_size=chunk_size))
    case = flam_inputs()
    out = FlamLoss()(**{**case, "logit_scale": torch.tensor(math.inf)})
    assert not torch.isfinite(out["loss"])  # the trainer checks and skips the step


def test_no_valid_text_gives_zero_loss_with_graph():
    case = random_case()
    case["text_mask"] = torch.zeros_like(case["text_mask"])
    for chunk_size in (None, 4):
        loss = sed_loss(**case, chunk_size=chunk_size)
        assert loss.item() == 0
        loss.backward()
    assert prior_loss(case["beta"], case["labels"], case["text_mask"]).item() == 0


def test_shape_errors_are_explicit():
    case = random_case()
    with pytest.raises(LossInputError, match="labels must be"):
        sed_loss(**{**case, "labels": case["labels"][:, :4]})
    with pytest.raises(LossInputError, match="chunk_size"):
        sed_loss(**case, chunk_size=0)
    with pytest.raises(LossInputError, match="mode"):
        FlamLoss(mode="local")  # type: ignore[arg-type]


def test_remote_labels_by_label_identity():
    ones, none = np.ones(3, dtype=bool), np.zeros(3, dtype=bool)
    local = [
        FrameLabels(
            labels=("dog", "rain"),
            captions=("a dog barks", "rain"),
            is_event=np.array([True, False]),
            frames=np.array([[1, 0, 0], [1, 1, 1]], dtype=bool),
        ),
        {"car": np.array([0, 1, 1], dtype=bool)},
    ]
    # Gathered texts: local "car", remote "dog" (another rank's caption), remote "rain", padding.
    out = remote_labels(local, ["car", "dog", "rain", ""])
    assert out.shape == (2, 4, 3) and out.dtype == torch.bool
    np.testing.assert_array_equal(out[0].numpy(), [none, [1, 0, 0], ones, none])
    np.testing.assert_array_equal(out[1].numpy(), [[0, 1, 1], none, none, none])
    with pytest.raises(LossInputError, match="n_frames"):
        remote_labels([{}], ["dog"])
    assert remote_labels([{}], ["dog"], n_frames=3).shape == (1, 1, 3)


def test_gather_texts_without_process_group_is_identity():
    case = random_case()
    labels = [f"l{k}" if m else "" for k, m in enumerate(case["text_mask"].tolist())]
    out = gather_texts(case["text_emb"], case["alpha"], case["beta"], labels)
    assert out.text_emb is case["text_emb"] and out.text_labels == labels
    assert out.text_mask.tolist() == case["text_mask"].tolist()
    assert all_gather_with_grad(case["alpha"]) is case["alpha"]


# ----------------------------------------------------------------------------- 2 processes, gloo

WORLD, B_LOCAL, K_LOCAL, N_FRAMES, DIM = 2, 2, 4, 4, 8
MIXTURES = [  # the global batch: rank r holds mixtures 2r, 2r+1
    {"dog": [1, 1, 0, 0], "rain": [1, 1, 1, 1]},
    {"car": [0, 1, 1, 0], "rain": [1, 1, 1, 1]},
    {"dog": [0, 0, 1, 1], "bird": [1, 0, 0, 1]},
    {"siren": [0, 1, 1, 1], "wind": [1, 1, 1, 1]},
]
# Each rank's padded text buffer; "dog" is named on both ranks (two captions), so rank 1's
# "dog" text is a positive in rank 0's mixture 0, and rank 0's "rain" in its own mixture 1.
TEXT_LABELS = [["dog", "car", "rain", ""], ["dog", "bird", "siren", ""]]


def global_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    k = WORLD * K_LOCAL
    text = F.normalize(torch.randn(k, DIM, generator=gen), dim=-1)
    text[K_LOCAL - 1 :: K_LOCAL] = math.nan  # padded slots
    return {
        "frame_emb": F.normalize(torch.randn(WORLD * B_LOCAL, N_FRAMES, DIM, generator=gen), dim=-1),
        "audio_emb": F.normalize(torch.randn(WORLD * B_LOCAL, DIM, generator=gen), dim=-1),
        "text_emb": text,
        "alpha": 1 + 10 * torch.rand(k, generator=gen),
        "beta": torch.randn(k, generator=gen) - 1,
        "logit_scale": torch.tensor(10.0),
    }


LEAVES = ("frame_emb", "audio_emb", "text_emb", "alpha", "beta", "logit_scale")
LOSS = {"w_sed": 200.0, "w_prior": 1.0, "w_clip": 1.0}


def _dist_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        full = global_inputs()
        audios = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        texts = slice(rank * K_LOCAL, (rank + 1) * K_LOCAL)
        local = {
            "frame_emb": full["frame_emb"][audios],
            "audio_emb": full["audio_emb"][audios],
            "text_emb": full["text_emb"][texts],
            "alpha": full["alpha"][texts],
            "beta": full["beta"][texts],
            "logit_scale": full["logit_scale"],
        }
        local = {name: value.clone().requires_grad_() for name, value in local.items()}
        gathered = gather_texts(local["text_emb"], local["alpha"], local["beta"], TEXT_LABELS[rank])
        labels = remote_labels(MIXTURES[audios], gathered.text_labels)  # [B_local, K_total, L]
        # Global CLIP: every rank scores the whole gathered batch (small: [B_total, D]).
        positives = all_gather_with_grad(labels.any(-1).to(torch.uint8)).bool()
        out = FlamLoss(chunk_size=3, **LOSS)(
            frame_emb=local["frame_emb"],
            audio_emb=all_gather_with_grad(local["audio_emb"]),
            positives=positives,
            text_emb=gathered.text_emb,
            alpha=gathered.alpha,
            beta=gathered.beta,
            labels=labels,
            text_mask=gathered.text_mask,
            logit_scale=local["logit_scale"],
        )
        out["loss"].backward()
        torch.save(
            {"loss": out["loss"].detach(), "grads": {name: local[name].grad for name in LEAVES}},
            Path(out_dir) / f"rank{rank}.pt",
        )
        # No rank tears its connections down while its peer may still be reading from them.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process(tmp_path):
    mp.spawn(_dist_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    full = {name: value.clone().requires_grad_() for name, value in global_inputs().items()}
    text_labels = TEXT_LABELS[0] + TEXT_LABELS[1]
    labels = remote_labels(MIXTURES, text_labels)
    assert labels[0, text_labels.index("dog", K_LOCAL)].tolist() == [True, True, False, False]
    reference = FlamLoss(**LOSS)(
        labels=labels, text_mask=torch.tensor([bool(t) for t in text_labels]), **full
    )
    reference["loss"].backward()

    # The distributed objective is the mean of the rank losses (what DDP's averaging optimises).
    mean_loss = sum(r["loss"] for r in ranks) / WORLD
    torch.testing.assert_close(mean_loss, reference["loss"].detach(), rtol=1e-5, atol=0)
    # Gradient of that mean w.r.t. each rank's own shard = the rank's local gradient / W.
    for rank, result in enumerate(ranks):
        audios = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        texts = slice(rank * K_LOCAL, (rank + 1) * K_LOCAL)
        shard = {"frame_emb": audios, "audio_emb": audios, "text_emb": texts, "alpha": texts, "beta": texts}
        for name, rows in shard.items():
            expected = full[name].grad[rows]
            torch.testing.assert_close(result["grads"][name] / WORLD, expected, rtol=1e-5, atol=1e-7)
    scale_grad = sum(r["grads"]["logit_scale"] for r in ranks) / WORLD
    torch.testing.assert_close(scale_grad, full["logit_scale"].grad, rtol=1e-5, atol=1e-7)
