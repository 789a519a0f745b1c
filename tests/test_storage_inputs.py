"""Audio inputs on S3: `flam detect`, `flam index` and `flam sources build` read ``s3://bucket/key`` objects
and ``s3://bucket/prefix/`` prefixes from a real S3 API (moto_server on loopback), name them by URI in
their outputs, skip what a previous run did without downloading it, and leave no temporary file behind.

`FaultProxy` (a real HTTP proxy in front of the server) counts the requests of a run and injects errors.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from flam_core import storage
from flam_core.batch import collect_audio_files, read_detections, segments_tsv
from flam_core.cli import run
from flam_core.data.sources import build_source_library
from flam_core.errors import DataError
from flam_core.search import SearchIndex, build_index, search
from flam_core.storage import StorageError
from tests.conftest import ROOT, smoke_params
from tests.s3server import FaultProxy, free_port, make_bucket, s3_endpoint  # noqa: F401

PROMPTS = ["dog barking", "a bell ringing"]


@pytest.fixture
def bucket(s3_endpoint: str) -> str:  # noqa: F811
    return make_bucket(s3_endpoint)


@pytest.fixture
def proxy(s3_endpoint: str, monkeypatch):  # noqa: F811
    """Every S3 request of the test goes through a `FaultProxy`."""
    with FaultProxy(s3_endpoint) as running:
        monkeypatch.setenv("AWS_ENDPOINT_URL", running.url)
        yield running


@pytest.fixture(autouse=True)
def private_tmpdir(tmp_path, monkeypatch) -> Path:
    """A temporary folder of the test's own, so that what downloads leave behind can be seen."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def write_recordings(folder: Path, seed: int) -> dict[str, Path]:
    """Four real recordings (mixed formats, rates, channels, 1.5 to 4 s) in nested folders:
    {relative name: path}."""
    rng = np.random.default_rng(seed)
    names = ["a.wav", "b.flac", "sub/c.ogg", "sub/deeper/d.wav"]
    written = {}
    for i, name in enumerate(names):
        rate = (16000, 44100, 22050, 8000)[i]
        t = np.arange(int(rng.uniform(1.5, 4.0) * rate)) / rate
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t) * (np.sin(2 * np.pi * 0.7 * t) > 0)
        mono = (tone + rng.normal(0, 0.05, t.size)).astype(np.float32)
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, np.stack([mono, 0.5 * mono], axis=1) if i == 1 else mono, rate)
        written[name] = path
    return written


def upload(files: dict[str, Path], prefix: str) -> dict[str, str]:
    """Upload each file under `prefix`: {URI: local path}."""
    return {storage.upload_file(path, f"{prefix}/{name}"): path for name, path in files.items()}


def flam(capsys, *args: str) -> tuple[int, str, str]:
    """The `flam` command in this process (the S3 test server's environment applies): code, out, err."""
    capsys.readouterr()
    saved = sys.argv
    sys.argv = ["flam", *args]
    try:
        run()
    except SystemExit as stop:
        code = stop.code
    finally:
        sys.argv = saved
    out, err = capsys.readouterr()
    return int(code or 0), out, err


def object_gets(proxy: FaultProxy) -> list[str]:
    """The object keys read with GET through the proxy (listings left out)."""
    return sorted(
        r.path.split("?")[0].split("/", 2)[2]
        for r in proxy.requests
        if r.method == "GET" and "list-type" not in r.path
    )


# --- detect -------------------------------------------------------------------------------------------


def test_detect_one_object_gives_the_local_files_detection(
    flam_model, detector, bucket, tmp_path, capsys, private_tmpdir
):
    files = write_recordings(tmp_path / "local", seed=0)
    uri = f"s3://{bucket}/field/a.wav"
    storage.upload_file(files["a.wav"], uri)

    code, out, err = flam(
        capsys, "detect", uri, "-p", PROMPTS[0], "-p", PROMPTS[1], "--model", str(flam_model), "--json"
    )
    assert code == 0 and err == "", err
    assert json.loads(out) == detector.detect(files["a.wav"], PROMPTS).to_json()

    code, out, err = flam(
        capsys, "detect", uri, "-p", PROMPTS[0], "--model", str(flam_model), "--threshold", "0"
    )
    assert code == 0 and err == "", err
    assert uri in out and str(private_tmpdir) not in out  # the table is titled with the URI
    assert list(private_tmpdir.iterdir()) == []  # the downloaded copy is gone


