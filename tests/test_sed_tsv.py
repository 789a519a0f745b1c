import numpy as np
import pytest
import soundfile as sf

from flam_core.data.recipes import read_recipes
from flam_core.data.tsv import COLUMNS, SedDataset, read_sed_tsv, write_sed_tsv
from flam_core.errors import DataError
from flam_core.evaluation.sed import event_f1
from flam_core.postprocess import median_filter_frames

HEADER = "\t".join(COLUMNS) + "\n"


def events_from_frames(labels, frame_s: float) -> list[tuple[float, float, str]]:
    """(onset, offset, label) of every run of positive frames of the mixture's event labels."""
    events = []
    for label, is_event, frames in zip(labels.labels, labels.is_event, labels.frames, strict=True):
        if not is_event:
            continue
        edges = np.diff(np.concatenate([[0], frames.astype(np.int8), [0]]))
        for start, end in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
            events.append((float(start * frame_s), float(end * frame_s), label))
    return sorted(events)


@pytest.fixture(scope="module")
def smoke_sed_set(mixer, smoke_recipes, tmp_path_factory):
    """Four smoke mixtures as 16 kHz WAV files plus a DCASE TSV of their events; one more file has none."""
    recipes_dir, _ = smoke_recipes
    plan = mixer.plan(read_recipes(recipes_dir / "test_seen.parquet"))
    root = tmp_path_factory.mktemp("sed_tsv")
    audio_dir = root / "audio"
    audio_dir.mkdir()
    frame_s = 10.0 / mixer.frames.n_frames
    truth, frames = {}, {}
    for i in range(min(4, len(plan))):
        mixture = mixer.mix(plan, i)
        name = f"mix_{mixture.mixture_id:05d}.wav"
        sf.write(audio_dir / name, mixture.audio, mixer.sample_rate, subtype="FLOAT")
        truth[name] = events_from_frames(mixture.labels, frame_s)
        frames[name] = mixture.labels
    silent = np.zeros(mixer.n_samples, dtype=np.float32)
    sf.write(audio_dir / "silence.wav", silent, mixer.sample_rate, subtype="PCM_16")
    truth["silence.wav"] = []
    tsv = write_sed_tsv(root / "strong.tsv", truth)
    return audio_dir, tsv, truth, frames, frame_s


def write(tmp_path, text: str):
    path = tmp_path / "labels.tsv"
    path.write_text(text, encoding="utf-8")
    return path


def test_smoke_mixtures_round_trip_through_a_dcase_tsv(smoke_sed_set):
    audio_dir, tsv, truth, _, frame_s = smoke_sed_set
    assert any(truth.values()), "the smoke mixtures should hold events"
    lines = tsv.read_text().splitlines()
    assert lines[0] == "filename\tonset\toffset\tevent_label"
    assert "silence.wav\t\t\t" in lines  # a file without events is one row with empty fields
    dataset = SedDataset(audio_dir, tsv)
    assert dataset.audio_ids == sorted(truth)
    assert dataset.files == {name: audio_dir / name for name in sorted(truth)}
    assert dataset.durations == pytest.approx(dict.fromkeys(truth, 10.0))
    assert dataset.ground_truth == truth
    assert dataset.ground_truth["silence.wav"] == []
    assert dataset.vocabulary == sorted({label for events in truth.values() for _, _, label in events})
    # Times are multiples of the 0.3125 s frame and survive the text round trip exactly.
    for events in dataset.ground_truth.values():
        for onset, offset, _ in events:
            assert (onset / frame_s).is_integer() and (offset / frame_s).is_integer()


def test_frame_labels_scored_against_their_own_tsv_give_f1_one(smoke_sed_set):
    audio_dir, tsv, _, frames, frame_s = smoke_sed_set
    dataset = SedDataset(audio_dir, tsv)
    vocab = dataset.vocabulary
    probs = np.zeros((len(dataset), len(vocab), 32))
    for m, name in enumerate(dataset.audio_ids):
        if name in frames:
            labels = frames[name]
            for label, is_event, row in zip(labels.labels, labels.is_event, labels.frames, strict=True):
                if is_event:
                    probs[m, vocab.index(label)] = row
    result = event_f1(probs, frame_s, vocab, dataset.audio_ids, dataset.ground_truth, threshold=0.5)
    assert result["f1_micro"] == 1.0 and result["f1_macro"] == 1.0


def test_missing_audio_files_are_listed(smoke_sed_set, tmp_path):
    audio_dir, _, truth, _, _ = smoke_sed_set
    tsv = write_sed_tsv(tmp_path / "more.tsv", {**truth, "gone_1.wav": [], "gone_2.wav": [(1.0, 2.0, "x")]})
    with pytest.raises(DataError, match=r"2 of 7 file\(s\).*gone_1\.wav, gone_2\.wav"):
        SedDataset(audio_dir, tsv)


def test_read_handles_empty_rows_blank_lines_and_column_order(tmp_path):
    path = write(
        tmp_path,
        "event_label\tfilename\toffset\tonset\ndog\ta.wav\t3.5\t1.0\n\ncat\ta.wav\t0.5\t0.0\n\tb.wav\t\t\n",
    )
    assert read_sed_tsv(path) == {"a.wav": [(0.0, 0.5, "cat"), (1.0, 3.5, "dog")], "b.wav": []}


