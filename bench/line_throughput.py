"""Many cameras in one process (batched) against as many single-camera processes: frames/s of the box, latency.

    python bench/line_throughput.py [--demo demo] [--cameras 1 2 4 8] [--fps 30] [--seconds 20] [--warmup 10]

For each N in ``--cameras`` it runs the real daemon (``python -m patchline.runtime.cli run --config X``) against
a real mosquitto on loopback (runtime/tools/broker.py), twice:

- ``line``: one process with N cameras on the demo artifact, which therefore share one model and have their frames
  batched (``batching`` left at its defaults), ONNX Runtime on all the cores (``threads`` = ``--cores``);
- ``separate``: N single-camera processes on the same artifact, each with ``threads`` = max(1, cores // N), so
  that together they use the machine's cores, as an integrator running one service per camera would.

Every camera is fed alike: its own GStreamer ``multifilesrc loop=true`` playing the demo video's frames (real images
of parts, ``make demo`` writes demo/line.avi and demo/artifact) as JPEG at ``--fps``, timestamped at that rate and
played in real time by the daemon's appsink; the newest frame wins when the model is busy, as on a line. Pick
``--fps`` so that the box is saturated from N = 2 on (``inspected`` below 100 %). NG evidence is off on both
sides: the comparison is of the model's serving, not of PNG writes.

Once every camera has published a verdict, ``--warmup`` seconds pass, then a window of ``--seconds``. A subscriber
on patchline/+/verdict collects the verdicts (repeats of a seq after a QoS-1 redelivery dropped); a verdict
belongs to the window when it was made in it (its capture ``timestamp`` + ``frame_age_ms``, both from the daemon).
Measured per run:

- ``verdicts_per_s``: the window's verdicts of all cameras / its length: the box's throughput. A frame the source
  dropped for a newer one gets no verdict: drops count against throughput, never against latency;
- ``inspected``: those verdicts / the frames the cameras offered (N × fps × seconds);
- latency: each verdict's ``frame_age_ms`` (capture → verdict, measured by the daemon), p50/p99 per camera and
  over all cameras, and the worst camera's p99; beside it ``inspection``, the verdicts' ``latency_ms.total`` (the
  model's own time per frame, of its whole batch), so that the rest is waiting (for the batch, for the model);
- ``frames_per_batch``: ``patchline_model_frames_total`` / ``patchline_model_batches_total`` over the window, from
  each process's /metrics (1 for separate processes: each camera has a model of its own).

The issue's goal: the line's throughput above the separate processes' at an equal or lower p99 (over all cameras).
The 1-minute load average before and after each run is recorded: another job on the machine shows up there.

Writes bench/results/line-throughput-<host>-<UTC time>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import cv2
import yaml
from prometheus_client.parser import text_string_to_metric_families

from patchline.runtime.artifact import read_manifest
from patchline.runtime.config import load_line_config
from patchline.runtime.search.distance import available_cores
from patchline.runtime.tools.bench import load_avg, summarise, write_result
from patchline.runtime.tools.broker import Listener, Mosquitto, free_port
from patchline.runtime.verdict import epoch_seconds

ROOT = Path(__file__).resolve().parents[1]

SETUPS = ("line", "separate")
STOP_TIMEOUT_S = 60.0
QUIET_S = 0.5  # no verdict for this long after the daemons exited: the broker has delivered them all


@dataclass(frozen=True)
class Plan:
    """What every run of the benchmark shares."""

    artifact: Path
    threshold: float | None
    frames: Path  # the video's frames as JPEG files
    fps: int
    device: str
    cores: int
    seconds: float
    warmup: float
    start_timeout: float


def video_frames(video: Path, out: Path) -> tuple[int, list[int]]:
    """The video's frames as numbered JPEG files in ``out`` (what multifilesrc loops over); their count and size."""
    out.mkdir(parents=True)
    capture = cv2.VideoCapture(str(video))
    count, size = 0, []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        cv2.imwrite(str(out / f"{count:05d}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
        count, size = count + 1, [bgr.shape[1], bgr.shape[0]]
    if not count:
        raise SystemExit(f"bench: no frame could be read from {video}")
    return count, size


def camera_config(name: str, plan: Plan, threads: int) -> dict:
    return {"camera": name, "artifact": str(plan.artifact), "threshold": plan.threshold, "device": plan.device,
            "threads": threads, "evidence": {"enabled": False},
            "source": {"kind": "gstreamer", "pipeline": f"multifilesrc location={plan.frames}/%05d.jpg loop=true "
                       f"caps=image/jpeg,framerate={plan.fps}/1 ! jpegdec"}}


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    load_line_config(path)  # refused here, with the reason, rather than by a daemon after the others started
    return path


def configs(setup: str, n: int, work: Path, plan: Plan,
            broker_port: int) -> tuple[list[Path], list[int], list[str], int]:
    """The run's config files, their metrics ports, its camera names and the ONNX Runtime threads per process."""
    names = [f"n{n}-{setup}-cam{i + 1}" for i in range(n)]
    threads = plan.cores if setup == "line" else max(1, plan.cores // n)
    cameras = [camera_config(name, plan, threads) for name in names]
    if setup == "line":
        groups = [(f"n{n}-line", cameras)]
    else:
        groups = [(camera["camera"], [camera]) for camera in cameras]
    paths, ports = [], []
    for line, members in groups:
        ports.append(free_port())
        paths.append(write_config(work / f"{line}.yaml", {
            "line": line, "cameras": members, "mqtt": {"port": broker_port}, "metrics": {"port": ports[-1]},
            "state_dir": str(work / "state" / line)}))
    return paths, ports, names, threads


def model_counts(port: int) -> tuple[float, float]:
    """(batches, frames) the process's models have run so far, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals = {"patchline_model_batches_total": 0.0, "patchline_model_frames_total": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals["patchline_model_batches_total"], totals["patchline_model_frames_total"]


class Daemons:
    """The run's daemon processes, each logging to a file of its own."""

    def __init__(self, paths: list[Path]) -> None:
        self.logs = [path.with_suffix(".log") for path in paths]
        self.processes = []
        for path, log in zip(paths, self.logs):
            with log.open("w") as out:
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-m", "patchline.runtime.cli", "run", "--config", str(path)],
                    stdout=out, stderr=subprocess.STDOUT))

    def check(self) -> None:
        """Exit with the log of a daemon that ended on its own: a run without it measures nothing."""
        for process, log in zip(self.processes, self.logs):
            if process.poll() is not None:
                self.kill()
                raise SystemExit(f"bench: the daemon of {log.stem} exited with {process.returncode}:\n"
                                 f"{log.read_text()[-4000:]}")

    def stop(self) -> None:
        """Stop them as systemd does (SIGTERM); each must flush its verdicts and exit 0."""
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process, log in zip(self.processes, self.logs):
            try:
                code = process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
                raise SystemExit(f"bench: {log.stem} did not stop within {STOP_TIMEOUT_S:.0f} s:\n"
                                 f"{log.read_text()[-4000:]}") from None
            if code != 0:
                raise SystemExit(f"bench: {log.stem} exited with {code}:\n{log.read_text()[-4000:]}")

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def verdicts(listener: Listener, names: list[str]) -> dict[str, dict[int, dict]]:
    """The run's verdicts by camera and seq (a QoS-1 redelivery repeats a seq; the first arrival is kept)."""
    found: dict[str, dict[int, dict]] = {name: {} for name in names}
    for message in list(listener.messages):
        camera = message.topic.split("/")[1]
        if camera in found:
            verdict = json.loads(message.payload)
            found[camera].setdefault(verdict["seq"], verdict)
    return found


def wait_quiet(listener: Listener) -> None:
    """Return once no message came for QUIET_S (called after the daemons flushed their verdicts and exited)."""
    count = -1
    while count != len(listener.messages):
        count = len(listener.messages)
        time.sleep(QUIET_S)


def latency(times_ms: list[float]) -> dict | None:
    """p50/p99 of the window's times; None where it holds none (a camera starved of the model)."""
    return summarise(times_ms, (50, 99)) if times_ms else None


def run(setup: str, n: int, work: Path, plan: Plan, broker: Mosquitto, listener: Listener) -> dict:
    work.mkdir(parents=True)
    paths, ports, names, threads = configs(setup, n, work, plan, broker.port)
    load_before = os.getloadavg()[0]
    daemons = Daemons(paths)
    try:
        deadline = time.monotonic() + plan.start_timeout
        while not all(verdicts(listener, names).values()):
            daemons.check()
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: not every camera had a verdict within {plan.start_timeout:.0f} s:\n"
                                 + "\n".join(log.read_text()[-2000:] for log in daemons.logs))
            time.sleep(0.2)
        time.sleep(plan.warmup)
        daemons.check()
        start, before = time.time(), [model_counts(port) for port in ports]
        time.sleep(plan.seconds)
        end, after = time.time(), [model_counts(port) for port in ports]
        daemons.check()
        daemons.stop()
    finally:
        daemons.kill()
    wait_quiet(listener)
    per_camera, ages, inspections = {}, [], []
    for camera, by_seq in verdicts(listener, names).items():
        window = [v for v in by_seq.values()
                  if start <= epoch_seconds(v["timestamp"]) + v["frame_age_ms"] / 1000.0 <= end]
        per_camera[camera] = {"verdicts_per_s": round(len(window) / (end - start), 3),
                              "latency": latency([v["frame_age_ms"] for v in window])}
        ages += [v["frame_age_ms"] for v in window]
        inspections += [v["latency_ms"]["total"] for v in window]
    batches = sum(a[0] - b[0] for a, b in zip(after, before))
    frames = sum(a[1] - b[1] for a, b in zip(after, before))
    return {
        "cameras": n, "setup": setup, "processes": len(paths), "threads_per_process": threads,
        "window_s": round(end - start, 3),
        "verdicts_per_s": round(len(ages) / (end - start), 3),
        "inspected": round(len(ages) / (n * plan.fps * (end - start)), 4),
        "latency": latency(ages),
        "inspection": latency(inspections),  # the Inspector's own time per frame; the rest of the age is waiting
        "worst_camera_p99_ms": max((c["latency"]["p99_ms"] for c in per_camera.values() if c["latency"]),
                                   default=None),
        "frames_per_batch": round(frames / batches, 3) if batches else None,
        "model_batches": batches, "model_frames": frames,
        "per_camera": per_camera,
        "load_avg_1m": load_avg(load_before),
    }


