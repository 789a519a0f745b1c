import hashlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from flam_core.config import frame_hop_s
from flam_core.data.mixer import PEAK_LIMIT, Mixer
from flam_core.data.recipes import RECIPE_SPLITS, read_recipes
from flam_core.data.sources import load_manifest
from flam_core.errors import DataError
from tests.conftest import ROOT, smoke_params


@pytest.fixture(scope="module")
def plans(mixer, smoke_recipes):
    recipes_dir, _ = smoke_recipes
    return {split: mixer.plan(read_recipes(recipes_dir / f"{split}.parquet")) for split in RECIPE_SPLITS}


def one_event_recipe(background, event, onset_s: float, gain_db: float) -> pd.DataFrame:
    """A one-mixture recipe: `background` (manifest row) under one whole `event` clip."""
    return pd.DataFrame(
        {
            "mixture_id": [0, 0],
            "kind": ["background", "event"],
            "event_index": [-1, 0],
            "clip_id": [background.clip_id, event.clip_id],
            "label": [background.label, event.label],
            "caption_id": [-1, 0],
            "clip_offset_s": [0.0, 0.0],
            "onset_s": [0.0, onset_s],
            "duration_s": [10.0, event.duration_s],
            "gain_db": [0.0, gain_db],
            "fade_s": [0.0, 0.0],
        }
    )


def frame_energy(audio: np.ndarray, n_frames: int) -> np.ndarray:
    return np.square(audio.astype(np.float64)).reshape(n_frames, -1).mean(axis=1)


def test_randomized_invariants_over_every_smoke_mixture(mixer, plans):
    n_frames = mixer.frames.n_frames
    checked = 0
    for plan in plans.values():
        for i in range(len(plan)):
            mixture = mixer.mix(plan, i)
            audio, labels = mixture.audio, mixture.labels
            assert audio.dtype == np.float32 and audio.shape == (mixer.n_samples,)
            assert np.isfinite(audio).all() and 0 < np.max(np.abs(audio)) <= PEAK_LIMIT + 1e-6
            assert labels.frames.shape == (len(labels.labels), n_frames) and labels.frames.dtype == bool
            assert len(set(labels.labels)) == len(labels.labels) == len(labels.captions)
            assert labels.is_event[:-1].all() and not labels.is_event[-1]  # background label last
            # Frames where an event is labelled active carry more of its energy than the frames
            # away from it. A frame next to a positive one can hold an attack and still be
            # negative (under `min_coverage` of it is active), so those are left out.
            rows = np.arange(plan.row_start[i], plan.row_start[i + 1])
            for k, label in enumerate(labels.labels):
                positive = labels.frames[k]
                near = positive | np.r_[positive[1:], False] | np.r_[False, positive[:-1]]
                if not labels.is_event[k] or near.all() or not positive.any():
                    continue
                own = [r for r in rows if plan.is_event[r] and mixer.labels[plan.label[r]] == label]
                energy = frame_energy(mixer.render_rows(plan, own), n_frames)
                assert energy[positive].mean() > 2 * energy[~near].mean(), (i, label)
                checked += 1
    assert checked > 100


def test_labels_follow_the_active_spans_not_the_placement_window(mixer, smoke_library):
    # One event whose clip is silent in its middle: frames over the silence are negative.
    library, _ = smoke_library
    manifest = load_manifest(library)
    gappy = manifest[(manifest["kind"] == "event") & (manifest["active_spans"].map(len) >= 2)]
    row = gappy.iloc[0]
    spans = np.array([list(s) for s in row.active_spans])
    background = manifest[manifest["kind"] == "background"].iloc[0]
    recipe = one_event_recipe(background, row, onset_s=1.0, gain_db=20.0)
    labels = mixer.frame_labels(mixer.plan(recipe), 0)
    frame_len = frame_hop_s(mixer.synth, mixer.frames)
    centres = (np.arange(mixer.frames.n_frames) + 0.5) * frame_len
    inside = ((centres[:, None] >= spans[:, 0] + 1.0) & (centres[:, None] < spans[:, 1] + 1.0)).any(axis=1)
    far_outside = ~(
        (centres[:, None] >= spans[:, 0] + 1.0 - frame_len)
        & (centres[:, None] < spans[:, 1] + 1.0 + frame_len)
    ).any(axis=1)
    event = labels.frames[labels.labels.index(row.label)]
    long_spans = (spans[:, 1] - spans[:, 0]) >= frame_len
    if long_spans.all():
        assert event[inside].all()
    assert not event[far_outside].any()


