"""`patchline run` as a process: real GStreamer, real mosquitto, real ONNX Runtime, a real notify socket."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
import yaml
from jsonschema import Draft202012Validator
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from patchline.runtime.artifact import ArtifactError, read_manifest, write_manifest
from patchline.runtime.config import ConfigError, RunConfig, load_config
from patchline.runtime.daemon import EXIT_CONFIG, EXIT_CRASH, Daemon
from patchline.runtime.decision import Calibration
from patchline.runtime.evidence import EvidenceStore
from patchline.runtime.inspector import Inspector
from patchline.runtime.sources import open_source
from patchline.runtime.tools.broker import Mosquitto, free_port
from patchline.runtime.tools.demo import write_video
from patchline.runtime.verdict import SCHEMA_PATH, epoch_seconds
from tests.conftest import needs_gstreamer

CAMERA = "cam1"
# Frames of the test video: G good part, D the same part with a large defect.
PATTERN = "GGGDDGGDGGDG"
LIVE = "videotestsrc is-live=true pattern=ball ! video/x-raw,width=128,height=128,framerate=10/1"


def good_part(seed: int) -> np.ndarray:
    from patchline.export.synthetic import render

    return render(np.random.default_rng(seed), 128)[0]


def defective(image: np.ndarray) -> np.ndarray:
    damaged = image.copy()
    cv2.circle(damaged, (60, 70), 14, (200, 40, 20), -1)
    return damaged


@pytest.fixture(scope="module")
def calibrated_artifact(small_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the small artifact with a threshold at 1.5x the highest score of good parts (JPEG round trip,
    as in the video); the large defects in the test video score far above that."""
    out = tmp_path_factory.mktemp("calibrated") / "artifact"
    shutil.copytree(small_artifact, out)
    inspector = Inspector(out, device="cpu")
    scores = []
    for seed in range(100, 106):
        _, jpeg = cv2.imencode(".jpg", good_part(seed))
        scores.append(inspector.inspect(cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[..., ::-1]).score)
    calibration = Calibration(image_threshold=1.5 * max(scores), score_min=min(scores), score_max=max(scores),
                              method="tests: 1.5 x the highest good score")
    write_manifest(out, read_manifest(out).model_copy(update={"calibration": calibration}))
    return out


