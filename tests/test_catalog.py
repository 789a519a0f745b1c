import fnmatch
import gzip
import importlib.util
import itertools
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from flam_core.config import DEBIAN_PACKAGES, MidiParams, Params, ProceduralParams, UserFolder
from flam_core.data.catalog.base import RawClip
from flam_core.data.catalog.debian import (
    AUDIO_SUFFIXES,
    MappingRule,
    PackageMapping,
    c4group_files,
    is_c4group,
    is_openttd_catalogue,
    load_mapping,
    map_files,
    qt_resources,
    unpack_c4group,
    unpack_openttd_catalogue,
    unpack_qt_resources,
    unpack_zip,
)
from flam_core.data.catalog.folder import folder_clips
from flam_core.data.catalog.midi import GM_SOUNDS, plan_slots
from flam_core.data.catalog.procedural import coloured_noise, procedural_clips
from flam_core.errors import DataError
from tests.conftest import ROOT


def mapping(**kwargs) -> PackageMapping:
    rules = (
        MappingRule(pattern="Animal/Dog*.wav", label="dog barking"),
        MappingRule(pattern="Animal/*", label="animal"),
        MappingRule(pattern="speech/*", label="a person speaking", sample=2),
    )
    return PackageMapping(package="pkg", licence="CC0", root=".", clips=rules, exclude=("Loops/*",), **kwargs)


def test_first_matching_rule_wins_and_every_file_is_accounted_for():
    files = ["Animal/Dog1.wav", "Animal/Dog2.wav", "Animal/Cat.wav", "Loops/a.wav", "Other/x.wav"]
    files += [f"speech/s{i}.ogg" for i in range(5)]
    selected, report = map_files(mapping(), files, seed=1)
    labels = dict(selected)
    assert labels["Animal/Dog1.wav"].label == "dog barking"
    assert labels["Animal/Cat.wav"].label == "animal"
    assert report.excluded == 1 and report.unmapped == 1 and report.unmapped_examples == ["Other/x.wav"]
    assert report.mapped == 5 and report.sampled_out == 3
    assert report.mapped + report.excluded + report.unmapped + report.sampled_out == len(files)


def test_sampling_is_seeded():
    files = [f"speech/s{i}.ogg" for i in range(20)]
    first = [rel for rel, _ in map_files(mapping(), files, seed=1)[0]]
    again = [rel for rel, _ in map_files(mapping(), files, seed=1)[0]]
    other = [rel for rel, _ in map_files(mapping(), files, seed=2)[0]]
    assert first == again and len(first) == 2
    assert first != other


@pytest.mark.parametrize("package", DEBIAN_PACKAGES)
def test_every_debian_package_has_a_valid_reviewed_mapping(package):
    mapping = load_mapping(package)
    assert mapping.clips, package
    for rule in mapping.clips:
        assert rule.label == rule.label.strip().lower(), rule.label
        assert not any(ch.isdigit() for ch in rule.label), rule.label
        assert 1 <= len(rule.label.split()) <= 7, rule.label


def test_mapping_file_errors_name_the_file(tmp_path):
    (tmp_path / "pkg.yaml").write_text(
        "package: pkg\nlicence: x\nroot: .\nclips: [{pattern: '*', labl: x}]\n"
    )
    with pytest.raises(DataError, match=r"pkg.yaml: invalid mapping file"):
        load_mapping("pkg", tmp_path)
    with pytest.raises(DataError, match="no label mapping"):
        load_mapping("missing", tmp_path)


def qt_resource_bundle(files: dict[str, tuple[bytes, bool]]) -> bytes:
    """A version-2 Qt rcc bundle with one folder `res` holding `files` (name -> (data, compress))."""
    names, data, entries = b"", b"", []

    def add_name(name: str) -> int:
        nonlocal names
        offset = len(names)
        names += struct.pack(">HI", len(name), 0) + name.encode("utf-16-be")
        return offset

    root_name, res_name = add_name(""), add_name("res")
    entries.append(struct.pack(">IHII", root_name, 2, 1, 1) + bytes(8))  # root: 1 child at index 1
    entries.append(struct.pack(">IHII", res_name, 2, len(files), 2) + bytes(8))
    for name, (payload, compress) in files.items():
        stored = struct.pack(">I", len(payload)) + zlib.compress(payload) if compress else payload
        entries.append(
            struct.pack(">IHHHI", add_name(name), 1 if compress else 0, 0, 0, len(data)) + bytes(8)
        )
        data += struct.pack(">I", len(stored)) + stored
    tree = b"".join(entries)
    header_size = 20
    tree_at, data_at = header_size, header_size + len(tree)
    return b"qres" + struct.pack(">IIII", 2, tree_at, data_at, data_at + len(data)) + tree + data + names


