"""Audio content search: indexing (incremental, append-only), model checks, ranked segments."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from flam_core.data.recipes import read_recipes
from flam_core.errors import ConfigError, DataError
from flam_core.inference import FlamDetector
from flam_core.search import (
    SearchIndex,
    build_index,
    model_reference,
    search,
    write_embeddings,
)
from flam_core.train import train
from tests.conftest import fuse_with_classifier, smoke_params

RATE = 16000
BEDS = range(8, 16)  # train mixtures whose background beds (events left out) form the corpus
MIXTURES = range(24, 32)  # train mixtures written whole, for the comparison with `detect`


@pytest.fixture(scope="module")
def model_dir(smoke_features, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search-model")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlruns.db'}")
        train(
            smoke_params("train.steps=30"),
            features_dir=smoke_features,
            out_dir=tmp / "model",
            report_dir=tmp / "reports",
        )
    return tmp / "model"


@pytest.fixture(scope="module")
def detector(model_dir):
    return FlamDetector.from_dir(model_dir)


@pytest.fixture(scope="module")
def fused_detector(model_dir, smoke_features, tmp_path_factory):
    """The same model, its scores fused with the backbone's classifier (frame vectors of 512 + 521)."""
    folder = tmp_path_factory.mktemp("fused") / "model"
    shutil.copytree(model_dir, folder)
    fuse_with_classifier(folder, smoke_features)
    return FlamDetector.from_dir(folder)


@pytest.fixture(scope="module")
def plan(mixer, smoke_recipes):
    recipes_dir, _ = smoke_recipes
    return mixer.plan(read_recipes(recipes_dir / "train.parquet"))


def rows_of(plan, i):
    return range(plan.row_start[i], plan.row_start[i + 1])


def bed(mixer, plan, i):
    """Mixture i's background recording alone."""
    return mixer.render_rows(plan, [r for r in rows_of(plan, i) if not plan.is_event[r]])


def write_wav(path, audio):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.clip(audio, -1, 1), RATE)


@pytest.fixture(scope="module")
def planted(mixer, plan):
    """The longest single event of the first train mixtures, over its own background, between two
    other backgrounds (30 s): (audio, query caption, event span in the 30 s file)."""
    best = None
    for i in range(8):
        events = mixer.events(plan, i)
        for r in rows_of(plan, i):
            if not plan.is_event[r]:
                continue
            label = str(mixer.labels[plan.label[r]])
            spans = [(a, b) for a, b, name in events if name == label]
            if len(spans) == 1 and (best is None or spans[0][1] - spans[0][0] > best[3][1] - best[3][0]):
                best = (i, label, mixer.texts[plan.text[r]], spans[0])
    i, label, caption, (onset, offset) = best
    keep = [r for r in rows_of(plan, i) if not plan.is_event[r] or mixer.labels[plan.label[r]] == label]
    middle = mixer.render_rows(plan, keep)
    audio = np.concatenate([bed(mixer, plan, 40), middle, bed(mixer, plan, 41)])
    return audio, caption, (10.0 + onset, 10.0 + offset)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, mixer, plan, planted):
    """Background recordings of real mixtures in two folders, the planted file, a corrupt file."""
    folder = tmp_path_factory.mktemp("corpus") / "audio"
    for i in BEDS:
        write_wav(folder / ("a" if i % 2 else "b") / f"bed-{i:03d}.wav", bed(mixer, plan, i))
    write_wav(folder / "b" / "planted.wav", planted[0])
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    (folder / "notes.txt").write_text("not audio")
    return folder