class Subscriber:
    """A real paho client recording every message under the camera's topics, in arrival order."""

    def __init__(self, port: int) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.evidence_on_arrival: dict[str, list[str]] = {}  # a verdict's evidence folder: its files when it came
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([(f"patchline/{CAMERA}/#", 1), ("replies/#", 1)])
        self.client.loop_start()
        assert subscribed.wait(5)

    def _on_message(self, client, userdata, message) -> None:
        if message.topic == f"patchline/{CAMERA}/verdict" and (folder := json.loads(message.payload)["evidence"]):
            self.evidence_on_arrival[folder] = sorted(p.name for p in Path(folder).glob("*"))
        with self.lock:
            self.messages.append(message)

    def on(self, suffix: str) -> list:
        with self.lock:
            return [m for m in self.messages if m.topic == f"patchline/{CAMERA}/{suffix}"]

    def verdicts(self) -> list[dict]:
        return [json.loads(m.payload) for m in self.on("verdict")]

    def wait_for(self, predicate, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out waiting for MQTT messages"
            time.sleep(0.05)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture()
def subscriber(mosquitto):
    sub = Subscriber(mosquitto.port)
    yield sub
    sub.close()


def run_config(tmp_path: Path, artifact: Path, port: int, source: dict, **fields) -> Path:
    config = {"camera": CAMERA, "artifact": str(artifact), "device": "cpu", "threads": 2, "source": source,
              "mqtt": {"port": port}, "metrics": {"enabled": False}, "state_dir": str(tmp_path / "state"), **fields}
    RunConfig.model_validate(config)  # the test's own config must be valid before a process is started
    path = tmp_path / "line.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_daemon(config: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "patchline.runtime.cli", "run", "--config", str(config)],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@contextlib.contextmanager
def running(config: Path, timeout: float = 60.0, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """The daemon as a process for the block, then stopped as systemd stops it (SIGTERM); it must exit 0. Its
    output is then ``process.output``."""
    process = start_daemon(config, env)
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        code, process.output = finish(process, timeout)
    assert code == 0, process.output


def finish(process: subprocess.Popen, timeout: float = 60.0) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"daemon did not exit within {timeout} s; output:\n{output}")
    return process.returncode, output


@needs_gstreamer
def test_video_with_known_defects_gives_the_right_verdicts_on_the_broker(tmp_path, mosquitto, subscriber,
                                                                         calibrated_artifact):
    frames = [defective(good_part(i)) if kind == "D" else good_part(i) for i, kind in enumerate(PATTERN)]
    video = write_video(tmp_path / "line.avi", frames, fps=10)
    # Our own appsink with backpressure instead of drop: every frame of the file is inspected, in order.
    source = {"kind": "gstreamer", "at_end": "stop", "pipeline": f"filesrc location={video} ! decodebin ! videoconvert"
              " ! video/x-raw,format=RGB ! appsink sync=false max-buffers=1 drop=false"}
    config = run_config(tmp_path, calibrated_artifact, mosquitto.port, source,
                        evidence={"dir": str(tmp_path / "evidence"), "quota_mb": 50})
    code, output = finish(start_daemon(config))
    assert code == 0, output
    subscriber.wait_for(lambda: subscriber.on("available")[-1:] and subscriber.on("available")[-1].payload == b"stopped")

    verdicts = subscriber.verdicts()
    validator = Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    for verdict in verdicts:
        validator.validate(verdict)
    assert "".join("D" if v["verdict"] == "NG" else "G" for v in verdicts) == PATTERN
    assert [v["seq"] for v in verdicts] == list(range(1, len(PATTERN) + 1))
    manifest = read_manifest(calibrated_artifact)
    assert all(v["model_id"] == manifest.model_id and v["normalised_score"] is not None for v in verdicts)
    assert all((v["normalised_score"] > 0.5) == (v["verdict"] == "NG") for v in verdicts)
    # The defect's location: the most anomalous patch lies on the painted disc (centre 60,70, radius 14).
    for v in verdicts:
        if v["verdict"] == "NG":
            assert np.hypot(v["location"]["x"] - 60, v["location"]["y"] - 70) < 24, v["location"]
            # The evidence existed when the verdict naming it arrived.
            assert subscriber.evidence_on_arrival[v["evidence"]] == ["frame.png", "heatmap.jpg"]
        else:
            assert v["evidence"] is None
        assert v["evidence_error"] is None

    # Mirrors, in the same order, with the same values.
    assert [m.payload.decode() for m in subscriber.on("verdict/state")] == [v["verdict"] for v in verdicts]
    assert [int(m.payload) for m in subscriber.on("verdict/seq")] == [v["seq"] for v in verdicts]
    assert [float(m.payload) for m in subscriber.on("verdict/score")] == [v["score"] for v in verdicts]
    assert {m.payload for m in subscriber.on("verdict/part_id")} == {b""}
    assert [m.payload for m in subscriber.on("available")] == [b"online", b"stopped"]
    assert "camera cam1: source ended" in output and "every camera ended; stopping" in output
    assert output.count(" INFO ") < 40  # events, not a line per frame


@needs_gstreamer
def test_notify_watchdog_health_metrics_and_sigterm(tmp_path, mosquitto, subscriber, small_artifact):
    """Under a real notify socket: READY after the first frame, WATCHDOG from the loop (also while the
    source is gone), /healthz follows the frames, /metrics counts, SIGTERM ends cleanly."""
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.2)
    notes: list[tuple[float, str]] = []

    def listen() -> None:
        while notify.fileno() >= 0:
            try:
                notes.append((time.monotonic(), notify.recv(4096).decode()))
            except TimeoutError:
                continue
            except OSError:
                return

    threading.Thread(target=listen, daemon=True).start()
    port = free_port()
    # 25 live frames, then the stream ends; the source reconnects 3 s later and frames flow again.
    source = {"kind": "gstreamer", "pipeline": LIVE.replace("is-live=true", "is-live=true num-buffers=25"),
              "at_end": "reconnect", "reconnect_min_s": 3.0}
    config = run_config(tmp_path, small_artifact, mosquitto.port, source, threshold=1.0, evidence={"enabled": False},
                        metrics={"port": port, "health_max_frame_age_s": 1.0})
    process = start_daemon(config, {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "2000000"})

    def wait(predicate, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while not (result := predicate()):
            if process.poll() is not None or time.monotonic() > deadline:
                notify.close()
                pytest.fail(f"gave up waiting; daemon output:\n{finish(process, 10)[1]}")
            time.sleep(0.05)
        return result

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    try:
        ready_at = wait(lambda: next((t for t, n in notes if "READY=1" in n), None))
        # While the engine loads and warms up, the start timeout is pushed out (a first TensorRT build takes minutes).
        extended = [t for t, n in notes if "EXTEND_TIMEOUT_USEC=60000000" in n]
        assert extended and max(extended) < ready_at
        status, health = get("/healthz")
        assert status == 200 and set(json.loads(health)) == {"healthy", "cameras"}
        assert set(json.loads(health)["cameras"][CAMERA]) == {"last_frame_age_s", "mqtt_connected", "queue_depth"}
        gone_at = wait(lambda: time.monotonic() if get("/healthz")[0] == 503 else None)
        wait(lambda: get("/healthz")[0] == 200)  # reconnected, frames again
        # The pings went on while the source was away (a loaded CI box may answer /healthz late: wait for them).
        wait(lambda: sum(t > gone_at for t, n in notes if n == "WATCHDOG=1") >= 2, timeout=10)
        status, metrics = get("/metrics")
        assert status == 200
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines() if line and line[0] != "#"}
        label = f'{{camera="{CAMERA}"}}'
        assert values[f"patchline_source_reconnects_total{label}"] >= 1
        assert values[f"patchline_frames_total{label}"] >= 1 and values[f"patchline_fps{label}"] > 0
        assert values[f'patchline_inference_seconds_count{label}'] >= 1
        assert f'patchline_verdicts_total{{camera="{CAMERA}",result="OK"}}' in metrics
        for name in ("frames_skipped_total", "source_stalls_total", "mqtt_queue_depth", "mqtt_reconnects_total",
                     "uptime_seconds"):
            assert f"patchline_{name}{label}" in values
    except BaseException:  # a failed check must not leave the daemon running
        process.kill()
        raise

    process.send_signal(signal.SIGTERM)
    code, output = finish(process, 30)
    notify.close()
    assert code == 0, output
    assert any(n.startswith("STOPPING=1") for _, n in notes)
    assert any("STATUS=" in n and "fps, broker connected" in n for _, n in notes)
    subscriber.wait_for(lambda: subscriber.on("available")[-1].payload == b"stopped")
    verdicts = subscriber.verdicts()
    assert [v["seq"] for v in verdicts] == list(range(1, len(verdicts) + 1))
    # No verdict stands for a frame that did not come: a gap while the stream was away.
    stamps = [epoch_seconds(v["timestamp"]) for v in verdicts]
    assert max(np.diff(stamps)) >= 2.0
    assert ready_at < gone_at