def test_qt_resource_bundles_are_unpacked_to_their_audio(tmp_path):
    bundle = tmp_path / "activity.rcc"
    bundle.write_bytes(
        qt_resource_bundle(
            {"dog.ogg": (b"OggS-dog", True), "cat.wav": (b"RIFF-cat", False), "icon.svg": (b"<svg/>", True)}
        )
    )
    assert qt_resources(bundle) == {
        "res/dog.ogg": b"OggS-dog",
        "res/cat.wav": b"RIFF-cat",
        "res/icon.svg": b"<svg/>",
    }
    assert unpack_qt_resources(bundle, tmp_path / "activity.rcc.d") == 2
    assert (tmp_path / "activity.rcc.d/res/dog.ogg").read_bytes() == b"OggS-dog"
    assert not (tmp_path / "activity.rcc.d/res/icon.svg").exists()
    (tmp_path / "broken.rcc").write_bytes(b"qres" + bytes(8))
    with pytest.raises(DataError, match=r"broken\.rcc: unreadable Qt resource bundle"):
        qt_resources(tmp_path / "broken.rcc")


def test_openttd_sound_catalogues_are_unpacked_to_titled_wav_files(tmp_path):
    wavs = [b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body for body in (b"cow!", b"jet")]
    titles = [b'"Cow". Original "moo.wav" by someone.\0', b'"Early jet take off". By someone.\0']
    table_size = 8 * len(wavs)
    entries, offsets = b"", []
    for title, wav in zip(titles, wavs, strict=True):
        offsets.append(table_size + len(entries))
        entries += bytes([len(title)]) + title + wav
    table = b"".join(
        struct.pack("<II", off | 0x80000000, len(w)) for off, w in zip(offsets, wavs, strict=True)
    )
    bundle = tmp_path / "sounds.cat"
    bundle.write_bytes(table + entries)
    assert is_openttd_catalogue(bundle)
    assert unpack_openttd_catalogue(bundle, tmp_path / "sounds.cat.d") == 2
    assert (tmp_path / "sounds.cat.d/00_cow.wav").read_bytes() == wavs[0]
    assert (tmp_path / "sounds.cat.d/01_early-jet-take-off.wav").read_bytes() == wavs[1]
    (tmp_path / "messages.cat").write_bytes(b"not a sound catalogue")
    assert not is_openttd_catalogue(tmp_path / "messages.cat")


def c4group(entries: dict[str, bytes | dict]) -> bytes:
    """An unpacked C4Group (scrambled header, records, data); a dict value is a child group."""
    header = bytearray(b"RedWolf Design GrpFolder".ljust(28, b"\0") + struct.pack("<iii", 1, 2, len(entries)))
    header = np.frombuffer(bytes(header.ljust(204, b"\0")), np.uint8) ^ 237
    records, data = b"", b""
    for name, content in entries.items():
        payload = c4group(content) if isinstance(content, dict) else content
        child = isinstance(content, dict)
        records += name.encode().ljust(260, b"\0") + struct.pack(
            "<iiiiii", 1, child, len(payload), len(data), 0, 0
        )
        records += bytes(316 - 284)
        data += payload
    return header.reshape(-1, 3)[:, ::-1].tobytes() + records + data