def test_detect_a_prefix_names_objects_by_uri_and_resumes_without_downloading(
    flam_model, detector, bucket, tmp_path, capsys, proxy, private_tmpdir
):
    files = write_recordings(tmp_path / "local", seed=1)
    prefix = f"s3://{bucket}/field"
    uris = upload(files, prefix)
    bad = f"{prefix}/sub/broken.wav"
    storage.write_bytes(bad, b"RIFF" + bytes(range(256)) * 4)
    storage.write_bytes(f"{prefix}/notes.txt", b"not audio")  # not an audio name: left out, like in a folder
    storage.upload_file(files["a.wav"], f"{prefix}2/other.wav")  # a sibling prefix, not below field/
    out = tmp_path / "out"
    args = ["detect", f"{prefix}/", "-p", PROMPTS[0], "-p", PROMPTS[1], "--model", str(flam_model)]
    args += ["--out", str(out), "--workers", "0", "--threshold", "0.3"]

    code, stdout, err = flam(capsys, *args)
    assert code == 1, err  # one object is not audio
    assert stdout == ""
    assert "4 done, 0 skipped (already done), 1 failed" in err
    (failed_line,) = [line for line in err.splitlines() if line.startswith("failed ")]
    assert failed_line.startswith(f"failed {bad}: ") and "cannot decode" in failed_line
    assert str(private_tmpdir) not in err
    assert [json.loads(line)["file"] for line in (out / "failed.jsonl").read_text().splitlines()] == [bad]
    records = read_detections(out)
    assert sorted(r["file"] for r in records) == sorted(uris)
    for record in records:  # the same detection as the local file's
        alone = detector.detect(uris[record["file"]], PROMPTS, threshold=0.3).to_json()
        assert {k: v for k, v in record.items() if k not in ("file", "threshold")} == alone
    tsv_names = {line.split("\t")[0] for line in (out / "segments.tsv").read_text().splitlines()[1:]}
    assert tsv_names == set(files)  # relative to the common prefix, as to a common folder
    assert sorted(object_gets(proxy)) == sorted([f"field/{n}" for n in files] + ["field/sub/broken.wav"])
    assert list(private_tmpdir.iterdir()) == []

    proxy.requests.clear()
    code, _, err = flam(capsys, *args)
    assert code == 1 and "0 done, 4 skipped (already done), 1 failed" in err
    assert object_gets(proxy) == ["field/sub/broken.wav"]  # only the failed object is read again
    assert sorted(r["file"] for r in read_detections(out)) == sorted(uris)
    assert list(private_tmpdir.iterdir()) == []


def test_inputs_mix_files_folders_objects_and_prefixes_once_each(bucket, tmp_path):
    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / "x.wav").write_bytes(b"x")
    for key in ("p/a.wav", "p/sub/b.FLAC", "p/notes.txt", "p2/c.wav", "named.bin"):
        storage.write_bytes(f"s3://{bucket}/{key}", b"y")
    storage.s3_client().put_object(Bucket=bucket, Key="p/folder.wav/", Body=b"")  # a folder marker
    inputs = [
        f"s3://{bucket}/p",
        str(tmp_path / "disk"),
        f"s3://{bucket}/named.bin",
        f"s3://{bucket}/p/a.wav",
    ]
    items = collect_audio_files(inputs)
    names = [i.uri if isinstance(i, storage.ObjectInfo) else str(i) for i in items]
    # A prefix is a folder (whole segments, audio names only); a named object is taken as it is.
    assert names == [
        f"s3://{bucket}/p/a.wav",
        f"s3://{bucket}/p/sub/b.FLAC",
        str((tmp_path / "disk" / "x.wav").resolve()),
        f"s3://{bucket}/named.bin",
    ]
    assert items[0].size == 1 and len(items[0].etag) == 32 and items[0].mtime_ns > 1_600_000_000 * 10**9

    # TSV names are relative to the common prefix; without one (other buckets, local files) whole.
    def tsv_names(files: list[str]) -> list[str]:
        return [line.split("\t")[0] for line in segments_tsv([{"file": f} for f in files]).splitlines()[1:]]

    assert tsv_names([f"s3://{bucket}/p/a.wav", f"s3://{bucket}/p/sub/b.flac"]) == ["a.wav", "sub/b.flac"]
    assert tsv_names([f"s3://{bucket}/a.wav", "s3://other-bucket/b.wav"]) == sorted(
        [f"s3://{bucket}/a.wav", "s3://other-bucket/b.wav"]
    )
    assert tsv_names([f"s3://{bucket}/a.wav", "/data/b.wav"]) == ["/data/b.wav", f"s3://{bucket}/a.wav"]


# --- index and search ------------------------------------------------------------------------------------