def test_write_is_atomic_and_round_trips(tmp_path):
    truth = {
        "b.wav": [(0.1, 0.30000000000000004, "x y")],
        "a.wav": [],
        "c.wav": [(2.0, 3.0, "z"), (0.0, 1.0, "z")],
    }
    path = write_sed_tsv(tmp_path / "out" / "gt.tsv", truth)
    assert read_sed_tsv(path) == {name: sorted(events) for name, events in truth.items()}
    assert sorted(p.name for p in path.parent.iterdir()) == ["gt.tsv"]  # no temp file left
    with pytest.raises(DataError, match="0 <= onset < offset"):
        write_sed_tsv(path, {"a.wav": [(2.0, 1.0, "x")]})
    assert read_sed_tsv(path) == {name: sorted(events) for name, events in truth.items()}  # old file intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["gt.tsv"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("filename\tonset\tevent_label\na.wav\t1.0\tdog\n", r"lacks column\(s\) \['offset'\]"),
        ("", "empty"),
        (HEADER, "no rows"),
        (
            HEADER + "a.wav\t1.0\t2.0\tdog\nb.wav\tabc\t2.0\tdog\n",
            r"labels\.tsv:3: onset 'abc' is not a number",
        ),
        (HEADER + "a.wav\t3.0\t2.0\tdog\n", r"labels\.tsv:2: onset 3 s is after offset 2 s"),
        (HEADER + "a.wav\t-1.0\t2.0\tdog\n", r"labels\.tsv:2: onset -1 s is negative"),
        (HEADER + "a.wav\tnan\t2.0\tdog\n", "not a finite number"),
        (HEADER + "a.wav\t2.0\t2.0\tdog\n", "zero-length"),
        (HEADER + "a.wav\t1.0\t2.0\t\n", "all be set or all be empty"),
        (HEADER + "a.wav\t1.0\t2.0\n", r"labels\.tsv:2: 3 field\(s\) but the header has 4"),
        (HEADER + "\t1.0\t2.0\tdog\n", "empty filename"),
    ],
)
def test_malformed_tsv_raises_data_error_with_file_and_line(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        read_sed_tsv(write(tmp_path, text))


def test_missing_tsv_and_audio_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_sed_tsv(tmp_path / "nope.tsv")
    tsv = write(tmp_path, HEADER + "a.wav\t\t\t\n")
    with pytest.raises(DataError, match="audio folder not found"):
        SedDataset(tmp_path / "no_audio", tsv)


class _FrameLabelDetector:
    """Stands in for a model that outputs exactly the frame labels of each file."""

    threshold = 0.5

    def __init__(self, frames, frame_s: float, median_frames: int) -> None:
        self.frames, self.frame_hop_s, self.median_frames = frames, frame_s, median_frames

    def detect(self, path, prompts):
        from types import SimpleNamespace

        probs = np.zeros((len(prompts), 32), dtype=np.float32)
        labels = self.frames.get(path.name)
        if labels is not None:
            for label, is_event, row in zip(labels.labels, labels.is_event, labels.frames, strict=True):
                if is_event and label in prompts:
                    probs[prompts.index(label)] = row
        return SimpleNamespace(probs=probs)


def test_evaluating_a_tsv_dataset_scores_what_the_detector_reports(smoke_sed_set, smoke_models):
    from flam_core.evaluation.report import evaluate_sed_dataset
    from flam_core.inference import FlamDetector

    audio_dir, tsv, _, frames, frame_s = smoke_sed_set
    dataset = SedDataset(audio_dir, tsv)
    exact = evaluate_sed_dataset(_FrameLabelDetector(frames, frame_s, median_frames=1), dataset)
    assert exact["frame_auroc_macro"] == 1.0 and exact["n_files"] == 5
    assert exact["frame_auroc_per_label"] == dict.fromkeys(dataset.vocabulary, 1.0)
    assert exact["event_f1_macro"] == 1.0 and exact["segment_f1_macro"] == 1.0
    # F1 is measured after the detector's median filter, as `flam detect` reports segments;
    # AUROC sweeps the scores themselves.
    filtered = evaluate_sed_dataset(_FrameLabelDetector(frames, frame_s, median_frames=3), dataset)
    assert filtered["frame_auroc_macro"] == 1.0
    vocab, ids = dataset.vocabulary, dataset.audio_ids
    oracle = _FrameLabelDetector(frames, frame_s, median_frames=1)
    probs = np.stack([oracle.detect(audio_dir / name, vocab).probs for name in ids])
    smoothed = event_f1(median_filter_frames(probs, 3), frame_s, vocab, ids, dataset.ground_truth, 0.5)
    assert smoothed["f1_macro"] < 1.0  # these mixtures hold one-frame events the filter erases
    assert filtered["event_f1_macro"] == round(smoothed["f1_macro"], 4)
    detector = FlamDetector.from_dir(smoke_models / "flam")
    model = evaluate_sed_dataset(detector, dataset)
    assert model["n_labels"] == len(dataset.vocabulary) and model["threshold"] == detector.threshold
    for key in ("frame_auroc_macro", "psds1", "psds2", "event_f1_macro", "segment_f1_macro"):
        assert 0.0 <= model[key] <= 1.0
    # PSDS as DCASE reports it (alpha_st = 1) and as open-vocabulary SED papers do (alpha_st = 0):
    # the spread penalty can only lower it.
    for result in (exact, model):
        for n in (1, 2):
            assert 0.0 <= result[f"psds{n}"] <= result[f"psds{n}_alpha_st0"] <= 1.0
