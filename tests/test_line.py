"""`patchline run` with several cameras in one process, from configs/line-cameras.yaml: the daemon as a process,
a real mosquitto, GStreamer and folder sources mixed, one camera in trigger mode."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import pytest
import yaml

from patchline.runtime.config import ConfigError, load_any_config, load_line_config
from patchline.runtime.tools.broker import Mosquitto, free_port
from tests.conftest import needs_gstreamer
from tests.test_daemon import LIVE, calibrated_artifact, defective, good_part, running  # noqa: F401
from tests.test_line_failures import drop, scrape, wait_until
from patchline.runtime.tools.broker import Listener

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "line-cameras.yaml"


def line_config(tmp_path: Path, artifact: Path, port: int, sources: dict[str, dict], **camera_fields) -> Path:
    """The example line config with this machine's broker, state, artifact and, per camera, a test source
    (cameras not named in ``sources`` are left out)."""
    config = yaml.safe_load(EXAMPLE.read_text())
    config["cameras"] = [{**camera, "artifact": str(artifact), "source": sources[camera["camera"]], "threshold": None,
                          **camera_fields.get(camera["camera"], {})}
                         for camera in config["cameras"] if camera["camera"] in sources]
    config.update(mqtt={"port": port}, metrics={"port": free_port()}, state_dir=str(tmp_path / "state"))
    path = tmp_path / "line.yaml"
    path.write_text(yaml.safe_dump(config))
    load_line_config(path)  # the test's own config must be valid before a process is started
    return path


def by_camera(listener: Listener, suffix: str) -> dict[str, list]:
    """Messages on patchline/<camera>/<suffix>, by camera, in arrival order."""
    found: dict[str, list] = {}
    for m in list(listener.messages):
        parts = m.topic.split("/")
        if len(parts) >= 3 and "/".join(parts[2:]) == suffix:
            found.setdefault(parts[1], []).append(m)
    return found


def seqs(listener: Listener) -> dict[str, list[int]]:
    """Each camera's verdict seqs, first arrivals (a redelivery after a lost PUBACK repeats one)."""
    return {camera: list(dict.fromkeys(json.loads(m.payload)["seq"] for m in messages))
            for camera, messages in by_camera(listener, "verdict").items()}


