"""The last steps of ``make demo``: the exported demo model, running as the line's daemon.

    python -m patchline.runtime.tools.demo --dir demo     (after sample-data and export wrote demo/data, demo/artifact)

1. threshold: the artifact's calibration when it has one; otherwise the highest score of the
   good test images (demo/data/test/good), i.e. the lowest threshold that passes every known-good
   part. That is a stand-in for a real calibration, chosen so no number is made up.
2. a demo video, demo/line.avi: good and defective test parts passing the camera one after another;
3. a local mosquitto on a free loopback port;
4. ``patchline run`` on the video through GStreamer (filesrc ! decodebin), as on a line: the video
   plays in real time and the newest frame wins whenever the model is free;
5. the verdicts a real MQTT subscriber received, printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import yaml

from patchline.runtime.artifact import read_manifest
from patchline.runtime.preprocess import list_images, read_image
from patchline.runtime.tools.broker import Mosquitto, free_port
from patchline.runtime.verdict import epoch_seconds

CAMERA = "demo-cam"
FPS = 4
SECONDS_PER_PART = 2.5


def write_video(path: Path, frames: list[np.ndarray], fps: int) -> Path:
    """RGB frames (all the same size) → an MJPEG .avi that GStreamer's filesrc ! decodebin plays."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise OSError(f"{path}: OpenCV cannot write an MJPEG video here")
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def good_threshold(artifact: Path, good: list[Path]) -> float:
    from patchline.calibration.thresholds import false_reject_threshold
    from patchline.runtime.inspector import Inspector

    inspector = Inspector(artifact)
    scores = [inspector.inspect(read_image(path)).score for path in good]
    threshold = false_reject_threshold(np.asarray(scores), 0.0)  # the highest: passes every known-good part
    print(f"good test images score {min(scores):.4f} … {max(scores):.4f}; threshold = the highest, {threshold:.4f}")
    return threshold


def demo_video(data: Path, out: Path) -> list[str]:
    """Alternate good and defective test parts, each held in view for SECONDS_PER_PART; the parts' classes."""
    test = data / "test"
    good = list_images(test / "good")[:4]
    defects = [p for p in list_images(test) if p.parent.name != "good"][::4][:4]  # spread over the classes
    parts = [p for pair in zip(good, defects) for p in pair]
    frames = []
    for path in parts:
        frames += [read_image(path)] * int(FPS * SECONDS_PER_PART)
    write_video(out, frames, FPS)
    return [p.parent.name for p in parts]


def subscribe(port: int) -> tuple[mqtt.Client, list[tuple[str, bytes]]]:
    received: list[tuple[str, bytes]] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="demo-subscriber")
    client.on_message = lambda c, u, message: received.append((message.topic, message.payload))
    done = threading.Event()
    client.on_subscribe = lambda *args: done.set()
    client.connect("127.0.0.1", port)
    client.subscribe(f"patchline/{CAMERA}/#", qos=1)
    client.loop_start()
    if not done.wait(10):
        sys.exit("demo: the subscriber could not subscribe")
    return client, received


def print_verdicts(received: list[tuple[str, bytes]], parts: list[str]) -> int:
    verdicts = [json.loads(payload) for topic, payload in received if topic.endswith("/verdict")]
    print(f"\n{len(verdicts)} verdict(s) received on patchline/{CAMERA}/verdict:")
    print(f"{'seq':>4} {'part in view':<14} {'verdict':<7} {'score':>8} {'threshold':>9} {'frame age ms':>12} "
          f"{'inference ms':>12}  evidence")
    start = epoch_seconds(verdicts[0]["timestamp"]) if verdicts else 0.0
    for v in verdicts:
        # The first frame read is the video's first: capture times count from it.
        position = epoch_seconds(v["timestamp"]) - start
        part = parts[min(len(parts) - 1, int(position / SECONDS_PER_PART))]
        print(f"{v['seq']:>4} {part:<14} {v['verdict']:<7} {v['score']:8.4f} {v['threshold']:9.4f} "
              f"{v['frame_age_ms']:12.0f} {v['latency_ms']['total']:12.0f}  {v['evidence'] or ''}")
    availability = [payload.decode() for topic, payload in received if topic.endswith("/available")]
    mirrors = sum(topic.endswith("/verdict/state") for topic, _ in received)
    print(f"availability: {' → '.join(availability)}; {mirrors} verdict/state mirror message(s)")
    if verdicts:
        print(f"one verdict in full:\n{json.dumps(verdicts[-1], indent=2)}")
    return len(verdicts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("demo"), help="the demo folder (data/ and artifact/ in it)")
    parser.add_argument("--timeout", type=float, default=600.0, help="stop the daemon after this many seconds")
    args = parser.parse_args(argv)
    folder = args.dir.resolve()
    artifact = folder / "artifact"
    threshold = None
    if read_manifest(artifact).calibration is None:
        threshold = good_threshold(artifact, list_images(folder / "data" / "test" / "good"))
    video = folder / "line.avi"
    parts = demo_video(folder / "data", video)
    print(f"demo video {video}: {len(parts)} parts, {SECONDS_PER_PART} s each at {FPS} fps: {', '.join(parts)}")

    port = free_port()
    config = {
        "camera": CAMERA, "artifact": str(artifact), "threshold": threshold,
        "source": {"kind": "gstreamer", "pipeline": f"filesrc location={video} ! decodebin", "at_end": "stop"},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "metrics": {"port": 0},
        "evidence": {"dir": str(folder / "evidence"), "quota_mb": 50},
        "state_dir": str(folder / "state"),
    }
    run_config = folder / "run.yaml"
    run_config.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        broker = Mosquitto(folder, port)
        broker.start()
    except RuntimeError as exc:
        sys.exit(f"demo: {exc}")
    try:
        client, received = subscribe(port)
        print(f"mosquitto on 127.0.0.1:{port}; try: mosquitto_sub -p {port} -t 'patchline/#' -v\n"
              f"patchline run --config {run_config}", flush=True)
        daemon = subprocess.Popen([sys.executable, "-m", "patchline.runtime.cli", "run", "--config", str(run_config)])
        try:
            code = daemon.wait(args.timeout)
        except subprocess.TimeoutExpired:
            daemon.terminate()
            code = daemon.wait()
        time.sleep(0.5)  # the last messages' way from the broker to the subscriber
        client.loop_stop()
        client.disconnect()
    finally:
        broker.stop()
    count = print_verdicts(received, parts)
    if code != 0 or count == 0:
        sys.exit(f"demo: the daemon exited with {code} after {count} verdict(s)")


if __name__ == "__main__":
    main()