def test_index_a_prefix_then_search_it_by_uri(
    flam_model, detector, bucket, tmp_path, capsys, proxy, private_tmpdir
):
    local = tmp_path / "local"
    files = write_recordings(local, seed=2)
    prefix = f"s3://{bucket}/corpus"
    uris = upload(files, prefix)
    index = tmp_path / "index"

    code, out, err = flam(capsys, "index", prefix, "--out", str(index), "--model", str(flam_model))
    assert code == 0 and err == "", err
    assert "embedded=4" in out and "files=4" in out
    assert list(private_tmpdir.iterdir()) == []
    code, out, err = flam(capsys, "search", str(index), "-q", PROMPTS[0], "--top", "3", "--json")
    assert code == 0, err
    hits = json.loads(out)
    assert hits and all(hit["file"] in uris for hit in hits)

    # The same corpus indexed from the local folder: the same segments, under relative names.
    build_index(local, tmp_path / "local-index", detector, progress=False)
    expected = search(SearchIndex.open(tmp_path / "local-index"), detector, PROMPTS[0], top=3)
    # Scores equal to float32 rounding: the last bits of an embedding may differ between runs.
    assert [(f"{prefix}/{h['file']}", h["onset"], h["offset"]) for h in expected] == [
        (h["file"], h["onset"], h["offset"]) for h in hits
    ]
    assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in expected], abs=1e-5)

    # A second run lists the prefix and downloads only what is new.
    storage.upload_file(files["a.wav"], f"{prefix}/new/e.wav")
    proxy.requests.clear()
    code, out, err = flam(capsys, "index", f"{prefix}/", "--out", str(index), "--model", str(flam_model))
    assert code == 0 and err == "", err
    assert "new=1" in out and "unchanged=4" in out and "embedded=1" in out and "files=5" in out
    assert object_gets(proxy) == ["corpus/new/e.wav"]
    assert list(private_tmpdir.iterdir()) == []


