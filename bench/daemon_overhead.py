"""The daemon's own cost per frame: everything but the model (backbone, distance, score).

    python bench/daemon_overhead.py [--demo demo] [--frames 40]

Runs a camera's frame path (``Camera.source.read`` + ``Camera.process``, the code its frame
loop runs) on the demo video (``make demo`` writes demo/line.avi and demo/artifact) and on the
same frames scaled to 1280x720, through GStreamer ``filesrc ! decodebin`` into an appsink that
keeps every frame (sync=false, no drop), with a real mosquitto on loopback and NG evidence off.
Per frame it records:

- ``read``: ``source.read`` → an RGB frame: appsink pull, stride removal, colour conversion, and any
  wait for the decoder, which runs on GStreamer's streaming thread in parallel;
- ``preprocess``: resize + normalisation (the Inspector's own timing);
- ``post``: the hand-over to the shared model's batch thread and back, decide + seq counter + make_verdict +
  ``publish_verdict`` + metrics (``process`` minus
  the Inspector's total);
- ``overhead`` = read + preprocess + post, next to ``model`` = backbone + distance + score;
- ``decode_only_ms``: a second pass that only reads frames: the decoder + conversion rate alone.

Writes bench/results/daemon-overhead-<host>-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2

from patchline.runtime.artifact import read_manifest
from patchline.runtime.config import RunConfig
from patchline.runtime.daemon import Daemon
from patchline.runtime.sources import open_source
from patchline.runtime.sources.base import EndOfStream
from patchline.runtime.tools.bench import summarise, write_result
from patchline.runtime.tools.broker import Mosquitto
from patchline.runtime.tools.demo import write_video

ROOT = Path(__file__).resolve().parents[1]


def scaled_video(video: Path, out: Path, size: tuple[int, int]) -> Path:
    capture = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(cv2.resize(bgr[..., ::-1], size, interpolation=cv2.INTER_CUBIC))
    return write_video(out, frames, int(capture.get(cv2.CAP_PROP_FPS) or 10))


def config(video: Path, artifact: Path, port: int, state: Path, threads: int | None) -> RunConfig:
    threshold = None if read_manifest(artifact).calibration else 1.0  # the decision's cost does not depend on it
    return RunConfig.model_validate({
        "camera": "bench", "artifact": str(artifact), "threshold": threshold, "device": "cpu", "threads": threads,
        "source": {"kind": "gstreamer", "at_end": "stop", "pipeline": f"filesrc location={video} ! decodebin ! "
                   "videoconvert ! video/x-raw,format=RGB ! appsink sync=false drop=false max-buffers=1"},
        "mqtt": {"port": port}, "metrics": {"enabled": False}, "evidence": {"enabled": False},
        "state_dir": str(state),
    })


def measure(cfg: RunConfig, frames: int) -> dict:
    daemon = Daemon(cfg.as_line())
    camera = daemon.cameras[0]  # its loop is not started: the bench runs the loop's steps itself, timed
    camera.connect()
    camera.model.current.inspector.warm_up()
    assert camera.sink.wait_connected(10), "bench: no broker connection"
    rows = []
    frame_size = None
    clock = time.perf_counter
    try:
        while len(rows) < frames + 1:
            t0 = clock()
            try:
                frame = camera.source.read(5.0)
            except EndOfStream:
                break
            t1 = clock()
            if frame is None:
                continue
            frame_size = list(frame.image.shape[1::-1])
            verdict = camera.process(frame)
            t2 = clock()
            lat = verdict["latency_ms"]
            read = (t1 - t0) * 1000
            post = (t2 - t1) * 1000 - lat["total"]
            rows.append({"read": read, "preprocess": lat["preprocess"], "post": post,
                         "model": lat["backbone"] + lat["distance"] + lat["reweight"] + lat["map"],
                         "overhead": read + lat["preprocess"] + post})
    finally:
        daemon.shutdown()
    # Decode + conversion alone, same pipeline, no model in the way.
    source = open_source(cfg.source)
    count, start = 0, clock()
    try:
        while True:
            if source.read(5.0) is not None:
                count += 1
    except EndOfStream:
        pass
    elapsed = clock() - start
    rows = rows[1:]  # the first read includes starting the pipeline: once per run, not per frame
    if not rows:
        raise SystemExit(f"bench: the video ended before a second frame was inspected ({cfg.source.pipeline})")
    result = {key: summarise([r[key] for r in rows], (50, 99)) for key in rows[0]}
    result["frames"] = len(rows)
    result["frame_size"] = frame_size
    result["decode_only_ms"] = round(elapsed / max(count, 1) * 1000, 3)
    result["decode_only_frames"] = count
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=ROOT / "demo", help="folder with artifact/ and line.avi")
    parser.add_argument("--artifact", type=Path, default=None, help="default: <demo>/artifact")
    parser.add_argument("--frames", type=int, default=40, help="inspected frames per video")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    args = parser.parse_args()
    artifact = args.artifact or args.demo / "artifact"
    video = args.demo / "line.avi"
    if not video.exists() or not artifact.exists():
        sys.exit(f"bench: run `make demo` first ({video} and {artifact} are needed)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        broker = Mosquitto(tmp)
        broker.start()
        try:
            videos = {"demo": video, "720p": scaled_video(video, tmp / "720p.avi", (1280, 720))}
            results = {name: measure(config(path, artifact, broker.port, tmp / name, args.threads), args.frames)
                       for name, path in videos.items()}
        finally:
            broker.stop()
    out = write_result("daemon-overhead", {"artifact": read_manifest(artifact).model_id, "results": results},
                       ROOT / "bench" / "results")
    print(f"{'video':<6} {'size':>10} {'frames':>6} {'read':>7} {'prep':>7} {'post':>7} {'overhead':>9} "
          f"{'p50':>7} {'p99':>7} {'model':>8} {'decode-only':>11}   (ms per frame; means unless p50/p99)")
    for name, r in results.items():
        print(f"{name:<6} {'x'.join(map(str, r['frame_size'])):>10} {r['frames']:>6} {r['read']['mean_ms']:7.2f} "
              f"{r['preprocess']['mean_ms']:7.2f} {r['post']['mean_ms']:7.2f} {r['overhead']['mean_ms']:9.2f} "
              f"{r['overhead']['median_ms']:7.2f} {r['overhead']['p99_ms']:7.2f} {r['model']['mean_ms']:8.1f} "
              f"{r['decode_only_ms']:11.2f}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