def lscpu_model() -> dict[str, str]:
    """lscpu's model name (it also names ARM cores, where /proc/cpuinfo has no 'model name'); {} without lscpu."""
    if shutil.which("lscpu") is None:
        return {}
    out = subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}).stdout
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:")]
    return {"cpu_model": " / ".join(names)} if names else {}


def gpu_name(device: str) -> dict[str, str]:
    if device == "cpu" or shutil.which("nvidia-smi") is None:
        return {}
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return {"gpu": out.stdout.strip()} if out.returncode == 0 else {}


def print_table(results: list[dict]) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    print(f"{'cameras':>7} {'setup':<9} {'procs':>5} {'threads':>7} {'verdicts/s':>10} {'inspected':>9} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'worst cam p99':>13} {'frames/batch':>12} {'load':>9}")
    for r in results:
        lat = r["latency"] or {}
        batch = "-" if r["frames_per_batch"] is None else f"{r['frames_per_batch']:.2f}"
        print(f"{r['cameras']:>7} {r['setup']:<9} {r['processes']:>5} {r['threads_per_process']:>7} "
              f"{r['verdicts_per_s']:>10.2f} {r['inspected']:>9.0%} {ms(lat.get('median_ms')):>7} "
              f"{ms(lat.get('p99_ms')):>7} {ms(r['worst_camera_p99_ms']):>13} {batch:>12} "
              f"{r['load_avg_1m']['before']:>4.1f}>{r['load_avg_1m']['after']:<4.1f}")
    for n in sorted({r["cameras"] for r in results}):
        pair = {r["setup"]: r for r in results if r["cameras"] == n}
        if len(pair) < 2 or not (pair["line"]["latency"] and pair["separate"]["latency"]):
            continue
        line, separate = pair["line"], pair["separate"]
        speedup = line["verdicts_per_s"] / separate["verdicts_per_s"] if separate["verdicts_per_s"] else float("inf")
        met = speedup > 1 and line["latency"]["p99_ms"] <= separate["latency"]["p99_ms"]
        print(f"N={n}: one line {speedup:.2f}x the separate processes' verdicts/s, p99 {line['latency']['p99_ms']:.0f} "
              f"vs {separate['latency']['p99_ms']:.0f} ms: goal {'met' if met else 'missed'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=ROOT / "demo", help="folder with artifact/ and line.avi")
    parser.add_argument("--artifact", type=Path, default=None, help="default: <demo>/artifact")
    parser.add_argument("--video", type=Path, default=None, help="frames every camera plays; default: <demo>/line.avi")
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    parser.add_argument("--fps", type=int, default=30, help="frame rate of every camera")
    parser.add_argument("--seconds", type=float, default=20.0, help="the measured window")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds after every camera's first verdict")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="for every camera's first verdict")
    parser.add_argument("--cores", type=int, default=available_cores(),
                        help="ONNX Runtime threads of the line; the separate processes share them (default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    artifact = args.artifact or args.demo / "artifact"
    video = args.video or args.demo / "line.avi"
    if not video.exists() or not (artifact / "manifest.json").exists():
        sys.exit(f"bench: run `make demo` first ({video} and {artifact} are needed)")
    manifest = read_manifest(artifact)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        count, size = video_frames(video, work / "frames")
        plan = Plan(artifact, None if manifest.calibration else 1.0,  # the decision's cost does not depend on it
                    work / "frames", args.fps, args.device, args.cores, args.seconds, args.warmup, args.start_timeout)
        broker = Mosquitto(work)
        broker.start()
        listener = Listener(broker.port, ["patchline/+/verdict"])
        try:
            for n in args.cameras:
                for setup in args.setups:
                    results.append(run(setup, n, work / f"n{n}-{setup}", plan, broker, listener))
                    print(f"N={n} {setup}: {results[-1]['verdicts_per_s']:.2f} verdicts/s", flush=True)
        finally:
            listener.close()
            broker.stop()
    out = write_result("line-throughput", {
        "artifact": manifest.model_id, "device": args.device, "video": str(video), "video_frames": count,
        "frame_size": size, "fps_per_camera": args.fps, "seconds": args.seconds, "warmup_s": args.warmup,
        "cores": args.cores, "results": results, "machine": {**lscpu_model(), **gpu_name(args.device)}}, args.out)
    print_table(results)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