# --- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["detect", "s3://{bucket}/field/missing.wav", "-p", "dog"],
            "s3://{bucket}/field/missing.wav: no such object",
        ),
        (["detect", "s3://{bucket}/field/", "-p", "dog"], "s3://{bucket}/field/ is a prefix, not an object"),
        (
            ["detect", "s3://{bucket}/empty/", "-p", "dog", "--out", "o"],
            "s3://{bucket}/empty/: no audio object",
        ),
        (
            ["detect", "s3://flam-no-such-bucket/a.wav", "-p", "dog"],
            "bucket 'flam-no-such-bucket' does not exist",
        ),
        (["index", "s3://{bucket}/field/sub/deeper/d.wav", "--out", "o"], "holds no audio objects"),
        (
            ["index", "s3://flam-no-such-bucket/x/", "--out", "o"],
            "bucket 'flam-no-such-bucket' does not exist",
        ),
        (["detect", "s3://Bad_Bucket/a.wav", "-p", "dog"], "invalid bucket name"),
    ],
)
def test_missing_inputs_stop_with_one_line_before_any_model(
    args, message, bucket, tmp_path, capsys, monkeypatch
):
    storage.write_bytes(f"s3://{bucket}/field/sub/deeper/d.wav", b"x")
    monkeypatch.chdir(tmp_path)
    code, out, err = flam(capsys, *[a.format(bucket=bucket) for a in args], "--model", "/nonexistent/model")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message.format(bucket=bucket) in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_access_denied_no_credentials_and_no_endpoint_are_named(bucket, tmp_path, capsys, proxy, monkeypatch):
    uri = f"s3://{bucket}/field/a.wav"
    storage.write_bytes(uri, b"x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    detect = ["detect", uri, "-p", "dog", "--model", "/nonexistent/model"]

    proxy.fail_next(1, status=403, code="AccessDenied", message="Access Denied")
    code, _, err = flam(capsys, *detect)
    assert code == 2 and uri in err and "(HTTP 403)" in err and "check the AWS credentials" in err

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    code, _, err = flam(capsys, *detect)
    assert code == 2 and uri in err and "Could not connect" in err and "AWS_ENDPOINT_URL" in err

    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    code, _, err = flam(capsys, "index", f"s3://{bucket}/field/", "--out", str(tmp_path / "o"))
    assert code == 2 and f"s3://{bucket}/field/" in err and "Unable to locate credentials" in err
    assert not (tmp_path / "o").exists()


# --- staging ----------------------------------------------------------------------------------------------


def test_staging_downloads_ahead_in_order_and_removes_everything(bucket, tmp_path, private_tmpdir):
    payloads = {f"s3://{bucket}/in/{i:02d}.wav": bytes([i]) * (1000 + i) for i in range(7)}
    for uri, data in payloads.items():
        storage.write_bytes(uri, data)
    listed = storage.list_objects(f"s3://{bucket}/in", ["WAV"])
    assert [o.uri for o in listed] == list(payloads)
    local_file = tmp_path / "local.wav"
    local_file.write_bytes(b"local")
    items = [*listed[:3], local_file, *listed[3:]]
    with storage.Staging(ahead=2) as staging:
        got = list(staging.fetch_all(items))
        assert [item for item, _ in got] == items
        assert got[3][1] == local_file  # local files pass through
        for obj, path in got[:3] + got[4:]:
            assert path.name == obj.name and path.read_bytes() == payloads[obj.uri]
            assert path.is_relative_to(private_tmpdir)
        staging.release(got[0][1])
        assert not got[0][1].exists() and got[1][1].exists()
        staging.release(local_file)  # not the staging's: kept
        assert local_file.exists()
    assert list(private_tmpdir.iterdir()) == []

    gone = listed[4]
    storage.s3_client().delete_object(Bucket=bucket, Key="in/04.wav")  # deleted after the listing
    with pytest.raises(DataError, match=f"{gone.uri} does not exist"), storage.Staging(ahead=3) as staging:
        for _ in staging.fetch_all(listed):
            pass
    assert list(private_tmpdir.iterdir()) == []


def test_staging_cache_downloads_a_version_once(bucket, tmp_path, proxy):
    uri = f"s3://{bucket}/lib/knock.wav"
    storage.write_bytes(uri, b"first version")
    cache = tmp_path / "cache"
    with storage.Staging(cache) as staging:
        first = staging.fetch(storage.object_info(uri))
    with storage.Staging(cache) as staging:
        assert staging.fetch(storage.object_info(uri)) == first
    assert object_gets(proxy) == ["lib/knock.wav"]
    assert first.read_bytes() == b"first version"

    storage.write_bytes(uri, b"second version")  # a new ETag: downloaded again, beside the old one
    with storage.Staging(cache) as staging:
        second = staging.fetch(storage.object_info(uri))
    assert second != first and second.read_bytes() == b"second version"
    assert object_gets(proxy) == ["lib/knock.wav", "lib/knock.wav"]


def test_staging_error_for_a_truncated_download_leaves_nothing(bucket, proxy, private_tmpdir):
    uri = f"s3://{bucket}/cut/long.wav"
    storage.write_bytes(uri, bytes(200_000))
    proxy.truncate_objects = "long.wav"
    with pytest.raises(StorageError, match=f"cannot download {uri}"), storage.Staging() as staging:
        staging.fetch(storage.object_info(uri))
    assert list(private_tmpdir.iterdir()) == []


# --- sources build ---------------------------------------------------------------------------------------

USER_ONLY = (
    "sources.packages=[]",
    "sources.held_out_sources=[]",
    "sources.validation_sources=[]",
    "sources.midi.enabled=false",
    "sources.speech.enabled=false",
    "sources.procedural.clips_per_label=1",
    "sources.procedural.duration_s=3",
)


def test_sources_build_reads_a_user_folder_on_s3_like_a_local_one(bucket, tmp_path, proxy):
    local = tmp_path / "knocks"
    rng = np.random.default_rng(0)
    rows = ["filename,label,caption"]
    for i in range(4):
        clip = np.zeros(16000, np.float32)
        clip[4000:12000] = 0.3 * rng.standard_normal(8000)
        name = f"set{i % 2}/knock{i}.wav"
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(local / name, clip, 16000)
        rows.append(f"{name},door knocking,someone knocks {i}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    storage.upload_dir(local, f"s3://{bucket}/users/knocks")
    storage.upload_file(tmp_path / "labels.csv", f"s3://{bucket}/users/labels.csv")

    def build(folder: str, csv: str, out: Path) -> dict:
        params = smoke_params(
            *USER_ONLY,
            f"sources.user_folders=[{{dir: '{folder}', csv: '{csv}'}}]",
            f"cache_dir={tmp_path / 'cache'}",
        )
        return build_source_library(params, out_dir=out, base_dir=ROOT)

    remote = build(f"s3://{bucket}/users/knocks", f"s3://{bucket}/users/labels.csv", tmp_path / "from-s3")
    reference = build(str(local), str(tmp_path / "labels.csv"), tmp_path / "from-disk")
    assert remote.stats["per_label"]["door knocking"] == 4
    assert remote.manifest_hash == reference.manifest_hash  # the same clips, ids and audio
    recordings = [f"users/knocks/set{i % 2}/knock{i}.wav" for i in range(4)]
    assert object_gets(proxy) == sorted(["users/labels.csv", *recordings])  # each object read once

    proxy.requests.clear()
    again = build(f"s3://{bucket}/users/knocks/", f"s3://{bucket}/users/labels.csv", tmp_path / "again")
    assert again.manifest_hash == remote.manifest_hash
    assert object_gets(proxy) == ["users/labels.csv"]  # the recordings come from the cache

    storage.write_bytes(f"s3://{bucket}/bad/labels.csv", b"filename,label\nmissing.wav,dog\n")
    storage.write_bytes(f"s3://{bucket}/bad/audio/other.wav", b"x")
    with pytest.raises(DataError, match=f"file 'missing.wav' is not in s3://{bucket}/bad/audio"):
        build(f"s3://{bucket}/bad/audio", f"s3://{bucket}/bad/labels.csv", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