def test_c4group_archives_are_unpacked_with_nested_groups(tmp_path):
    inner = {"Chop1.ogg": b"OggS-chop", "Graphics.png": b"PNG"}
    archive = c4group({"Axe.ocd": inner, "Thunder.wav": b"RIFF-thunder", "Script.c": b"func"})
    bundle = tmp_path / "Sound.ocg"
    bundle.write_bytes(b"\x1e\x8c" + gzip.compress(archive)[2:])
    assert is_c4group(bundle)
    assert c4group_files(bundle) == {
        "Axe.ocd/Chop1.ogg": b"OggS-chop",
        "Axe.ocd/Graphics.png": b"PNG",
        "Thunder.wav": b"RIFF-thunder",
        "Script.c": b"func",
    }
    assert unpack_c4group(bundle, tmp_path / "Sound.ocg.d") == 2
    assert (tmp_path / "Sound.ocg.d/Axe.ocd/Chop1.ogg").read_bytes() == b"OggS-chop"
    assert (tmp_path / "Sound.ocg.d/Thunder.wav").read_bytes() == b"RIFF-thunder"
    assert not (tmp_path / "Sound.ocg.d/Axe.ocd/Graphics.png").exists()
    (tmp_path / "notes.gz").write_bytes(gzip.compress(b"plain gzip, not a group"))
    assert not is_c4group(tmp_path / "notes.gz")
    truncated = tmp_path / "Broken.ocg"
    truncated.write_bytes(b"\x1e\x8c" + gzip.compress(archive[:-8])[2:])  # last entry cut short
    with pytest.raises(DataError, match=r"Broken\.ocg: unreadable C4Group archive"):
        c4group_files(truncated)
    (tmp_path / "Garbage.ocg").write_bytes(b"\x1e\x8c" + bytes(40))
    with pytest.raises(DataError, match=r"Garbage\.ocg: unreadable C4Group archive"):
        c4group_files(tmp_path / "Garbage.ocg")


def test_zip_archives_are_unpacked_to_their_audio(tmp_path):
    bundle = tmp_path / "base.wz"
    with zipfile.ZipFile(bundle, "w") as archive:  # stored, so the corruption below finds the bytes
        archive.writestr("audio/sfx/boom.ogg", b"OggS-boom")
        archive.writestr("sound/Rain.WAV", b"RIFF-rain")
        archive.writestr("audio/", b"")
        archive.writestr("stats/weapons.json", b"{}")
    assert unpack_zip(bundle, tmp_path / "base.wz.d") == 2
    assert (tmp_path / "base.wz.d/audio/sfx/boom.ogg").read_bytes() == b"OggS-boom"
    assert (tmp_path / "base.wz.d/sound/Rain.WAV").read_bytes() == b"RIFF-rain"
    assert not (tmp_path / "base.wz.d/stats").exists()
    for unsafe in ("../escape.ogg", "/abs/escape.ogg", "sound/../../escape.wav"):
        evil = tmp_path / "evil.pk3"
        with zipfile.ZipFile(evil, "w") as archive:
            archive.writestr(zipfile.ZipInfo(unsafe), b"OggS-evil")
        with pytest.raises(DataError, match=r"evil\.pk3: .*unsafe member path"):
            unpack_zip(evil, tmp_path / "evil.pk3.d")
    assert not (tmp_path / "escape.ogg").exists() and not Path("/abs/escape.ogg").exists()
    corrupt = tmp_path / "data.zip"
    corrupt.write_bytes(bundle.read_bytes().replace(b"RIFF-rain", b"RIFF-RAIN"))  # CRC mismatch
    with pytest.raises(DataError, match=r"data\.zip: unreadable zip archive"):
        unpack_zip(corrupt, tmp_path / "data.zip.d")
    (tmp_path / "garbage.zip").write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(DataError, match=r"garbage\.zip: unreadable zip archive"):
        unpack_zip(tmp_path / "garbage.zip", tmp_path / "garbage.zip.d")


def test_midi_plan_is_seeded_and_slots_do_not_overlap():
    params = MidiParams(clips_per_label=3)
    slots = plan_slots(params, seed=5)
    assert len(slots) == 3 * len(GM_SOUNDS)
    assert slots == plan_slots(params, seed=5)
    assert [s.notes for s in slots] != [s.notes for s in plan_slots(params, seed=6)]
    for before, after in itertools.pairwise(slots):
        assert before.start_s + before.length_s < after.start_s
    labels = [s.label for s in GM_SOUNDS]
    assert len(labels) == len(set(labels))


def test_coloured_noise_has_the_requested_slope():
    rng = np.random.default_rng(0)
    n = 2**16
    for exponent in (0.0, 1.0, 2.0):
        power = np.abs(np.fft.rfft(coloured_noise(rng, n, exponent))) ** 2
        freqs = np.fft.rfftfreq(n)
        band = (freqs > 0.001) & (freqs < 0.4)
        slope = np.polyfit(np.log(freqs[band]), np.log(power[band]), 1)[0]
        assert slope == pytest.approx(-exponent, abs=0.1)