@needs_gstreamer
def test_four_cameras_in_one_process_batch_and_fail_alone(tmp_path, calibrated_artifact):
    """Four cameras on one model: two live streams (one of them ends after 20 frames and stalls), a folder with a
    corrupt file, a trigger camera. Each has its own seq, availability and metrics; the stall and the bad file
    stay with their camera; frames of different cameras are inspected in shared batches; triggers are answered."""
    broker = Mosquitto(tmp_path)
    broker.start()
    listener = Listener(broker.port, ["patchline/#"])
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    sources = {
        "line3-station1": {"kind": "gstreamer", "pipeline": LIVE},
        "line3-station2": {"kind": "gstreamer", "pipeline": LIVE.replace("pattern=ball", "pattern=smpte")},
        "line3-station3": {"kind": "gstreamer", "pipeline": LIVE.replace("is-live=true", "is-live=true num-buffers=20"),
                           "at_end": "reconnect", "stall_timeout_s": 1.0, "reconnect_min_s": 1.0},
        "line3-rework": {"kind": "folder", "path": str(inbox), "poll_interval_s": 0.05},
    }
    config = line_config(tmp_path, calibrated_artifact, broker.port, sources,
                         **{"line3-station3": {"threshold": 1.0, "evidence": {"enabled": False}},
                            "line3-station2": {"trigger": {"timeout_s": 30}}})  # a loaded CI box is slow
    port = load_line_config(config).metrics.port
    try:
        with running(config) as process:
            wait_until(process, lambda: len(by_camera(listener, "available")) == 4, what="four cameras online")
            drop(inbox, "good.png", good_part(500))
            (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
            drop(inbox, "bad.png", defective(good_part(501)))
            wait_until(process, lambda: len(seqs(listener).get("line3-rework", [])) == 2, what="the folder's verdicts")
            wait_until(process, lambda: scrape(port).get('patchline_source_reconnects_total{camera="line3-station3"}', 0)
                       >= 1, what="the ended stream reconnected")
            for part in ("P-1", "P-2", "P-3"):
                listener.client.publish("patchline/line3-station2/trigger", part, qos=1).wait_for_publish(5)
                time.sleep(0.3)
            wait_until(process, lambda: len(seqs(listener).get("line3-station2", [])) == 3, what="three triggers answered")
            metrics = scrape(port)
    finally:
        listener.close()
        broker.stop()
    got = seqs(listener)
    assert set(got) == set(sources)
    for camera, numbers in got.items():
        assert numbers == list(range(1, len(numbers) + 1)), (camera, numbers)  # each its own seq, no gap
    assert len(got["line3-station1"]) >= 5
    rework = [json.loads(m.payload) for m in by_camera(listener, "verdict")["line3-rework"]]
    assert [v["verdict"] for v in rework] == ["OK", "NG"]
    assert Path(rework[1]["evidence"]).parent == tmp_path / "state" / "evidence" / "line3-rework"
    triggered = [json.loads(m.payload) for m in by_camera(listener, "verdict")["line3-station2"]]
    assert [v["part_id"] for v in triggered] == ["P-1", "P-2", "P-3"]
    corrupt = {camera: metrics[f'patchline_frames_corrupt_total{{camera="{camera}"}}'] for camera in sources}
    assert corrupt == {"line3-station1": 0, "line3-station2": 0, "line3-station3": 0, "line3-rework": 1}
    stalls = {camera: metrics[f'patchline_source_reconnects_total{{camera="{camera}"}}'] for camera in sources}
    assert stalls["line3-station3"] >= 1 and stalls["line3-station1"] == stalls["line3-station2"] == 0
    model = next(k for k in metrics if k.startswith("patchline_model_frames_total"))
    frames, batches = metrics[model], metrics[model.replace("frames", "batches")]
    assert frames > batches  # some batches held frames of more than one camera
    for camera, messages in by_camera(listener, "available").items():
        assert [m.payload for m in messages] == [b"online", b"stopped"], camera


def test_a_broker_outage_and_a_camera_that_cannot_work_stay_with_their_camera(tmp_path, calibrated_artifact):
    """Two folder cameras through a broker outage: each camera's verdicts made meanwhile are delivered after it,
    in order, none lost. Then a third camera whose folder does not exist: it says so and goes offline alone."""
    broker = Mosquitto(tmp_path, extra_conf=f"persistence true\npersistence_location {tmp_path}/\n")
    broker.start()
    listener = Listener(broker.port, ["patchline/#"], "3.1.1", client_id="line-test", persistent=True)
    inboxes = {name: tmp_path / name for name in ("line3-station1", "line3-rework")}
    for inbox in inboxes.values():
        inbox.mkdir()
    sources = {name: {"kind": "folder", "path": str(inbox), "poll_interval_s": 0.05} for name, inbox in inboxes.items()}
    try:
        with running(line_config(tmp_path, calibrated_artifact, broker.port, sources)) as process:
            wait_until(process, lambda: len(by_camera(listener, "available")) == 2, what="two cameras online")
            for i, (name, inbox) in enumerate(inboxes.items()):
                drop(inbox, "a.png", good_part(600 + i))
            wait_until(process, lambda: len(seqs(listener)) == 2 and all(len(s) == 1 for s in seqs(listener).values()),
                       what="a verdict from each camera")
            broker.stop()
            for i, (name, inbox) in enumerate(inboxes.items()):
                for n in range(3):
                    drop(inbox, f"b{n}.png", good_part(610 + 10 * i + n))
            time.sleep(2.0)  # made and queued while the broker is away
            broker.start()
            wait_until(process, lambda: all(len(s) == 4 for s in seqs(listener).values()), timeout=90,
                       what="the queued verdicts of both cameras")
        assert seqs(listener) == {"line3-station1": [1, 2, 3, 4], "line3-rework": [1, 2, 3, 4]}

        sources["line3-station3"] = {"kind": "folder", "path": str(tmp_path / "missing")}
        with running(line_config(tmp_path, calibrated_artifact, broker.port, sources)) as process:
            wait_until(process, lambda: [m.payload for m in by_camera(listener, "available").get("line3-station3", [])]
                       [-1:] == [b"online"], what="the third camera online")
            drop(inboxes["line3-station1"], "c.png", good_part(700))  # the others go on while the third cannot read
            wait_until(process, lambda: len(seqs(listener)["line3-station1"]) == 5, what="a verdict beside the failure")
    finally:
        listener.close()
        broker.stop()
    assert "missing: not a folder" in process.output


def test_a_line_config_refuses_repeated_cameras_and_one_client_id(tmp_path):
    config = yaml.safe_load(EXAMPLE.read_text())
    config["cameras"].append(dict(config["cameras"][0]))
    path = tmp_path / "line.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="camera names must be unique.*line3-station1"):
        load_line_config(path)
    config["cameras"].pop()
    config["mqtt"]["client_id"] = "plc-gateway"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="client_id names one connection"):
        load_line_config(path)


def test_engine_score_and_eval_take_a_camera_of_a_line_config():
    """`patchline engine/score/eval --config line.yaml --camera NAME` use that camera's settings and artifact."""
    camera = load_any_config(EXAMPLE, camera="line3-station3")
    assert camera.camera == "line3-station3" and camera.artifact == "/opt/patchline/models/line3-cover"
    with pytest.raises(ConfigError, match="name one with --camera"):
        load_any_config(EXAMPLE)
