"""HTS-AT frame encoder: shapes on the paper's front end, training signal, time order, bf16, checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flam_core.audio.features import LogMel
from flam_core.config import FeatureParams
from flam_core.errors import ConfigError
from flam_core.model.htsat import HtsatEncoder, fold_spectrogram, htsat_config, unfold_tokens

SR = 48000
PAPER = FeatureParams(n_mels=64, win_s=1024 / 48000, hop_s=480 / 48000, f_min=50, f_max=14000)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared, loaded 2-core machine two threads run several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kwargs) -> HtsatEncoder:
    return HtsatEncoder(PAPER, SR, **{**htsat_config("tiny"), **kwargs})


def small(**kwargs) -> HtsatEncoder:
    """The tiny preset on a 128 x 128 image (8 frames per window, resampled to 32): 4x cheaper."""
    return tiny(spec_size=128, **kwargs)


def noise(*shape: int, seed: int = 0, scale: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_paper_front_end_uses_n_fft_1024_and_hop_480() -> None:
    mel = LogMel(PAPER, SR).mel
    assert (mel.n_fft, mel.win_length, mel.hop_length) == (1024, 1024, 480)
    assert LogMel(PAPER, SR)(noise(1, 10 * SR)).shape == (1, 64, 1001)


def test_output_frames_for_10_s_at_48k_and_16k_and_other_lengths() -> None:
    torch.manual_seed(0)
    model = tiny().eval()
    assert model.out_dim == 384
    assert [model.n_frames(s * SR) for s in (10, 25, 3)] == [32, 80, 10]
    with torch.no_grad():
        assert model(noise(2, 10 * SR)).shape == (2, 32, 384)
        assert model(noise(1, 25 * SR)).shape == (1, 80, 384)
        short = noise(1, 3 * SR)
        out = model(short)
        assert out.shape == (1, 10, 384)
        padded = model(F.pad(short, (0, 7 * SR)))  # a short clip is padded with silence, not stretched
        torch.testing.assert_close(out, padded[:, :10], atol=1e-4, rtol=1e-4)

    model_16k = HtsatEncoder(FeatureParams(), 16000, **htsat_config("tiny")).eval()
    assert model_16k.n_frames(160000) == 32
    with torch.no_grad():
        assert model_16k(noise(1, 160000)).shape == (1, 32, 384)


def test_base_preset_parameter_count_and_forward() -> None:
    torch.manual_seed(0)
    model = HtsatEncoder(PAPER, SR, **htsat_config("base")).eval()
    n_params = sum(p.numel() for p in model.parameters())
    # Swin-T trunk of HTS-AT; the paper's 31 M also counts its 527-class token-semantic head (~2.8 M).
    assert 27_000_000 <= n_params <= 28_500_000, n_params
    assert model.out_dim == 768
    with torch.no_grad():
        out = model(noise(1, 10 * SR))
    assert out.shape == (1, 32, 768)
    assert torch.isfinite(out).all()


def test_gradients_reach_patch_embedding_and_adam_step_lowers_loss() -> None:
    """The first optimiser step in a process imports torch._dynamo: most of this test's time."""
    torch.manual_seed(0)
    model = small(drop_path=0.0).train()
    x = noise(1, 10 * SR)
    target = torch.randn(1, 32, model.out_dim, generator=torch.Generator().manual_seed(1))

    def loss_fn() -> torch.Tensor:
        return F.mse_loss(model(x), target)

    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = loss_fn()
    loss.backward()
    grad = model.patch_embed.proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0

    optimiser.step()
    with torch.no_grad():
        after = loss_fn()
    assert after < loss.detach() * 0.99, (loss.item(), after.item())


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = small(drop_path=0.0).train()
    x = noise(1, 10 * SR)
    model(x).square().mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().mean().backward()
    for p, g in zip(model.parameters(), plain, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)


def test_fold_and_token_unfold_keep_time_order() -> None:
    ramp = torch.arange(1024.0).expand(1, 64, 1024)  # [B, F, T] with value = frame index
    image = fold_spectrogram(ramp, 4)
    assert image.shape == (1, 1, 256, 256)
    grid = F.avg_pool2d(image, 32)  # the encoder's total 32x downsampling to an 8x8 token grid
    frames = unfold_tokens(grid, 4)[0, :, 0]
    torch.testing.assert_close(frames, torch.arange(32.0) * 32 + 15.5)


def test_perturbing_the_first_second_changes_early_frames_most() -> None:
    torch.manual_seed(0)
    model = tiny().eval()
    clean = noise(1, 10 * SR, seed=2)
    perturbed = clean.clone()
    perturbed[:, :SR] = noise(1, SR, seed=3, scale=0.3)
    with torch.no_grad():
        out = model(torch.cat([clean, perturbed]))
    change = (out[0] - out[1]).norm(dim=-1)  # [32]; frame i covers [0.3125 i, 0.3125 (i + 1)) s
    assert change[:3].min() > 5 * change[16:].max(), change.tolist()


def test_bf16_autocast_and_bf16_weights_match_fp32() -> None:
    torch.manual_seed(0)
    model = small().eval()
    x = noise(1, 10 * SR)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(x)
        model.to(torch.bfloat16)
        assert model.front_end.mel.mel_scale.fb.dtype == torch.float32
        assert model.patch_embed.proj.weight.dtype == torch.bfloat16
        half = model(x)
    assert half.dtype == torch.bfloat16
    for out in (auto, half):
        assert torch.isfinite(out.float()).all()
        assert F.cosine_similarity(out.float(), ref, dim=-1).min() > 0.99


def test_checkpoint_round_trip_and_misfit(tmp_path) -> None:
    torch.manual_seed(0)
    model = small().eval()
    path = tmp_path / "htsat.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(1)
    loaded = small(checkpoint=str(path)).eval()
    x = noise(1, 10 * SR)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))

    state = model.state_dict()
    state.pop("norm.weight")
    state["head.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(ConfigError, match=r"bad\.pt") as err:
        small(checkpoint=bad)
    assert "norm.weight" in str(err.value) and "head.weight" in str(err.value)

    with pytest.raises(ConfigError, match=r"htsat\.pt does not fit.*shape mismatches \[layers"):
        small(embed_dim=32, checkpoint=path)
    with pytest.raises(ConfigError, match=r"missing\.pt does not exist"):
        small(checkpoint=tmp_path / "missing.pt")