def test_event_level_is_gain_db_above_the_background(mixer, smoke_library):
    library, _ = smoke_library
    manifest = load_manifest(library)
    event = manifest[(manifest["kind"] == "event") & (manifest["duration_s"] > 1.0)].iloc[0]
    background = manifest[manifest["kind"] == "background"].iloc[0]
    recipe = one_event_recipe(background, event, onset_s=2.0, gain_db=12.0)
    plan = mixer.plan(recipe)

    def active_rms_db(audio: np.ndarray, spans, shift: float) -> float:
        sr = mixer.sample_rate
        mask = np.zeros(len(audio), bool)
        for onset, offset in spans:
            mask[int((onset + shift) * sr) : int((offset + shift) * sr)] = True
        return 10 * np.log10(np.mean(np.square(audio[mask], dtype=np.float64)))

    event_audio = mixer.render_rows(plan, [1])
    background_audio = mixer.render_rows(plan, [0])
    event_db = active_rms_db(event_audio, [list(s) for s in event.active_spans], 2.0)
    assert event_db - mixer.synth.background_dbfs == pytest.approx(12.0, abs=0.3)
    assert 10 * np.log10(np.mean(np.square(background_audio, dtype=np.float64))) == pytest.approx(
        mixer.synth.background_dbfs, abs=1.5
    )


def test_mixing_is_bit_identical_across_processes(mixer, plans, smoke_library, smoke_recipes):
    plan = plans["val"]
    digest = hashlib.sha256()
    for i in range(len(plan)):
        mixture = mixer.mix(plan, i)
        digest.update(mixture.audio.tobytes())
        digest.update(mixture.labels.frames.tobytes())
    library, _ = smoke_library
    recipes_dir, _ = smoke_recipes
    script = f"""
import hashlib
from pathlib import Path
from flam_core.data.mixer import Mixer
from flam_core.data.recipes import read_recipes
from flam_core.data.sources import load_manifest
from tests.conftest import smoke_params
p = smoke_params()
mixer = Mixer(load_manifest(Path({str(library)!r})), Path({str(library)!r}), p.synth, p.frames, 16000)
plan = mixer.plan(read_recipes(Path({str(recipes_dir / "val.parquet")!r})))
digest = hashlib.sha256()
for i in range(len(plan)):
    m = mixer.mix(plan, i)
    digest.update(m.audio.tobytes()); digest.update(m.labels.frames.tobytes())
print(digest.hexdigest())
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == digest.hexdigest()


def test_order_of_rendering_does_not_matter(mixer, plans):
    plan = plans["test_seen"]
    forward = [mixer.render(plan, i).tobytes() for i in range(len(plan))]
    backward = [mixer.render(plan, i).tobytes() for i in reversed(range(len(plan)))][::-1]
    assert forward == backward


def test_pieces_cover_the_active_spans_inside_their_placement(mixer, plans):
    plan = plans["train"]
    checked = 0
    for i in range(16):
        pieces = mixer.pieces(plan, i)
        assert pieces == sorted(pieces)
        rows = {r for _, _, r in pieces}
        assert len(rows) == len(pieces) and all(plan.row_start[i] <= r < plan.row_start[i + 1] for r in rows)
        for onset, offset, row in pieces:  # within the window the piece was placed in
            placed = plan.onset_s[row], plan.onset_s[row] + plan.duration_s[row]
            assert placed[0] - 1e-6 <= onset < offset <= placed[1] + 1e-6
        for onset, offset, label in mixer.events(plan, i):
            # each event (active spans of one label, merged) lies within the merged extents of
            # that label's pieces
            merged: list[list[float]] = []
            for a, b in sorted((a, b) for a, b, r in pieces if mixer.labels[plan.label[r]] == label):
                if merged and a <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            assert any(a - 1e-9 <= onset and offset <= b + 1e-9 for a, b in merged), (i, label)
            checked += 1
    assert checked > 30


def test_missing_clip_fails_with_its_id(mixer, smoke_recipes):
    recipes_dir, _ = smoke_recipes
    recipe = read_recipes(recipes_dir / "val.parquet")
    recipe["clip_id"] = recipe["clip_id"].astype(str)
    recipe.loc[recipe.index[1], "clip_id"] = "scratch-000000000000"
    with pytest.raises(DataError, match=r"missing from the source library: \['scratch-000000000000'\]"):
        mixer.plan(recipe)


def test_wrong_sample_rate_is_refused(smoke_library):
    library, _ = smoke_library
    params = smoke_params()
    with pytest.raises(DataError, match=r"source library is at \[16000\] Hz, the profile mixes at 48000 Hz"):
        Mixer(load_manifest(library), library, params.synth, params.frames, 48000)