@needs_gstreamer
def test_trigger_mode_answers_each_part_and_reports_malformed_triggers(tmp_path, mosquitto, subscriber,
                                                                       small_artifact):
    config = run_config(tmp_path, small_artifact, mosquitto.port, {"kind": "gstreamer", "pipeline": LIVE},
                        threshold=1.0, mode="trigger", evidence={"enabled": False})
    process = start_daemon(config)
    try:
        subscriber.wait_for(lambda: subscriber.on("available"), timeout=60)
        time.sleep(2.0)  # frames flow; none is inspected without a trigger
        assert subscriber.verdicts() == []
        topic = f"patchline/{CAMERA}/trigger"
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "replies/plc7"
        props.CorrelationData = b"\x01\x02"
        sent = time.time()
        subscriber.client.publish(topic, json.dumps({"part_id": "P-1"}), qos=1, properties=props).wait_for_publish(5)
        subscriber.wait_for(lambda: len(subscriber.verdicts()) == 1)
        subscriber.client.publish(topic, "P-2", qos=1).wait_for_publish(5)
        subscriber.client.publish(topic, '{"part_id": ', qos=1).wait_for_publish(5)
        subscriber.wait_for(lambda: len(subscriber.verdicts()) == 2 and subscriber.on("error"))
    finally:
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, 30)
    assert code == 0, output
    first, second = subscriber.verdicts()
    assert (first["part_id"], second["part_id"]) == ("P-1", "P-2")
    assert [m.payload.decode() for m in subscriber.on("verdict/part_id")] == ["P-1", "P-2"]
    assert epoch_seconds(first["timestamp"]) >= sent - 0.002  # a frame captured at or after the trigger (ms resolution)
    assert 0 <= first["frame_age_ms"] < 5000 and first["latency_ms"]["trigger_to_verdict"] > 0
    reply = [m for m in subscriber.messages if m.topic == "replies/plc7"]
    assert json.loads(reply[0].payload)["part_id"] == "P-1" and reply[0].properties.CorrelationData == b"\x01\x02"
    error = json.loads(subscriber.on("error")[0].payload)
    assert error["error"] == "malformed_trigger" and "JSON" in error["detail"]


