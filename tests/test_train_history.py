"""The loss curve on disk (`LossLog`, `loss.csv`): appended as training goes, whole rows only,
cut back to the resumed checkpoint's step on resume."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flam_core.errors import DataError
from flam_core.train import LossLog, read_loss_csv


def row(step: int, loss: float = 1.0) -> dict[str, float]:
    return {"step": step, "lr": 5e-4 / step, "loss": loss, "sed": loss / 3}


def test_rows_reach_the_file_only_on_flush_and_the_header_once(tmp_path):
    path = tmp_path / "reports" / "loss.csv"
    log = LossLog(path, resume_step=None)
    log.append(row(1, 0.1))
    log.append(row(2, 0.2))
    assert not path.exists()  # buffered
    log.flush()
    log.append(row(3, 1 / 3))
    log.flush()
    log.flush()  # nothing pending: nothing written
    assert path.read_text().splitlines() == [
        "step,lr,loss,sed",
        "1,0.0005,0.1,0.03333333333333333",
        "2,0.00025,0.2,0.06666666666666667",
        "3,0.00016666666666666666,0.3333333333333333,0.1111111111111111",
    ]
    assert read_loss_csv(path) == [row(1, 0.1), row(2, 0.2), row(3, 1 / 3)]  # floats round-trip exactly


def test_a_new_run_starts_the_file_afresh_and_a_resumed_one_cuts_it_back(tmp_path):
    path = tmp_path / "loss.csv"
    first = LossLog(path, resume_step=None)
    for step in range(1, 11):
        first.append(row(step, step / 7))
    first.flush()
    resumed = LossLog(path, resume_step=8)  # the crashed run flushed steps 9-10 after checkpoint 8
    assert [r["step"] for r in read_loss_csv(path)] == list(range(1, 9))
    for step in (9, 10):
        resumed.append(row(step, -step))
    resumed.flush()
    assert read_loss_csv(path) == [row(s, s / 7) for s in range(1, 9)] + [row(s, -s) for s in (9, 10)]
    assert resumed.rows == read_loss_csv(path)  # what metrics are computed from: every step
    LossLog(path, resume_step=0)  # resuming with no checkpoint: nothing to keep
    assert not path.exists()
    LossLog(tmp_path / "never-written.csv", resume_step=5).flush()
    LossLog(path, resume_step=None)
    assert not path.exists()


def test_only_the_writing_process_touches_the_file(tmp_path):
    path = tmp_path / "loss.csv"
    path.write_text("step,lr,loss\n1,0.1,2.0\n2,0.1,1.0\n")
    other_rank = LossLog(path, resume_step=1, write=False)
    other_rank.append({"step": 2, "lr": 0.1, "loss": 3.0})
    other_rank.flush()
    assert path.read_text() == "step,lr,loss\n1,0.1,2.0\n2,0.1,1.0\n"


def test_other_columns_or_a_foreign_file_are_errors(tmp_path):
    path = tmp_path / "loss.csv"
    path.write_text("step,lr,loss\n1,0.1,2.0\n")
    log = LossLog(path, resume_step=1)
    with pytest.raises(DataError, match=r"has columns \['step', 'lr', 'loss'\], this run logs"):
        log.append(row(2))
    path.write_text("step,lr,loss\n1,0.1,not a number\n")
    with pytest.raises(DataError, match="is not a loss curve of `flam train`"):
        LossLog(path, resume_step=1)


@settings(max_examples=40, deadline=None)
@given(
    chunks=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    cut=st.integers(0, 400),
    losses=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=30, max_size=30),
)
def test_a_write_cut_anywhere_leaves_whole_rows(tmp_path_factory, chunks, cut, losses):
    """Whatever byte a crash stops the last write at, the file reads as the rows of the earlier
    flushes plus the complete rows of the cut one, and a resume continues from there."""
    path = tmp_path_factory.mktemp("cut") / "loss.csv"
    log, step = LossLog(path, resume_step=None), 0
    for size in chunks[:-1]:
        for _ in range(size):
            step += 1
            log.append(row(step, losses[step - 1]))
        log.flush()
    before = path.read_bytes() if path.exists() else b""
    for _ in range(chunks[-1]):
        step += 1
        log.append(row(step, losses[step - 1]))
    log.flush()
    whole = path.read_bytes()
    path.write_bytes(whole[: len(before) + min(cut, len(whole) - len(before))])
    kept = read_loss_csv(path)
    assert kept == [row(s, losses[s - 1]) for s in range(1, len(kept) + 1)]
    assert len(kept) >= step - chunks[-1]
    resumed = LossLog(path, resume_step=len(kept))
    resumed.append(row(len(kept) + 1, 0.5))
    resumed.flush()
    assert read_loss_csv(path) == [*kept, row(len(kept) + 1, 0.5)]
