"""`patchline bench` runs once on the small artifact and writes a well-formed results file (no timing asserted);
the scripts in bench/ start from the installed package."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from patchline.runtime.cli import main
from patchline.runtime.tools.bench import STAGES, VariantSpec, parse_variant, summarise, write_result
from patchline.runtime.tools.demo import write_video
from tests.conftest import needs_gstreamer
from tests.test_search import strip_index

BENCH_SCRIPTS = Path(__file__).resolve().parent.parent / "bench"
LINE_BENCH = BENCH_SCRIPTS / "line_throughput.py"


def test_bench_writes_results_and_table(small_artifact, sample_data, mosquitto, tmp_path, capsys):
    pytest.importorskip("torch")  # --compare runs eager torch: the export extra is not in the runtime-only venv
    out = tmp_path / "results"
    main(["bench", "--artifact", str(small_artifact), "--images", str(sample_data), "--frames", "3", "--warmup", "1",
          "--variants", "plain,exact,pruned,approximate", "--threads", "2", "--compare", "--publish", f"127.0.0.1:{mosquitto.port}",
          "--accuracy", str(sample_data), "--out", str(out)])
    table = capsys.readouterr().out
    files = list(out.glob("*.json"))
    assert len(files) == 1
    results = json.loads(files[0].read_text())
    assert results["sgemm_gflops"] > 0 and results["peak_rss_mb"] > 0
    assert results["artifact"]["bank_rows"] == json.loads((small_artifact / "manifest.json").read_text())["memory_bank"]["shape"][0]
    choice = results["artifact"]["search"]  # the artifact's measured default, which `exact` runs
    assert choice == json.loads((small_artifact / "manifest.json").read_text())["search"]
    assert results["variants"]["exact"]["search"] == choice["method"]
    assert [results["variants"][name]["search"] for name in ("plain", "pruned", "approximate")] == [
        "plain", "pruned", "approximate"]
    assert 0.0 <= results["variants"]["pruned"]["pruning_rate_median"] <= 1.0
    assert results["variants"]["plain"]["pruning_rate_median"] is None
    for name in ("plain", "exact", "pruned", "approximate"):
        stages = results["variants"][name]["stages"]
        assert set(stages) == {*STAGES, "total"}
        assert all(0 < s["median_ms"] <= s["p95_ms"] for s in stages.values())
        assert stages["distance"]["floor_ms"] > 0 and stages["backbone"]["floor_ms"] > 0
    baseline = results["baseline"]
    assert baseline["against"] == "exact" and baseline["speedup_median"] > 0
    assert set(baseline["speedup_by_variant"]) == {"plain", "exact", "pruned", "approximate"}
    # anomalib's own model where it is installed, else the in-project twin, and the table says which.
    assert baseline["implementation"].startswith(("anomalib ", "in-project torch"))
    assert (baseline["not_anomalib_because"] is None) == baseline["implementation"].startswith("anomalib ")
    # Same model, same frames: the torch twin agrees with the runtime up to float32 rounding.
    assert baseline["max_rel_score_diff"] < 1e-3
    accuracy = results["accuracy"]
    assert accuracy["exact"]["max_rel_score_drift"] == 0.0  # the reference column
    assert accuracy["plain"]["max_rel_score_drift"] < 1e-3 and accuracy["pruned"]["max_rel_score_drift"] < 1e-3
    assert 0.0 <= accuracy["approximate"]["image_auroc"] <= 1.0
    assert "distance" in table and "speed-up vs the baseline" in table and str(files[0]) in table
    assert f"baseline: {baseline['implementation']}" in table


def test_bench_with_random_bank_of_given_size(small_artifact, tmp_path, capsys):
    out = tmp_path / "results"
    main(["bench", "--artifact", str(small_artifact), "--frames", "2", "--warmup", "1", "--random-bank",
          "--bank-size", "517", "--variants", "exact", "--out", str(out)])
    results = json.loads(next(out.glob("*.json")).read_text())
    assert results["artifact"]["bank_rows"] == 517 and results["artifact"]["bank"] == "random"
    assert "not measured" in capsys.readouterr().out  # publish without a broker


def test_bench_names_a_frame_that_does_not_decode(small_artifact, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(SystemExit, match=r"broken\.png: not an image in a known format"):
        main(["bench", "--artifact", str(small_artifact), "--images", str(frames), "--frames", "1", "--warmup", "1",
              "--out", str(tmp_path / "results")])


def test_summarise_and_write_result(tmp_path):
    stats = summarise([4.0, 1.0, 3.0, 2.0], (50, 90))
    assert stats == {"median_ms": 2.5, "p90_ms": 3.7, "mean_ms": 2.5, "min_ms": 1.0, "max_ms": 4.0, "n": 4}
    assert summarise([1.0], unit="") == {"median": 1.0, "p95": 1.0, "mean": 1.0, "min": 1.0, "max": 1.0, "n": 1}
    with pytest.raises(ValueError, match="nothing was measured"):
        summarise([])
    path = write_result("unit", {"value": 1, "machine": {"load": 0.5}}, tmp_path / "out")
    written = json.loads(path.read_text())
    assert path.name.startswith(f"unit-{written['machine']['host']}-") and written["value"] == 1
    assert written["machine"]["load"] == 0.5 and written["machine"]["cores"] == len(os.sched_getaffinity(0))
    assert written["machine"]["cpu_model"] and written["created"]


def test_variant_specs():
    assert parse_variant("plain:32") == VariantSpec("plain", 32, None)
    assert parse_variant("exact@model.int8.onnx").name == "exact@model.int8.onnx"
    assert parse_variant("approximate:16", "model.int8.onnx") == VariantSpec("approximate", 16, "model.int8.onnx")
    assert parse_variant("exact@other.onnx", "model.int8.onnx").model_file == "other.onnx"
    for bad in ("fast", "exact:x", "exact:0", "exact@"):
        with pytest.raises(ValueError, match="unknown bench variant"):
            parse_variant(bad)


def test_plain_variant_with_dims_runs_on_an_artifact_without_index(small_artifact, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(small_artifact, old)
    strip_index(old)
    main(["bench", "--artifact", str(old), "--frames", "1", "--warmup", "0", "--variants", "plain:32",
          "--out", str(tmp_path / "results")])
    assert "plain:32" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no bank projection"):
        main(["bench", "--artifact", str(old), "--frames", "1", "--variants", "plain,exact:32",
              "--out", str(tmp_path / "results")])


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH_SCRIPTS.glob("*.py")))
def test_bench_scripts_import_only_the_installed_package(script, tmp_path):
    """`python bench/x.py` finds everything it imports in the installed patchline: nothing from the checkout's
    tests/, which is not on its path (run from elsewhere, no PYTHONPATH)."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    result = subprocess.run([sys.executable, str(BENCH_SCRIPTS / script), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