@pytest.fixture(scope="module")
def corpus_index(corpus, detector, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "index"
    summary = build_index(corpus, out, detector, progress=False)
    return out, summary


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_planted_clip_ranks_first_and_its_segment_covers_the_event(corpus_index, detector, planted):
    index_dir, summary = corpus_index
    _, caption, (onset, offset) = planted
    assert summary["embedded"] == len(BEDS) + 1 and summary["files"] == len(BEDS) + 1
    assert summary["frames"] == sum(
        int(np.ceil(d / detector.frame_hop_s)) for d in [10.0] * len(BEDS) + [30.0]
    )
    index = SearchIndex.open(index_dir)
    results = search(index, detector, caption, top=5)
    assert results[0]["file"] == "b/planted.wav"
    assert results[0]["onset"] < offset and results[0]["offset"] > onset
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    # Above the best other file's score, only the planted event's frames remain.
    runner_up = next(r["score"] for r in results if r["file"] != "b/planted.wav")
    strict = search(index, detector, caption, top=5, threshold=runner_up)
    assert {r["file"] for r in strict} == {"b/planted.wav"}
    assert strict[0]["onset"] < offset and strict[0]["offset"] > onset
    assert onset - 1.0 <= strict[0]["onset"] and strict[0]["offset"] <= offset + 1.0


def test_corrupt_and_non_audio_files_are_reported_not_fatal(corpus_index):
    _, summary = corpus_index
    assert summary["scanned"] == len(BEDS) + 2  # notes.txt is not an audio file
    assert [s["file"] for s in summary["skipped"]] == ["broken.wav"]
    assert "cannot decode" in summary["skipped"][0]["error"]


def test_empty_folder_and_undecodable_folder_are_errors(tmp_path, detector):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no audio files"):
        build_index(tmp_path / "empty", tmp_path / "index", detector, progress=False)
    with pytest.raises(DataError, match="does not exist"):
        build_index(tmp_path / "missing", tmp_path / "index", detector, progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.flac").write_bytes(b"fLaC broken")
    with pytest.raises(DataError, match=r"no audio file .* could be indexed.*x\.flac"):
        build_index(tmp_path / "bad", tmp_path / "index", detector, progress=False)
    assert not (tmp_path / "index").exists()  # nothing half-made is left behind
    with pytest.raises(DataError, match="not a search index"):
        SearchIndex.open(tmp_path / "bad")


@pytest.mark.parametrize("which", ["detector", "fused_detector"])
def test_search_matches_brute_force_detection(tmp_path, mixer, plan, which, request):
    detector = request.getfixturevalue(which)
    # the index re-scores from its float16 frame vectors, `detect` from float32 ones: a score moves
    # by a few 1e-5, and fused by up to about 1e-4 (the classifier's 521 logits span a wider range
    # than the unit embedding, so float16 rounds them more coarsely)
    tol = 1e-4
    if which == "fused_detector":  # the classifier's logits ride along in every frame vector
        assert detector.model.vector_dim == detector.model.head.config.embed_dim + 521
        tol = 5e-4
    folder = tmp_path / "mixtures"
    for i in MIXTURES:
        write_wav(folder / f"part{i % 3}" / f"mix-{i:03d}.wav", mixer.render(plan, i))
    queries = [mixer.frame_labels(plan, i).captions[0] for i in (24, 27)] + ["a dog barking"]
    reference: dict[str, list] = {q: [] for q in queries}
    for path in sorted(folder.rglob("*.wav")):
        for s in detector.detect(path, queries).segments:
            reference[s["prompt"]].append(
                (s["score"], path.relative_to(folder).as_posix(), s["onset"], s["offset"])
            )

    def check(index):
        assert index.n_files == len(MIXTURES)
        for query in queries:
            expected = sorted(reference[query], reverse=True)
            got = search(index, detector, query, top=4)
            np.testing.assert_allclose([g["score"] for g in got], [r[0] for r in expected[:4]], atol=tol)
            for g in got:  # each answer is one of detect's segments, with its score
                assert any(
                    (r[1], r[2], r[3]) == (g["file"], g["onset"], g["offset"])
                    and abs(r[0] - g["score"]) < tol
                    for r in expected
                ), g

    summary = build_index(folder, tmp_path / "index", detector, progress=False)
    assert summary["search"] == "exact" and SearchIndex.open(tmp_path / "index").method == "exact"
    check(SearchIndex.open(tmp_path / "index"))
    # Growing past `pq_min_rows` trains the quantizer and codes the existing chunks, embedding nothing.
    upgraded = build_index(folder, tmp_path / "index", detector, progress=False, pq_min_rows=1)
    assert (upgraded["search"], upgraded["embedded"]) == ("pq", 0)
    codes = np.load(tmp_path / "index" / "chunks" / "chunk-000000.codes.npy")
    dim = detector.model.vector_dim  # one 4-bit code per pair of dimensions, an odd size padded
    assert codes.dtype == np.uint8 and codes.shape[1] == ((dim + 1) // 2 * 4 + 7) // 8
    index = SearchIndex.open(tmp_path / "index")
    assert index.method == "pq"
    check(index)


def test_incremental_indexing_appends_and_never_rewrites(tmp_path, corpus, detector, mixer, plan, planted):
    folder = tmp_path / "audio"
    for name in ("a/bed-009.wav", "a/bed-011.wav", "b/bed-008.wav", "b/bed-010.wav", "b/planted.wav"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(corpus / name, folder / name)
    index_dir = tmp_path / "index"
    first = build_index(folder, index_dir, detector, progress=False, batch_files=3)
    assert first["embedded"] == 5 and len(first["chunks_written"]) == 2
    chunks = sorted((index_dir / "chunks").glob("*.npy"))
    before = {p.name: (p.stat().st_mtime_ns, digest(p)) for p in chunks}

    again = build_index(folder, index_dir, detector, progress=False)
    assert (again["embedded"], again["unchanged"], again["chunks_written"]) == (0, 5, [])

    write_wav(folder / "a" / "new.wav", mixer.render(plan, 50))
    added = build_index(folder, index_dir, detector, progress=False)
    assert (added["new"], added["changed"], added["removed"], added["embedded"]) == (1, 0, 0, 1)
    assert added["unchanged"] == 5 and added["frames_added"] == 32
    assert len(added["chunks_written"]) == 1
    assert {p.name: (p.stat().st_mtime_ns, digest(p)) for p in chunks} == before

    caption = planted[1]
    write_wav(folder / "b" / "planted.wav", bed(mixer, plan, 42))  # the planted event is gone
    changed = build_index(folder, index_dir, detector, progress=False)
    assert (changed["new"], changed["changed"], changed["embedded"]) == (0, 1, 1)
    assert {p.name: (p.stat().st_mtime_ns, digest(p)) for p in chunks} == before
    index = SearchIndex.open(index_dir)
    versions = index.files[index.files["path"] == "b/planted.wav"]
    assert versions["deleted"].tolist() == [True, False] and versions["n_frames"].tolist() == [96, 32]
    everything = search(index, detector, caption, top=100, threshold=0.0)
    assert sorted(r["file"] for r in everything) == sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*.wav")
    )
    assert max(r["offset"] for r in everything if r["file"] == "b/planted.wav") == pytest.approx(10.0)

    (folder / "a" / "bed-009.wav").unlink()
    removed = build_index(folder, index_dir, detector, progress=False)
    assert (removed["removed"], removed["embedded"], removed["files"]) == (1, 0, 5)
    index = SearchIndex.open(index_dir)
    files = {r["file"] for r in search(index, detector, caption, top=100, threshold=0.0)}
    assert "a/bed-009.wav" not in files and "a/new.wav" in files
    meta = json.loads((index_dir / "index.json").read_text())
    assert len(list(index_dir.glob("files-*.parquet"))) == 1 and (index_dir / meta["files_table"]).is_file()


def test_an_index_refuses_another_model(tmp_path, corpus_index, corpus, model_dir):
    index_dir, _ = corpus_index
    copy = tmp_path / "model-copy"
    shutil.copytree(model_dir, copy)
    other = FlamDetector.from_dir(copy)
    same = search(SearchIndex.open(index_dir), other, "a bell", top=1)  # same weights, other folder
    assert len(same) == 1
    with torch.no_grad():
        next(other.model.head.parameters()).add_(0.01)
    with pytest.raises(ConfigError, match="cannot be mixed"):
        search(SearchIndex.open(index_dir), other, "a bell")
    with pytest.raises(ConfigError, match="cannot be mixed"):
        build_index(corpus, index_dir, other, progress=False)


def synthetic_frames(rng, n, dim, query=None):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if query is not None:
        x[40:44] = query  # a four-frame event pointing exactly at the query
    return x


def test_synthetic_index_finds_the_planted_frames_exactly_and_with_pq(tmp_path, detector):
    query = "a planted sound"
    text = detector.prompt_embeddings([query])[0][0].numpy()
    dim, hop = text.shape[0], detector.frame_hop_s
    rng = np.random.default_rng(0)
    files = [(f"f{k:03d}.wav", synthetic_frames(rng, 200, dim)) for k in range(99)]
    files.insert(57, ("planted.wav", synthetic_frames(rng, 200, dim, text)))
    model = model_reference(detector)
    write_embeddings(tmp_path / "exact", model, files, pq_min_rows=10**9)
    summary = write_embeddings(tmp_path / "pq", model, files, chunk_rows=6000, pq_min_rows=8192)
    assert summary == {
        "files": 100,
        "frames": 20_000,
        "chunks_written": ["chunk-000000", "chunk-000001", "chunk-000002", "chunk-000003"],
    }
    assert np.load(tmp_path / "pq" / "chunks" / "chunk-000000.npy", mmap_mode="r").dtype == np.float16
    everything = np.concatenate([f for _, f in files]).astype(np.float16).astype(np.float32)
    exact_top = np.argsort(-(everything @ text), kind="stable")[:50]
    for name in ("exact", "pq"):
        index = SearchIndex.open(tmp_path / name)
        assert index.method == name and index.n_rows == 20_000
        rows, emb = index.top_frames(text, 50)
        assert set(rows.tolist()) == set(exact_top.tolist())
        np.testing.assert_allclose(emb, everything[rows], atol=0)
        results = search(index, detector, query, top=3, threshold=0.9)
        assert len(results) == 1 and results[0]["file"] == "planted.wav" and results[0]["score"] > 0.9
        assert (results[0]["onset"], results[0]["offset"]) == pytest.approx((40 * hop, 44 * hop))
        fallback = search(index, detector, "something else entirely", top=3, threshold=1.0)
        assert len(fallback) == 3 and all(r["offset"] - r["onset"] == pytest.approx(hop) for r in fallback)


def test_windows_of_long_files_give_the_segments_of_whole_file_scoring(tmp_path, detector):
    """Random frames sit around cos 0, i.e. score 0.5, the threshold: runs everywhere, the hardest case
    for growing windows. Search must return exactly the best segments of each whole file's scores."""
    from flam_core.postprocess import segments_from_frames
    from flam_core.search import WHOLE_FILE_FRAMES

    rng = np.random.default_rng(1)
    dim, hop = model_reference(detector)["embed_dim"], detector.frame_hop_s
    files = [
        ("long.wav", synthetic_frames(rng, 3 * WHOLE_FILE_FRAMES + 7, dim)),
        ("short.wav", synthetic_frames(rng, 90, dim)),
    ]
    write_embeddings(tmp_path / "index", model_reference(detector), files)
    index = SearchIndex.open(tmp_path / "index")
    for query in ("a bell", "rain on a roof"):
        expected = []
        for name, frames in files:
            probs = detector.score(frames.astype(np.float16).astype(np.float32), [query])[0]
            expected += [
                (score, name, on, min(off, len(frames) * hop))
                for on, off, score in segments_from_frames(probs, hop, 0.5)
            ]
        expected.sort(key=lambda s: (-s[0], s[1], s[2]))
        got = search(index, detector, query, top=25, threshold=0.5)
        assert [(g["file"], g["onset"], g["offset"]) for g in got] == [
            (e[1], e[2], e[3]) for e in expected[:25]
        ]
        np.testing.assert_allclose([g["score"] for g in got], [e[0] for e in expected[:25]], rtol=1e-6)


@pytest.mark.parametrize(
    ("field", "name"),
    [
        ("files_table", "../victim.parquet"),
        ("files_table", "/tmp/victim.parquet"),
        ("files_table", "files-000001.parquet/../../victim.parquet"),
        ("files_table", "victim.parquet"),
        ("files_table", None),
        ("chunk", "../../victim"),
        ("pq", "../victim.npy"),
    ],
)
def test_index_json_names_outside_the_index_are_refused(tmp_path, detector, field, name):
    """index.json names the files table, chunks and codebook; a name that is not one the writer
    produces is refused on open and on the next `flam index`, and nothing outside is deleted."""
    model = model_reference(detector)
    frames = synthetic_frames(np.random.default_rng(2), 40, model["embed_dim"])
    index_dir = tmp_path / "index"
    write_embeddings(index_dir, model, [("a.wav", frames)])
    victim = tmp_path / "victim.parquet"
    shutil.copy(next(index_dir.glob("files-*.parquet")), victim)
    meta = json.loads((index_dir / "index.json").read_text())
    if field == "chunk":
        meta["chunks"][0]["name"] = name
    elif field == "pq":
        meta["pq"] = {"centroids": name, "subquantizers": 4, "bits": 4, "trained_on_rows": 40}
    else:
        meta[field] = name
    (index_dir / "index.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"index.json: .* is not a file name this index writes"):
        SearchIndex.open(index_dir)
    with pytest.raises(DataError, match="is not a file name this index writes"):
        write_embeddings(index_dir, model, [("b.wav", frames)])
    assert victim.is_file()