@needs_gstreamer
def test_wrong_credentials_exit_non_zero_with_a_clear_error(tmp_path, small_artifact):
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "line", "right"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    broker = Mosquitto(tmp_path, extra_conf=f"password_file {passwords}\n")
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true", "allow_anonymous false"))
    broker.start()
    try:
        config = run_config(tmp_path, small_artifact, broker.port, {"kind": "gstreamer", "pipeline": LIVE},
                            threshold=1.0, mqtt={"port": broker.port, "username": "line",
                                                 "password_credential": "PATCHLINE_TEST_PASSWORD"})
        code, output = finish(start_daemon(config, {"PATCHLINE_TEST_PASSWORD": "wrong"}), 60)
    finally:
        broker.stop()
    assert code == EXIT_CONFIG != 0
    assert "refused the connection" in output and "Not authorized" in output, output


def test_images_dropped_into_a_folder_get_verdicts_on_the_broker(tmp_path, mosquitto, subscriber, calibrated_artifact):
    """The daemon end to end without GStreamer, so also on Python 3.10 (`make test`): a good part, then a defect."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = run_config(tmp_path, calibrated_artifact, mosquitto.port,
                        {"kind": "folder", "path": str(inbox), "poll_interval_s": 0.1})
    daemon = start_daemon(config)
    try:
        for count, image in enumerate([good_part(200), defective(good_part(201))], start=1):
            cv2.imwrite(str(tmp_path / "part.png"), image[..., ::-1])
            os.replace(tmp_path / "part.png", inbox / f"{count}.png")  # whole files only, as a camera's FTP drop does
            subscriber.wait_for(lambda: len(subscriber.verdicts()) == count, timeout=90)
    finally:
        daemon.send_signal(signal.SIGTERM)
    code, output = finish(daemon)
    assert code == 0, output
    verdicts = subscriber.verdicts()
    assert [(v["seq"], v["verdict"]) for v in verdicts] == [(1, "OK"), (2, "NG")], output
    assert [m.payload for m in subscriber.on("available")][-1] == b"stopped"


def test_a_crash_is_not_a_clean_stop(tmp_path, mosquitto, subscriber, calibrated_artifact):
    """A bug in the frame path (injected: the second frame's inspection raises) ends the daemon with EX_SOFTWARE for
    systemd to restart it, the traceback in the journal, the verdicts made so far delivered, and the retained
    availability "offline" (what the will says), never the clean stop's "stopped"."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = run_config(tmp_path, calibrated_artifact, mosquitto.port,
                        {"kind": "folder", "path": str(inbox), "poll_interval_s": 0.1})
    crash_on_second_frame = (  # a bug cannot be provoked from outside: it is put in, in the daemon's process
        "import sys, threading\n"
        "from patchline.runtime import cli, inspector\n"
        "real = inspector.Inspector.inspect_batch\n"
        "frames = []\n"
        "def inspect_batch(self, images):\n"
        "    if threading.current_thread().name.startswith('model-'):  # frames, not the self-test or warm-up\n"
        "        frames.append(1)\n"
        "        if len(frames) == 2:\n"
        "            raise ZeroDivisionError('injected bug')\n"
        "    return real(self, images)\n"
        "inspector.Inspector.inspect_batch = inspect_batch\n"
        "cli.main(['run', '--config', sys.argv[1]])\n")
    daemon = subprocess.Popen([sys.executable, "-c", crash_on_second_frame, str(config)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    for count in (1, 2):
        cv2.imwrite(str(tmp_path / "part.png"), good_part(300 + count)[..., ::-1])
        os.replace(tmp_path / "part.png", inbox / f"{count}.png")
        if count == 1:
            subscriber.wait_for(lambda: len(subscriber.verdicts()) == 1, timeout=90)
    code, output = finish(daemon)
    assert code == EXIT_CRASH, output
    assert "CRITICAL patchline.camera: camera cam1 crashed: ZeroDivisionError: injected bug" in output
    assert "Traceback" in output and "all verdicts delivered; availability 'offline' published" in output
    assert "'stopped'" not in output
    assert [v["seq"] for v in subscriber.verdicts()] == [1]
    subscriber.wait_for(lambda: subscriber.on("available")[-1].payload == b"offline", timeout=10)
    assert [m.payload for m in subscriber.on("available")] == [b"online", b"offline"]


def test_refuses_to_start_without_calibration_or_threshold(tmp_path, small_artifact):
    config = RunConfig.model_validate({"camera": CAMERA, "artifact": str(small_artifact), "state_dir": str(tmp_path),
                                       "source": {"kind": "folder", "path": str(tmp_path)}})
    with pytest.raises(ConfigError, match="not calibrated"):
        Daemon(config.as_line())


def test_evidence_keeps_the_newest_folders_within_the_quota(tmp_path):
    rng = np.random.default_rng(0)
    store = EvidenceStore(tmp_path / "evidence", quota_mb=0.5, image_format="png")
    settled = []
    for seq in range(1, 9):
        noise = rng.integers(0, 255, (240, 320, 3), np.uint8)  # incompressible: ~230 kB per PNG
        store.submit(seq, 1_700_000_000 + seq, noise, rng.random((64, 64)).astype(np.float32),
                     lambda folder, error: settled.append((folder, error)))
        time.sleep(0.05)  # let the writer keep up; a backlog would drop evidence instead (counted)
    store.close()
    kept = sorted(p for p in (tmp_path / "evidence").iterdir())
    size = sum(f.stat().st_size for p in kept for f in p.iterdir())
    assert store.saved == 8 and store.dropped == 0 and all(error is None for _, error in settled)
    assert size <= 0.5 * 1024 * 1024 and len(kept) >= 1
    assert [str(p) for p in kept] == [folder for folder, _ in settled][-len(kept):]  # the oldest went first
    assert sorted(f.name for f in kept[-1].iterdir()) == ["frame.png", "heatmap.jpg"]


def test_evidence_writer_survives_a_failing_job_and_close_returns(tmp_path):
    rng = np.random.default_rng(0)
    store = EvidenceStore(tmp_path / "evidence", quota_mb=5, image_format="png")
    image = rng.integers(0, 255, (64, 64, 3), np.uint8)
    settled = []
    # An empty map: ValueError, not OSError.
    store.submit(1, 1_700_000_001, image, np.zeros((0, 0), np.float32), lambda *result: settled.append(result))
    store.submit(2, 1_700_000_002, image, rng.random((8, 8)).astype(np.float32), lambda *result: settled.append(result))
    started = time.monotonic()
    store.close(timeout=10)
    assert time.monotonic() - started < 5 and not store._thread.is_alive()
    assert (store.saved, store.failed) == (1, 1)
    (failed, why), (kept, none) = settled
    assert (failed, why, none) == (None, "write_failed", None)
    assert [str(p) for p in (tmp_path / "evidence").iterdir()] == [kept]  # the failed folder was removed


def test_a_busy_metrics_port_names_the_setting():
    from prometheus_client import CollectorRegistry

    from patchline.runtime.metrics import MetricsServer

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=f"metrics.host/port 127.0.0.1:{port}: cannot listen: Address already in use"):
            MetricsServer(CollectorRegistry(), lambda: (True, {}), "127.0.0.1", port)
    finally:
        taken.close()


# What a scrape showed before the sinks had an interface of their own: dashboards and alerts depend on these.
SCRAPED_FAMILIES = {
    ("patchline_disk_write_failures", "counter", ("camera", "error", "what")),
    ("patchline_evidence", "counter", ("camera", "outcome")),
    ("patchline_fps", "gauge", ("camera",)),
    ("patchline_frames", "counter", ("camera",)),
    ("patchline_frames_corrupt", "counter", ("camera",)),
    ("patchline_frames_lost", "counter", ("camera",)),
    ("patchline_frames_skipped", "counter", ("camera",)),
    ("patchline_inference_seconds", "histogram", ("camera",)),
    ("patchline_inspection_errors", "counter", ("camera", "reason")),
    ("patchline_last_frame_age_seconds", "gauge", ("camera",)),
    ("patchline_mqtt_connected", "gauge", ("camera",)),
    ("patchline_mqtt_delivered", "counter", ("camera",)),
    ("patchline_mqtt_dropped", "counter", ("camera",)),
    ("patchline_mqtt_queue_depth", "gauge", ("camera",)),
    ("patchline_mqtt_reconnects", "counter", ("camera",)),
    ("patchline_mqtt_recovered", "counter", ("camera",)),
    ("patchline_model_batches", "counter", ("model",)),
    ("patchline_model_frames", "counter", ("model",)),
    ("patchline_source_reconnects", "counter", ("camera",)),
    ("patchline_source_stalls", "counter", ("camera",)),
    ("patchline_source_unreadable", "counter", ("camera",)),
    ("patchline_trigger_errors", "counter", ("camera", "reason")),
    ("patchline_uptime_seconds", "gauge", ("camera",)),
    ("patchline_verdicts", "counter", ("camera", "result")),
}


def test_a_scrape_shows_the_same_metric_families_and_the_sinks_counts(tmp_path, mosquitto):
    from prometheus_client.parser import text_string_to_metric_families

    from patchline.runtime.config import MqttConfig
    from patchline.runtime.disk_writes import DiskWrites
    from prometheus_client import CollectorRegistry

    from patchline.runtime.metrics import LineCollector, Metrics, MetricsServer, inference_histogram
    from patchline.runtime.sinks.mqtt.sink import MqttSink
    from patchline.runtime.tools.sample_verdict import sample_verdict

    disk = DiskWrites()
    config = RunConfig.model_validate({"camera": CAMERA, "artifact": str(tmp_path), "state_dir": str(tmp_path),
                                       "source": {"kind": "folder", "path": str(tmp_path)}})
    source = open_source(config.source, memory=tmp_path / "inspected", disk=disk)
    sink = MqttSink(MqttConfig(port=mosquitto.port), CAMERA, tmp_path, disk=disk)
    evidence = EvidenceStore(tmp_path / "evidence", 1, "png", 1, disk)
    registry = CollectorRegistry()
    metrics = Metrics(CAMERA, source, sink, evidence, disk, inference_histogram(registry))
    registry.register(LineCollector([metrics], lambda: {"resnet18-test": (2, 3)}))
    server = MetricsServer(registry, lambda: (True, {}), "127.0.0.1", 0)
    # A sample in every family, so that the scrape shows each one's labels.
    metrics.inspected(0.01, "OK")
    metrics.trigger_error("no_frame")
    metrics.inspection_error("non_finite_score")
    disk.failed("evidence", tmp_path, OSError(errno.ENOSPC, "No space left on device"), "not saved")
    sink.start()
    try:
        assert sink.wait_connected(5)
        for seq in (1, 2, 3):
            sink.publish_verdict(sample_verdict(seq))
        deadline = time.monotonic() + 10
        while sink.delivery.delivered < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            families = list(text_string_to_metric_families(response.read().decode()))
    finally:
        server.close()
        sink.stop(flush_timeout=1)
        evidence.close()
        source.close()
    # The histogram's _created is prometheus_client's own (PROMETHEUS_DISABLE_CREATED_SERIES turns it off).
    shown = {(f.name, f.type, tuple(sorted({k for s in f.samples for k in s.labels} - {"le"}))) for f in families
             if not f.name.endswith("_created")}
    assert shown == SCRAPED_FAMILIES
    values = {s.name: s.value for f in families for s in f.samples if s.labels == {"camera": CAMERA}}
    assert {name: values[f"patchline_mqtt_{name}"] for name in ("delivered_total", "recovered_total", "dropped_total",
                                                                "reconnects_total", "queue_depth", "connected")} == {
        "delivered_total": 3, "recovered_total": 0, "dropped_total": 0, "reconnects_total": 0, "queue_depth": 0,
        "connected": 1}


@needs_gstreamer
def test_the_example_line_config_is_valid_and_its_pipeline_parses():
    config = load_config(Path(__file__).parents[1] / "configs" / "line.yaml", [], model=RunConfig)
    assert config.source.kind == "gstreamer" and config.mqtt.password_credential == "mqtt-password"
    open_source(config.source)  # parses the RTSP pipeline (GStreamer plugins present) without connecting


def test_refuses_int8_when_the_artifact_has_no_int8_model(tmp_path, small_artifact):
    config = RunConfig.model_validate({"camera": CAMERA, "artifact": str(small_artifact), "state_dir": str(tmp_path),
                                       "threshold": 1.0, "precision": "int8",
                                       "source": {"kind": "folder", "path": str(tmp_path)}})
    with pytest.raises(ArtifactError, match="no INT8 model; create one with `patchline quantize`"):
        Daemon(config.as_line())


@needs_gstreamer
def test_continuous_mode_answers_triggers_at_once_with_not_in_trigger_mode(tmp_path, mosquitto, subscriber,
                                                                            small_artifact):
    config = run_config(tmp_path, small_artifact, mosquitto.port, {"kind": "gstreamer", "pipeline": LIVE},
                        threshold=1.0, evidence={"enabled": False})
    process = start_daemon(config)
    try:
        subscriber.wait_for(lambda: subscriber.verdicts(), timeout=60)  # running, inspecting without triggers
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "replies/plc9"
        props.CorrelationData = b"\x07"
        subscriber.client.publish(f"patchline/{CAMERA}/trigger", "P-9", qos=1,
                                  properties=props).wait_for_publish(5)
        subscriber.wait_for(lambda: subscriber.on("error"), timeout=10)
    finally:
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, 30)
    assert code == 0, output
    error = json.loads(subscriber.on("error")[0].payload)
    assert error["error"] == "not_in_trigger_mode" and error["part_id"] == "P-9" and "mode: trigger" in error["detail"]
    reply = [m for m in subscriber.messages if m.topic == "replies/plc9"]
    assert json.loads(reply[0].payload)["part_id"] == "P-9" and reply[0].properties.CorrelationData == b"\x07"
    assert all(v["part_id"] is None for v in subscriber.verdicts())  # no verdict claims the part
