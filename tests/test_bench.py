"""`patchline bench` runs once on the small artifact and writes a well-formed results file (no timing asserted)."""

import json

import pytest

from patchline.runtime.bench import STAGES
from patchline.runtime.cli import main


def test_bench_writes_results_and_table(small_artifact, sample_data, mosquitto, tmp_path, capsys):
    out = tmp_path / "results"
    main(["bench", "--artifact", str(small_artifact), "--images", str(sample_data), "--frames", "3", "--warmup", "1",
          "--variants", "plain,exact,approximate", "--threads", "2", "--compare", "--publish", f"127.0.0.1:{mosquitto.port}",
          "--accuracy", str(sample_data), "--out", str(out)])
    table = capsys.readouterr().out
    files = list(out.glob("*.json"))
    assert len(files) == 1
    results = json.loads(files[0].read_text())
    assert results["sgemm_gflops"] > 0 and results["peak_rss_mb"] > 0
    assert results["artifact"]["bank_rows"] == json.loads((small_artifact / "manifest.json").read_text())["memory_bank"]["shape"][0]
    for name in ("plain", "exact", "approximate"):
        stages = results["variants"][name]["stages"]
        assert set(stages) == {*STAGES, "total"}
        assert all(0 < s["median_ms"] <= s["p95_ms"] for s in stages.values())
        assert stages["distance"]["floor_ms"] > 0 and stages["backbone"]["floor_ms"] > 0
    baseline = results["baseline"]
    assert baseline["against"] == "exact" and baseline["speedup_median"] > 0
    # Same model, same frames: the torch twin agrees with the runtime up to float32 rounding.
    assert baseline["max_rel_score_diff"] < 1e-3
    accuracy = results["accuracy"]
    assert accuracy["exact"]["max_rel_score_drift"] == 0.0  # the reference column
    assert accuracy["plain"]["max_rel_score_drift"] < 1e-3
    assert 0.0 <= accuracy["approximate"]["image_auroc"] <= 1.0
    assert "distance" in table and "speed-up vs torch eager" in table and str(files[0]) in table


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
    with pytest.raises(SystemExit, match=r"broken\.png: not a decodable image"):
        main(["bench", "--artifact", str(small_artifact), "--images", str(frames), "--frames", "1", "--warmup", "1",
              "--out", str(tmp_path / "results")])