def test_procedural_backgrounds_are_deterministic():
    params = ProceduralParams(clips_per_label=2, duration_s=2.0)
    first, again = procedural_clips(params, 16000, 3), procedural_clips(params, 16000, 3)
    assert [c.clip_id for c in first] == [c.clip_id for c in again]
    assert all(np.array_equal(a.samples, b.samples) for a, b in zip(first, again, strict=True))
    assert {c.kind for c in first} == {"background"}


def write_user_folder(root: Path, rows: list[str]) -> UserFolder:
    audio = root / "audio"
    audio.mkdir(parents=True)
    t = np.arange(8000) / 16000
    sf.write(audio / "bark.wav", 0.5 * np.sin(2 * np.pi * 500 * t), 16000)
    sf.write(audio / "horn.flac", 0.5 * np.sin(2 * np.pi * 300 * t), 16000)
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return UserFolder(dir=str(audio), csv=str(root / "labels.csv"), licence="CC-BY-4.0")


def test_user_folder_import(tmp_path):
    spec = write_user_folder(
        tmp_path,
        [
            "filename,label,caption",
            "bark.wav,Dog Barking,a dog barks twice",
            "bark.wav,Dog Barking,barking",
            "horn.flac,car horn,",
        ],
    )
    clips = folder_clips(spec)
    assert [(c.origin, c.label, c.captions) for c in clips] == [
        ("bark.wav", "dog barking", ("a dog barks twice", "barking")),
        ("horn.flac", "car horn", ()),
    ]
    assert all(isinstance(c, RawClip) and c.licence == "CC-BY-4.0" for c in clips)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (["name,label", "bark.wav,dog"], r"missing column\(s\) \['filename'\]"),
        (["filename,label", "missing.wav,dog"], r"file 'missing.wav' is not in"),
        (["filename,label", "bark.wav,"], r"empty label on data row\(s\) \[1\]"),
        (["filename,label", "bark.wav,dog", "bark.wav,cat"], r"file 'bark.wav' has several labels"),
    ],
)
def test_user_folder_errors_name_the_problem(tmp_path, rows, message):
    spec = write_user_folder(tmp_path, rows)
    with pytest.raises(DataError, match=message):
        folder_clips(spec)


@pytest.mark.parametrize("package", DEBIAN_PACKAGES)
def test_every_mapping_pattern_matches_a_file_of_its_package(package):
    """A rule that matches nothing is a typo or a stale file name (checked where the package is unpacked)."""
    mapping = load_mapping(package)
    unpacked = Params().cache_path / "extracted" / package
    root = unpacked / mapping.root
    if not (unpacked / ".complete").is_file():
        pytest.skip(f"{package} is not unpacked in the cache (scripts/install-debian.sh, flam sources build)")
    relpaths = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES]
    unmatched = [rule.pattern for rule in mapping.clips if not fnmatch.filter(relpaths, rule.pattern)]
    assert unmatched == [], f"{package}: rules matching no file: {unmatched}"


def load_review_script():
    spec = importlib.util.spec_from_file_location("review_mapping", ROOT / "scripts" / "review_mapping.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_review_words_agree_across_plurals_and_forms():
    review = load_review_script()
    assert review.words("dog barking") & review.words("Dog; Bark")
    assert review.words("footsteps on gravel") & review.words("Walk, footsteps")
    assert not review.words("lava bubbling") & review.words("Rain; White noise")


def test_review_lists_every_mapped_file_with_the_classifier_top_classes():
    from flam_core.model.yamnet import default_weights_path

    if not default_weights_path().is_file():
        pytest.skip("YAMNet weights not converted (scripts/convert_yamnet.py)")
    rows = load_review_script().review("sound-theme-freedesktop", Params().cache_path, top=3)
    mapping = load_mapping("sound-theme-freedesktop")
    assert len(rows) == sum(1 for r in rows if r["label"] in {c.label for c in mapping.clips}) > 0
    assert all(len(r["top"].split("; ")) == 3 and r["flag"] in ("", "CHECK") for r in rows)
    assert all(r["duration_s"] > 0 and r["peak_dbfs"] <= 0.5 for r in rows)
