"""Models swapped without a restart: the daemon as a process, a real video through GStreamer, a real mosquitto,
artifacts exported by `patchline export`, a symlink swapped atomically as an integrator would."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from patchline.runtime.artifact import ArtifactError, load_artifact, read_manifest, write_manifest
from patchline.runtime.decision import Calibration
from patchline.runtime.inspector import Inspector
from patchline.runtime.self_test import SELF_TEST_FILE, check
from patchline.runtime.tools.broker import Listener
from tests.conftest import needs_gstreamer
from tests.test_daemon import (CAMERA, calibrated_artifact, good_part, run_config, running,  # noqa: F401
                               subscriber)
from tests.test_line_failures import wait_until
from patchline.runtime.tools.demo import write_video

FRAMES = 60


def relink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` atomically (what `ln -sfn target new && mv -T new link` does)."""
    new = link.with_name(f".{link.name}.new")
    new.unlink(missing_ok=True)
    os.symlink(target, new)
    os.replace(new, link)


@pytest.fixture(scope="module")
def models(calibrated_artifact, real_photo_artifact, tmp_path_factory) -> Path:
    """models/v1: the synthetic-part model; v2: another export (the real-photo model), calibrated; v3: v2 with a
    memory bank changed after export; v4: v2 whose self-test says other scores (what a broken engine would give)."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(calibrated_artifact, root / "v1")
    shutil.copytree(real_photo_artifact, root / "v2")
    calibration = Calibration(image_threshold=1e6, score_min=0.0, score_max=1.0, method="tests: every part OK")
    write_manifest(root / "v2", read_manifest(root / "v2").model_copy(update={"calibration": calibration}))
    shutil.copytree(root / "v2", root / "v3")
    bank = np.load(root / "v3" / "memory_bank.npy")
    np.save(root / "v3" / "memory_bank.npy", bank * 1.01)
    shutil.copytree(root / "v2", root / "v4")
    with np.load(root / "v4" / SELF_TEST_FILE) as stored:
        np.savez(root / "v4" / SELF_TEST_FILE, images=stored["images"], scores=stored["scores"] * 1.5)
    write_manifest(root / "v4", read_manifest(root / "v4"))  # its checksums agree: only the self-test can tell
    os.symlink("v1", root / "current")
    return root


def test_the_self_test_refuses_an_engine_that_computes_something_else(models):
    artifact = load_artifact(models / "v4")
    inspector = Inspector(artifact, device="cpu")
    with pytest.raises(ArtifactError, match=r"self-test image \d scores .* \(off by 33\.\d+%"):
        check(artifact, inspector, 0.02)
    good = load_artifact(models / "v2")
    assert np.allclose(check(good, Inspector(good, device="cpu"), 1e-6), np.load(models / "v2" / SELF_TEST_FILE)["scores"])


@needs_gstreamer
def test_a_new_model_goes_live_between_two_frames_and_a_bad_one_is_refused(tmp_path, models, mosquitto, subscriber):
    """A 10 fps video whose every frame must get a verdict (appsink without drop); while it plays the artifact
    symlink is swapped to another export, then to a damaged one and one whose self-test fails (both refused), and
    SIGHUP reloads. Every frame gets exactly one verdict, numbered without a gap; verdicts name model v1 up to the
    swap and v2 after it, never a mix; the refusals are published with their reason; nothing restarts."""
    video = write_video(tmp_path / "line.avi", [good_part(800 + i) for i in range(FRAMES)], fps=10)
    pipeline = (f"filesrc location={video} ! decodebin ! videoconvert ! video/x-raw,format=RGB ! "
                "appsink sync=true drop=false max-buffers=1")
    config = run_config(tmp_path, models / "current", mosquitto.port,
                        {"kind": "gstreamer", "pipeline": pipeline, "at_end": "stop"},
                        model_updates={"watch_interval_s": 0.2})
    v1, v2 = (read_manifest(models / name).model_id for name in ("v1", "v2"))
    with running(config, timeout=120) as process:
        wait_until(process, lambda: len(subscriber.verdicts()) >= 5, what="verdicts of v1")
        relink(models / "current", "v2")
        wait_until(process, lambda: any(v["model_id"] == v2 for v in subscriber.verdicts()), what="a verdict of v2")
        for bad in ("v3", "v4"):
            relink(models / "current", bad)
            wait_until(process, lambda: len(subscriber.on("error")) == ("v3", "v4").index(bad) + 1,
                       what=f"{bad} refused")
        relink(models / "current", "v2")
        process.send_signal(signal.SIGHUP)  # the same files again: checked, nothing to swap
        wait_until(process, lambda: process.poll() is not None, timeout=120, what="the end of the video")
    verdicts = subscriber.verdicts()
    assert [v["seq"] for v in verdicts] == list(range(1, FRAMES + 1))  # every frame, once, none lost to the swap
    models_seen = [v["model_id"] for v in verdicts]
    switch = models_seen.index(v2)
    assert models_seen == [v1] * switch + [v2] * (FRAMES - switch) and 5 <= switch < FRAMES
    assert all(v["verdict"] == "OK" and v["threshold"] == 1e6 for v in verdicts[switch:])
    errors = [json.loads(m.payload) for m in subscriber.on("error")]
    assert [e["error"] for e in errors] == ["model_refused", "model_refused"]
    assert "checksum mismatch" in errors[0]["detail"] and "memory_bank.npy" in errors[0]["detail"]
    assert "self-test image" in errors[1]["detail"] and errors[1]["artifact"].endswith("current")
    assert "nothing to swap" in process.output and process.output.count("swapped in") == 1
    announced = [json.loads(m.payload) for m in subscriber.on("model")]
    assert [a["model_id"] for a in announced] == [v1, v2]
    late = Listener(mosquitto.port, [f"patchline/{CAMERA}/model"])  # a PLC subscribing later is told v2
    assert late.wait(lambda ms: len(ms) == 1) and late.messages[0].retain
    assert json.loads(late.messages[0].payload)["model_id"] == v2
    late.close()
    assert announced[1]["artifact"] == str((models / "v2").resolve()) and announced[1]["threshold"] == 1e6
    assert announced[1]["artifact_checksum"] == verdicts[-1]["artifact_checksum"]


def test_a_signed_model_set_command_swaps_the_model_and_a_bad_one_is_refused(tmp_path, models, mosquitto, subscriber):
    """`…/model/set` on a real broker: unsigned, wrongly signed, malformed, or naming an artifact whose
    checksum is not the one given — each refused with its reason on the error topic while v1 keeps judging; a
    signed command with v2's artifact_checksum swaps v2 in, and the folder's next part is judged by it."""
    from patchline.runtime.artifact import load_artifact as load
    from patchline.runtime.model_updates import command_signature
    from tests.test_line_failures import drop

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = run_config(tmp_path, models / "v1", mosquitto.port,
                        {"kind": "folder", "path": str(inbox), "poll_interval_s": 0.05},
                        model_updates={"command_key_credential": "PATCHLINE_TEST_MODEL_KEY"})
    key = b"line3 model key"
    v2 = str(models / "v2")
    checksum = Inspector(load(v2), device="cpu").checksum
    topic = f"patchline/{CAMERA}/model/set"

    def command(payload: dict | str) -> None:
        body = payload if isinstance(payload, str) else json.dumps(payload)
        subscriber.client.publish(topic, body, qos=1).wait_for_publish(5)

    def errors() -> list[dict]:
        return [json.loads(m.payload) for m in subscriber.on("error")]

    with running(config, env={"PATCHLINE_TEST_MODEL_KEY": key.decode()}) as process:
        wait_until(process, lambda: subscriber.on("model"), what="the model announced")
        drop(inbox, "a.png", good_part(900))
        wait_until(process, lambda: len(subscriber.verdicts()) == 1, what="a verdict of v1")
        command({"artifact": v2, "checksum": checksum})
        command({"artifact": v2, "checksum": checksum, "signature": "00" * 32})
        command("not json")
        command({"artifact": v2, "checksum": "ab" * 32, "signature": command_signature(key, v2, "ab" * 32)})
        wait_until(process, lambda: len(errors()) == 4, what="four refusals")
        command({"artifact": v2, "checksum": checksum, "signature": command_signature(key, v2, checksum)})
        wait_until(process, lambda: len(subscriber.on("model")) == 2, what="v2 announced")
        drop(inbox, "b.png", good_part(901))
        wait_until(process, lambda: len(subscriber.verdicts()) == 2, what="a verdict of v2")
    found = errors()
    assert [e["error"] for e in found] == ["model_command_refused", "model_command_refused", "malformed_command",
                                           "model_refused"]
    assert "needs artifact, checksum and signature" in found[0]["detail"]
    assert "signature does not match" in found[1]["detail"]
    assert f"its artifact_checksum is {checksum}, the command says {'ab' * 32}" in found[3]["detail"]
    first, second = subscriber.verdicts()
    assert first["model_id"] == read_manifest(models / "v1").model_id
    assert second["model_id"] == read_manifest(models / "v2").model_id and second["artifact_checksum"] == checksum