@needs_gstreamer
def test_line_throughput_runs_a_line_and_a_separate_process(small_artifact, sample_data, tmp_path):
    """bench/line_throughput.py, one camera for a 3 s window each way: real daemons, broker, GStreamer (no timing
    asserted, only that verdicts were counted and measured as the result says)."""
    video = write_video(tmp_path / "line.avi", [cv2.imread(str(p))[..., ::-1]
                                                for p in sorted((sample_data / "train" / "good").glob("*.png"))], 10)
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, str(LINE_BENCH), "--artifact", str(small_artifact), "--video", str(video),
                          "--cameras", "1", "--fps", "10", "--seconds", "3", "--warmup", "0", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    [path] = out.glob("line-throughput-*.json")
    result = json.loads(path.read_text())
    assert result["frame_size"] == [128, 128] and result["video_frames"] == 20 and result["machine"]["cpu_model"]
    assert [(r["cameras"], r["setup"], r["processes"]) for r in result["results"]] == [(1, "line", 1),
                                                                                      (1, "separate", 1)]
    for r in result["results"]:
        assert r["verdicts_per_s"] > 0 and 0 < r["inspected"] <= 1.05  # a frame at each end of the window
        assert r["frames_per_batch"] == 1.0  # one camera: nothing to batch with
        assert r["latency"]["n"] == round(r["verdicts_per_s"] * r["window_s"])
        assert 0 < r["inspection"]["median_ms"] <= r["latency"]["median_ms"] <= r["latency"]["p99_ms"]
        assert list(r["per_camera"]) == [f"n1-{r['setup']}-cam1"]
    assert str(path) in run.stdout and "verdicts/s" in run.stdout
