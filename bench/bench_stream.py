"""Live detection: onset latency and CPU load of `flam stream` fed at the pace of real time.

    python bench/bench_stream.py --model models/flam --library data/sources [--hop 1.0] [--events 6]

A recording of quiet noise with `--events` training clips of one label planted 12 s apart is
written to `flam stream`'s stdin as a WAV stream, 0.1 s at a time at real-time pace (the header
first, with an unknown length, as a live source writes it). The prompt is the clips' label and the
threshold sits between the quiet part's highest offline score and the events' (as the test of
`flam stream` chooses it), so every event is found. Latency of an event: wall-clock time from the
moment its onset sample was written to the pipe to the moment its onset line was read. CPU load:
the process's CPU seconds (user + system, from /proc when it ends) per second of audio; 1.0 is
one core busy. The first event starts after 12 s, past the start-up (model loading), which is
reported apart.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import numpy as np
import soundfile as sf

from flam_core.data.sources import load_manifest
from flam_core.inference import FlamDetector

FLAM = str(Path(sys.executable).parent / "flam")
RATE = 16000
GAP_S = 12.0


def _recording(library: Path, n_events: int) -> tuple[np.ndarray, str, list[float]]:
    manifest = load_manifest(library)
    events = manifest[(manifest["kind"] == "event") & (manifest["split"] == "train")]
    label = events["label"].value_counts().index[0]
    clips = events[events["label"] == label].sort_values("clip_id")
    audio = 0.003 * np.random.default_rng(0).standard_normal(int((n_events + 1) * GAP_S * RATE))
    onsets = []
    for k in range(n_events):
        row = clips.iloc[k % len(clips)]
        clip, rate = sf.read(library / row.path, dtype="float32")
        assert rate == RATE
        start = int((k + 1) * GAP_S * RATE)
        piece = clip[: int(6 * RATE)]
        audio[start : start + len(piece)] += piece
        onsets.append(start / RATE + float(row.active_spans[0][0]))
    return audio.astype(np.float32), str(label), onsets


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--library", type=Path, required=True)
    parser.add_argument("--hop", type=float, default=1.0)
    parser.add_argument("--events", type=int, default=6)
    args = parser.parse_args()
    audio, label, onsets = _recording(args.library, args.events)
    detector = FlamDetector.from_dir(args.model)
    probs = detector.detect(audio, [label], sample_rate=RATE).probs[0]
    first = int(onsets[0] / detector.frame_hop_s)
    threshold = float((probs[: first - 1].max() + probs[first:].max()) / 2)

    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    header = io.BytesIO()
    with wave.open(header, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
    head = bytearray(header.getvalue())
    head[4:8] = head[-4:] = (0xFFFFFFFF).to_bytes(4, "little")  # an unknown length, as from a live source
    command = [FLAM, "stream", "-p", label, "--model", str(args.model), "--hop", str(args.hop)]
    command += ["--threshold", f"{threshold:.4f}"]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[tuple[float, dict]] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append((time.perf_counter(), json.loads(line)))

    reader = threading.Thread(target=read)
    reader.start()
    proc.stdin.write(bytes(head))  # type: ignore[union-attr]
    proc.stdin.flush()  # type: ignore[union-attr]
    block = RATE // 10
    feed_start = time.perf_counter()
    written_at = np.zeros(len(audio) // block + 1)
    for b, i in enumerate(range(0, len(audio), block)):
        time.sleep(max(0.0, feed_start + i / RATE - time.perf_counter()))
        proc.stdin.write(pcm[2 * i : 2 * (i + block)])  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        written_at[b] = time.perf_counter()
    proc.stdin.close()  # type: ignore[union-attr]
    usage_before = os.times()
    proc.wait()
    reader.join()
    usage = os.times()
    cpu = sum(usage[i] - usage_before[i] for i in (2, 3))  # children's user and system seconds
    audio_s = len(audio) / RATE
    found = [e for _, e in lines if e["event"] == "onset"]
    latencies = []
    for onset in onsets:
        match = [(t, e) for t, e in lines if e["event"] == "onset" and abs(e["time"] - onset) < 2.0]
        if match:
            sample_block = int(onset * RATE) // block
            latencies.append(match[0][0] - written_at[sample_block])
    hop_s = detector.frame_hop_s * round(args.hop / detector.frame_hop_s)
    print(f"model {args.model}, hop {args.hop:g} s ({hop_s:.4g} s in whole frames)")
    print(f"events planted {len(onsets)}, found {len(latencies)} (onset lines: {len(found)})")
    if latencies:
        print(
            f"onset latency: median {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s "
            f"(from the onset sample written to the onset line read)"
        )
    print(
        f"CPU: {cpu:.1f} s for {audio_s:.0f} s of audio = {cpu / audio_s:.2f} core-seconds per second "
        f"(start-up included; wall {time.perf_counter() - started:.0f} s)"
    )
    if proc.returncode:
        print(proc.stderr.read().decode(), file=sys.stderr)  # type: ignore[union-attr]


if __name__ == "__main__":
    main()
