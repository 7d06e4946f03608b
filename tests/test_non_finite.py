"""NaN and infinity fail closed: a frame whose embeddings, distances or score are not finite never gets
an OK verdict (the rule "NG when score > threshold" is false for NaN); it gets an explicit error instead.

The model here is real: the small artifact's ONNX graph with an output stage that turns the embedding
into NaN for bright images, as an FP16 engine that overflows does on some frames. The GPU kernel's
side is in tests/test_gpu_kernel.py (the kernel on the CPU emulator, the host's FP16 range check).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from patchline.runtime.artifact import read_manifest, write_manifest
from patchline.runtime.decision import Calibration, decide
from patchline.runtime.inspector import Inspector
from patchline.runtime.overlay import write_rgb
from patchline.runtime.search.distance import NonFiniteError
from patchline.runtime.self_test import SELF_TEST_KEY
from patchline.runtime.tools.demo import write_video
from tests.test_daemon import CAMERA, finish, run_config, start_daemon, subscriber  # noqa: F401 - a fixture

DARK, BRIGHT = 20, 250  # grey levels: every normalised pixel below 0, and above 0


@pytest.fixture(scope="module")
def nan_when_bright(small_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the small artifact whose model outputs NaN for an image with any normalised pixel above 0,
    and its embedding otherwise (the daemon's warm-up frame is black)."""
    onnx = pytest.importorskip("onnx")  # the export extra: not in the runtime-only venv
    from onnx import TensorProto, helper

    out = tmp_path_factory.mktemp("nan_when_bright") / "artifact"
    shutil.copytree(small_artifact, out)
    manifest = read_manifest(out)
    model = onnx.load(str(out / manifest.model.file))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {17}  # ReduceMax's axes attribute
    image, embedding = manifest.preprocess.input_name, manifest.model.output_name
    for node in model.graph.node:
        node.output[:] = ["finite_embedding" if name == embedding else name for name in node.output]
    scalar = lambda name, value: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [value]))
    model.graph.node.extend([
        helper.make_node("ReduceMax", [image], ["brightest"], axes=[1, 2, 3], keepdims=1),
        scalar("zero", 0.0),
        scalar("nan", float("nan")),
        helper.make_node("Greater", ["brightest", "zero"], ["bright"]),
        helper.make_node("Where", ["bright", "nan", "finite_embedding"], [embedding]),
    ])
    onnx.checker.check_model(model)
    onnx.save(model, str(out / manifest.model.file))
    # Without its self-test images (bright: NaN here), which a start would score and refuse the model for: the
    # daemon must run it to show what a frame that turns NaN gets.
    extra = {key: name for key, name in manifest.extra_files.items() if key != SELF_TEST_KEY}
    write_manifest(out, manifest.model_copy(update={"extra_files": extra}))
    return out


def grey(level: int) -> np.ndarray:
    return np.full((128, 128, 3), level, np.uint8)


def test_decide_refuses_a_score_that_is_not_finite() -> None:
    calibration = Calibration(image_threshold=2.0, score_min=1.0, score_max=3.0, method="tests")
    assert decide(2.5, calibration).verdict == "NG"
    for score in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(NonFiniteError, match="not a finite number: no verdict"):
            decide(score, calibration)
        with pytest.raises(NonFiniteError):
            decide(score, None, threshold=2.0)


def test_cpu_inspector_refuses_non_finite_embeddings(nan_when_bright) -> None:
    inspector = Inspector(nan_when_bright, device="cpu")
    assert np.isfinite(inspector.inspect(grey(DARK)).score)
    with pytest.raises(NonFiniteError, match="onnxruntime engine's patch embeddings of image 1 of the batch hold NaN"):
        inspector.inspect_batch([grey(DARK), grey(BRIGHT)])


def test_score_reports_the_image_and_scores_the_others(nan_when_bright, tmp_path) -> None:
    write_rgb(tmp_path / "dark.png", grey(DARK))
    write_rgb(tmp_path / "bright.png", grey(BRIGHT))
    result = subprocess.run([sys.executable, "-m", "patchline.runtime.cli", "score", "--artifact",
                             str(nan_when_bright), "--device", "cpu", str(tmp_path / "bright.png"),
                             str(tmp_path / "dark.png")], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    bright, dark = map(json.loads, result.stdout.splitlines())
    assert bright["path"].endswith("bright.png") and "NaN or infinity" in bright["error"] and "score" not in bright
    assert dark["path"].endswith("dark.png") and np.isfinite(dark["score"])


def test_daemon_publishes_an_error_not_a_verdict(nan_when_bright, tmp_path, mosquitto, subscriber) -> None:  # noqa: F811
    video = write_video(tmp_path / "line.avi", [grey(DARK), grey(BRIGHT), grey(DARK + 10)], fps=10)
    source = {"kind": "gstreamer", "at_end": "stop", "pipeline": f"filesrc location={video} ! decodebin ! videoconvert"
              " ! video/x-raw,format=RGB ! appsink sync=false max-buffers=1 drop=false"}
    config = run_config(tmp_path, nan_when_bright, mosquitto.port, source, threshold=1e6)
    code, output = finish(start_daemon(config))
    assert code == 0, output
    subscriber.wait_for(lambda: subscriber.on("available")[-1:] and subscriber.on("available")[-1].payload == b"stopped")

    verdicts = subscriber.verdicts()
    assert [(v["seq"], v["verdict"]) for v in verdicts] == [(1, "OK"), (2, "OK")]  # the dark frames only
    errors = [json.loads(m.payload) for m in subscriber.on("error")]
    assert [e["error"] for e in errors] == ["non_finite_score"], errors
    assert errors[0]["camera"] == CAMERA and "NaN or infinity" in errors[0]["detail"]
    assert "frame 1: the onnxruntime engine's patch embeddings" in output
    assert "2 OK + 0 NG verdicts, 1 without a verdict (errors)" in output
